//! Store-wide settings from `<store>/byteback.toml`, written by the admin.
//!
//! Only `key = integer` lines (and comments) are accepted, a time also as
//! a quoted age (`"6h"`, `"2d"`: seconds, or `s`, `m`, `h`, `d`, `w`); a
//! missing file means defaults. The client can never write this file: it lives outside
//! every host's tree.

use std::path::Path;

/// Settings that apply to every host of a store.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoreConfig {
    /// Minimum seconds between two snapshots of one host (1.x: 6 hours).
    pub min_snapshot_interval: i64,
    /// Prune when free space falls below this percentage.
    pub minpercent: u32,
    /// Prune until free space is above this percentage.
    pub maxpercent: u32,
    /// Seconds a session may wait for its client to send or take a byte
    /// before it gives up (and releases the host's lock).
    pub io_timeout: i64,
    /// Seconds a backup session may run in all before it gives up (and
    /// releases the host's lock); 0 for no limit.
    pub max_session: i64,
}

/// The keys that are times, in seconds.
const TIMES: [&str; 3] = ["min_snapshot_interval", "io_timeout", "max_session"];

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            min_snapshot_interval: 6 * 3600,
            minpercent: 5,
            maxpercent: 10,
            io_timeout: 10800,
            max_session: 86400,
        }
    }
}

impl StoreConfig {
    /// Loads `<store>/byteback.toml`, or defaults when it does not exist.
    pub fn load(store: &Path) -> crate::error::Result<Self> {
        let path = store.join("byteback.toml");
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(crate::error::Error::io("read", path.display(), e)),
        };
        let mut notes = vec![];
        let c = Self::parse_noting(&text, &mut notes)
            .map_err(|e| crate::error::Error::Store(format!("{}: {e}", path.display())))?;
        for n in notes {
            tracing::warn!("{}: {n}", path.display());
        }
        Ok(c)
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
        Self::parse_noting(text, &mut vec![])
    }

    /// Parses the file's text; values that are most likely a mistake
    /// (seconds where hours were meant) are named in `notes`.
    pub fn parse_noting(text: &str, notes: &mut Vec<String>) -> Result<Self, String> {
        let mut c = Self::default();
        // A key given twice is a mistake to point at, not one to settle by order.
        let mut seen: std::collections::HashMap<String, usize> = Default::default();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let (k, v) = line
                .split_once('=')
                .ok_or(format!("line {}: expected key = value", n + 1))?;
            let v = v.trim();
            let aged = v
                .strip_prefix('"')
                .and_then(|a| a.strip_suffix('"'))
                .filter(|_| TIMES.contains(&k.trim()));
            let v: i64 = match aged {
                Some(a) => crate::status::parse_age(a).ok_or(format!(
                    "line {}: {a:?} is not an age (seconds, or a number with s, m, h, d or w)",
                    n + 1
                ))?,
                None => v.parse().map_err(|_| {
                    format!(
                        "line {}: expected an integer{}",
                        n + 1,
                        match TIMES.contains(&k.trim()) {
                            true => " (seconds) or a quoted age such as \"6h\"",
                            false => "",
                        }
                    )
                })?,
            };
            let short = match k.trim() {
                "min_snapshot_interval" => (1..60).contains(&v),
                "io_timeout" | "max_session" => (1..60).contains(&v),
                _ => false,
            };
            if short {
                notes.push(format!(
                    "line {}: {} = {v} is {v} seconds (hours would be \"{v}h\")",
                    n + 1,
                    k.trim()
                ));
            }
            if let Some(first) = seen.insert(k.trim().to_string(), n + 1) {
                return Err(format!(
                    "line {}: {} is given twice (first on line {first})",
                    n + 1,
                    k.trim()
                ));
            }
            match k.trim() {
                "min_snapshot_interval" if v >= 0 => c.min_snapshot_interval = v,
                "minpercent" if (0..=100).contains(&v) => c.minpercent = v as u32,
                "maxpercent" if (0..=100).contains(&v) => c.maxpercent = v as u32,
                "io_timeout" if v > 0 && v <= 30 * 86400 => c.io_timeout = v,
                "max_session" if (0..=366 * 86400).contains(&v) => c.max_session = v,
                k => {
                    return Err(format!(
                        "line {}: unknown key or bad value for {k:?}",
                        n + 1
                    ))
                }
            }
        }
        if c.maxpercent < c.minpercent {
            return Err("maxpercent is below minpercent".into());
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_rejects() {
        let c = StoreConfig::parse(
            "# x\nmin_snapshot_interval = 0\nminpercent=7 # c\nmaxpercent = 20\nio_timeout = 60\nmax_session=0\n",
        )
        .unwrap();
        assert_eq!(
            c,
            StoreConfig {
                min_snapshot_interval: 0,
                minpercent: 7,
                maxpercent: 20,
                io_timeout: 60,
                max_session: 0,
            }
        );
        assert!(StoreConfig::parse("bogus = 1").is_err());
        assert!(StoreConfig::parse("minpercent = 50\nmaxpercent = 10").is_err());
        assert!(StoreConfig::parse("minpercent").is_err());
        assert!(StoreConfig::parse("io_timeout = 0").is_err());
        assert!(StoreConfig::parse("max_session = -1").is_err());
        let e = StoreConfig::parse("minpercent = 5\n# x\nminpercent = 7\n").unwrap_err();
        assert_eq!(e, "line 3: minpercent is given twice (first on line 1)");
        assert_eq!(StoreConfig::parse("").unwrap().max_session, 86400);
    }

    #[test]
    fn times_may_be_ages_and_seconds_that_look_like_hours_are_noted() {
        let mut notes = vec![];
        let c = StoreConfig::parse_noting(
            "min_snapshot_interval = \"6h\"\nio_timeout = \"3h\"\nmax_session = \"2d\"\n",
            &mut notes,
        )
        .unwrap();
        assert_eq!(
            (c.min_snapshot_interval, c.io_timeout, c.max_session),
            (6 * 3600, 3 * 3600, 2 * 86400)
        );
        assert!(notes.is_empty(), "{notes:?}");
        let c =
            StoreConfig::parse_noting("max_session = 24\nio_timeout = 3\n", &mut notes).unwrap();
        assert_eq!((c.max_session, c.io_timeout), (24, 3));
        assert_eq!(
            notes,
            [
                "line 1: max_session = 24 is 24 seconds (hours would be \"24h\")",
                "line 2: io_timeout = 3 is 3 seconds (hours would be \"3h\")"
            ]
        );
        assert!(StoreConfig::parse("minpercent = \"5\"").is_err());
        assert!(StoreConfig::parse("io_timeout = \"3 hours\"").is_err());
        assert!(StoreConfig::parse("io_timeout = 6h").is_err());
    }
}
