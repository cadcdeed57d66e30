//! Snapshot names: `YYYY-MM-DDTHH:MM+ZZZZ` in the server's local time, as byteback 1.x.
//!
//! A second snapshot within the same minute gets a `.N` suffix so names never
//! collide; parsing accepts both forms.

/// Days since 1970-01-01 of a proleptic Gregorian date.
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Offset of local time from UTC at `t`, in seconds (from the C library's zone
/// rules, through the one `localtime_r` wrapper both sides share).
pub fn local_offset(t: i64) -> i64 {
    byteback_protocol::os::localtime(t).map_or(0, |l| l.utc_offset)
}

/// Formats `t` (Unix seconds) with the given UTC offset as `YYYY-MM-DDTHH:MM+ZZZZ`.
pub fn format_name(t: i64, offset: i64) -> String {
    let local = t + offset;
    let days = local.div_euclid(86_400);
    let secs = local.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let sign = if offset < 0 { '-' } else { '+' };
    let off = offset.abs() / 60;
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}{sign}{:02}{:02}",
        secs / 3600,
        secs % 3600 / 60,
        off / 60,
        off % 60
    )
}

/// Parses a snapshot name into Unix seconds; `None` if it is not one.
pub fn parse_name(name: &str) -> Option<i64> {
    let base = match name.find('.') {
        Some(i) if name[i + 1..].bytes().all(|b| b.is_ascii_digit()) && i + 1 < name.len() => {
            &name[..i]
        }
        Some(_) => return None,
        None => name,
    };
    let b = base.as_bytes();
    if b.len() != 21 || b[4] != b'-' || b[7] != b'-' || b[10] != b'T' || b[13] != b':' {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let s = base.get(r)?;
        if s.bytes().all(|c| c.is_ascii_digit()) {
            s.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d, h, mi) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
    );
    let sign = match b[16] {
        b'+' => 1,
        b'-' => -1,
        _ => return None,
    };
    let (oh, om) = (num(17..19)?, num(19..21)?);
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || om > 59 {
        return None;
    }
    let local = days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60;
    Some(local - sign * (oh * 3600 + om * 60))
}

/// The order of snapshot names: by time, then (names of one minute, made
/// with `.1`, `.2`, ... after the first) by suffix as a number, so that
/// `.10` follows `.9`; names that are not snapshot names last, as text.
pub fn cmp_names(a: &str, b: &str) -> std::cmp::Ordering {
    fn key(n: &str) -> (bool, Option<i64>, &str, usize) {
        let base = n.rfind('.').map_or(n, |i| &n[..i]);
        let t = parse_name(n);
        (t.is_none(), t, base, n.len() - base.len())
    }
    key(a).cmp(&key(b)).then_with(|| a.cmp(b))
}

/// Parses an RFC 3339 time (`2026-11-27T03:00:00Z`, `2026-11-27T03:00:00.5+01:00`;
/// a space may replace the `T`) into Unix seconds and the UTC offset it names.
pub fn parse_rfc3339(s: &str) -> Option<(i64, i64)> {
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    if !matches!(b[10], b'T' | b't' | b' ') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let p = s.get(r)?;
        if p.bytes().all(|c| c.is_ascii_digit()) {
            p.parse().ok()
        } else {
            None
        }
    };
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, sec) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(frac) = rest.strip_prefix('.') {
        let n = frac.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &frac[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        _ => {
            let ob = rest.as_bytes();
            if ob.len() != 6 || ob[3] != b':' {
                return None;
            }
            let sign = match ob[0] {
                b'+' => 1,
                b'-' => -1,
                _ => return None,
            };
            let oh: i64 = rest.get(1..3)?.parse().ok()?;
            let om: i64 = rest.get(4..6)?.parse().ok()?;
            if oh > 23 || om > 59 {
                return None;
            }
            sign * (oh * 3600 + om * 60)
        }
    };
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let local = days_from_civil(y, mo as u32, d as u32) * 86_400 + h * 3600 + mi * 60 + sec;
    Some((local - offset, offset))
}

/// Current Unix time in seconds.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for (t, off) in [
            (0i64, 0i64),
            (1_795_000_000, 3600),
            (1_795_000_000, -5 * 3600 - 1800),
            (951_782_400, 0),
        ] {
            let n = format_name(t, off);
            assert_eq!(parse_name(&n), Some(t - t.rem_euclid(60)), "{n}");
        }
        assert_eq!(format_name(1_795_000_000, 0), "2026-11-18T11:06+0000");
        assert_eq!(
            parse_name("2026-11-27T03:00+0000.2"),
            parse_name("2026-11-27T03:00+0000")
        );
    }

    /// Names of one minute follow their suffixes as numbers (`.10`
    /// after `.9`), times come first, and names of no time come last.
    #[test]
    fn snapshot_names_sort_by_time_then_suffix_number() {
        let mut names = vec![
            "current",
            "2026-11-27T03:00+0000.10",
            "2026-11-27T03:01+0000",
            "2026-11-27T03:00+0000.9",
            "2026-11-27T03:00+0000",
            "2026-11-27T03:00+0000.11",
            "2026-11-27T03:00+0000.1",
            "2026-11-27T04:00+0100.2",
        ];
        names.sort_by(|a, b| cmp_names(a, b));
        assert_eq!(
            names,
            [
                "2026-11-27T03:00+0000",
                "2026-11-27T03:00+0000.1",
                "2026-11-27T03:00+0000.9",
                "2026-11-27T03:00+0000.10",
                "2026-11-27T03:00+0000.11",
                "2026-11-27T04:00+0100.2",
                "2026-11-27T03:01+0000",
                "current",
            ]
        );
    }

    #[test]
    fn rfc3339_times() {
        assert_eq!(
            parse_rfc3339("2026-11-18T11:06:40Z"),
            Some((1_795_000_000, 0))
        );
        assert_eq!(
            parse_rfc3339("2026-11-18T12:06:40.25+01:00"),
            Some((1_795_000_000, 3600))
        );
        assert_eq!(
            parse_rfc3339("2026-11-18 06:06:40-05:00"),
            Some((1_795_000_000, -18_000))
        );
        for bad in [
            "2026-11-18T11:06Z",
            "2026-11-18T11:06:40",
            "2026-11-18T11:06:40+0100",
            "x",
        ] {
            assert_eq!(parse_rfc3339(bad), None, "{bad}");
        }
    }

    #[test]
    fn non_names_are_rejected() {
        for n in [
            "current",
            "",
            "2026-11-27T03:00",
            "2026-13-27T03:00+0000",
            "2026-11-27T03:00+0000.",
            "x026-11-27T03:00+0000",
        ] {
            assert_eq!(parse_name(n), None, "{n}");
        }
    }
}
