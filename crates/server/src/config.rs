//! Store-wide settings from `<store>/byteback.toml`, written by the admin.
//!
//! Only `key = integer` lines (and comments) are accepted; a missing file
//! means defaults. The client can never write this file: it lives outside
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
        Self::parse(&text)
            .map_err(|e| crate::error::Error::Store(format!("{}: {e}", path.display())))
    }

    /// Parses the file's text.
    pub fn parse(text: &str) -> Result<Self, String> {
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
            let v: i64 = v
                .trim()
                .parse()
                .map_err(|_| format!("line {}: expected an integer", n + 1))?;
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
}
