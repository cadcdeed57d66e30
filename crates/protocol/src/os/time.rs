//! Local time from the C library's zone rules (`localtime_r`), for names and
//! listings shown to people.

/// A moment broken down in the local time zone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LocalTime {
    /// Year, e.g. 2026.
    pub year: i32,
    /// Month, 1-12.
    pub month: u32,
    /// Day of the month, 1-31.
    pub day: u32,
    /// Hour, 0-23.
    pub hour: u32,
    /// Minute, 0-59.
    pub minute: u32,
    /// Second, 0-60 (a leap second).
    pub second: u32,
    /// Offset of local time from UTC, in seconds.
    pub utc_offset: i64,
}

impl LocalTime {
    /// `YYYY-MM-DD HH:MM:SS +HHMM`, as Ruby's `Time#to_s` writes it (and
    /// byteback 1.x's listings showed mtimes).
    pub fn to_listing(&self) -> String {
        let off = self.utc_offset;
        let (sign, off) = if off < 0 { ('-', -off) } else { ('+', off) };
        format!(
            "{:04}-{:02}-{:02} {:02}:{:02}:{:02} {sign}{:02}{:02}",
            self.year,
            self.month,
            self.day,
            self.hour,
            self.minute,
            self.second,
            off / 3600,
            off % 3600 / 60
        )
    }

    /// `YYYY-MM-DDTHH:MM:SS`, without the offset.
    pub fn to_iso_seconds(&self) -> String {
        format!(
            "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}",
            self.year, self.month, self.day, self.hour, self.minute, self.second
        )
    }
}

/// `t` (Unix seconds) in the local time zone; `None` when the C library
/// cannot represent it.
pub fn localtime(t: i64) -> Option<LocalTime> {
    // time_t is 64 bits on every target byteback builds for.
    let tt = t as libc::time_t;
    // SAFETY: tm is plain data (integers and a pointer that may be null);
    // localtime_r only writes into it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are to live locals of the right types.
    if unsafe { libc::localtime_r(&tt, &mut tm) }.is_null() {
        return None;
    }
    let field = |v: libc::c_int| u32::try_from(v).ok();
    Some(LocalTime {
        year: tm.tm_year.checked_add(1900)?,
        month: field(tm.tm_mon)? + 1,
        day: field(tm.tm_mday)?,
        hour: field(tm.tm_hour)?,
        minute: field(tm.tm_min)?,
        second: field(tm.tm_sec)?,
        utc_offset: tm.tm_gmtoff,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_time_agrees_with_its_own_offset() {
        // Whatever zone the tests run in, the broken-down time is the UTC
        // one shifted by the offset it reports.
        let t = 1_780_000_000; // 2026-05-28T20:26:40Z
        let Some(lt) = localtime(t) else {
            panic!("localtime failed")
        };
        let local = t + lt.utc_offset;
        let secs = local.rem_euclid(86_400);
        assert_eq!(i64::from(lt.hour), secs / 3600);
        assert_eq!(i64::from(lt.minute), secs % 3600 / 60);
        assert_eq!(i64::from(lt.second), secs % 60);
        assert!((1..=12).contains(&lt.month) && (1..=31).contains(&lt.day));
        assert!(lt.year == 2026, "{lt:?}");
        let s = lt.to_iso_seconds();
        assert_eq!(s.len(), 19, "{s}");
        assert!(s.starts_with("2026-05-2"), "{s}");
    }

    #[test]
    fn listings_show_times_as_ruby_did() {
        let t = |utc_offset| LocalTime {
            year: 2015,
            month: 11,
            day: 29,
            hour: 9,
            minute: 26,
            second: 10,
            utc_offset,
        };
        assert_eq!(t(0).to_listing(), "2015-11-29 09:26:10 +0000");
        assert_eq!(t(3600 + 1800).to_listing(), "2015-11-29 09:26:10 +0130");
        assert_eq!(t(-5 * 3600).to_listing(), "2015-11-29 09:26:10 -0500");
    }

    #[test]
    fn zero_is_1970_or_the_last_day_of_1969() {
        let Some(lt) = localtime(0) else {
            panic!("localtime failed")
        };
        assert!(lt.year == 1970 || lt.year == 1969, "{lt:?}");
    }
}
