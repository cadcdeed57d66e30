//! Walking the sources: entries in walk order, one filesystem per source.
//!
//! The walker pushes each entry into a sink (the backup pipeline; tests use a
//! `Vec`). Siblings are visited in byte order, so the stream is strictly
//! increasing in the protocol's walk order, which the server relies on to
//! merge it against its manifest without loading either into memory.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use byteback_protocol::{compare_paths, Entry, Kind};
use globset::{GlobBuilder, GlobSet, GlobSetBuilder};

use crate::meta;

/// Paths byteback 1.x leaves out by default (when they lie beneath a source).
pub const DEFAULT_EXCLUDES: &[&str] = &[
    "/swap.file",
    "/tmp/",
    "/var/backups/localhost/",
    "/var/cache/apt/archives/",
    "/var/lib/php5/",
    "/var/tmp/",
    "/var/lib/mysql/",
];

/// Exclude rules in rsync's spirit: a pattern starting with `/` is anchored at
/// the filesystem root, any other matches the final components; a trailing
/// `/` matches directories only.
#[derive(Debug)]
pub struct Excludes {
    anchored: GlobSet,
    anchored_dirs: GlobSet,
    floating: GlobSet,
    floating_dirs: GlobSet,
}

fn glob(p: &str) -> Result<globset::Glob> {
    GlobBuilder::new(p)
        .literal_separator(true)
        .backslash_escape(true)
        .build()
        .with_context(|| format!("bad pattern {p:?}"))
}

impl Excludes {
    /// Builds the rules from patterns.
    pub fn new<S: AsRef<str>>(patterns: &[S]) -> Result<Self> {
        let (mut a, mut ad, mut f, mut fd) = (
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
            GlobSetBuilder::new(),
        );
        for p in patterns {
            let p = p.as_ref().trim();
            if p.is_empty() || p.starts_with('#') {
                continue;
            }
            let (body, dir_only) = match p.strip_suffix('/') {
                Some(b) if !b.is_empty() => (b, true),
                _ => (p, false),
            };
            if let Some(rel) = body.strip_prefix('/') {
                let g = glob(rel)?;
                if dir_only {
                    ad.add(g)
                } else {
                    a.add(g)
                };
            } else {
                let g = glob(&format!("**/{body}"))?;
                if dir_only {
                    fd.add(g)
                } else {
                    f.add(g)
                };
            }
        }
        Ok(Excludes {
            anchored: a.build()?,
            anchored_dirs: ad.build()?,
            floating: f.build()?,
            floating_dirs: fd.build()?,
        })
    }

    /// Whether `rel` (path relative to `/`) is excluded.
    pub fn is_excluded(&self, rel: &[u8], is_dir: bool) -> bool {
        let p = Path::new(OsStr::from_bytes(rel));
        self.anchored.is_match(p)
            || self.floating.is_match(p)
            || (is_dir && (self.anchored_dirs.is_match(p) || self.floating_dirs.is_match(p)))
    }
}

/// A problem with one path that does not stop the backup.
#[derive(Debug)]
pub struct WalkWarning {
    /// Path concerned.
    pub path: PathBuf,
    /// What happened.
    pub message: String,
    /// The object vanished (rsync's code 24 territory).
    pub vanished: bool,
}

/// Receives walk output.
pub trait EntrySink {
    /// One entry, with the absolute path it was read from.
    fn entry(&mut self, abs: PathBuf, entry: Entry) -> Result<()>;
    /// One non-fatal problem.
    fn warning(&mut self, w: WalkWarning);
}

fn rel_of(abs: &Path) -> Vec<u8> {
    abs.as_os_str()
        .as_bytes()
        .trim_start_matches_slash()
        .to_vec()
}

trait TrimSlash {
    fn trim_start_matches_slash(&self) -> &[u8];
}

impl TrimSlash for [u8] {
    fn trim_start_matches_slash(&self) -> &[u8] {
        let mut s = self;
        while let [b'/', rest @ ..] = s {
            s = rest;
        }
        s
    }
}

/// Normalises sources: absolute, without `.`/`..`/trailing slashes, sorted in
/// walk order, and with sources nested in another dropped.
pub fn normalise_sources(sources: &[PathBuf]) -> Result<Vec<PathBuf>> {
    let cwd = std::env::current_dir()?;
    let mut out: Vec<PathBuf> = vec![];
    for s in sources {
        let abs = if s.is_absolute() {
            s.clone()
        } else {
            cwd.join(s)
        };
        let mut clean = PathBuf::from("/");
        for c in abs.components() {
            match c {
                std::path::Component::Normal(n) => clean.push(n),
                std::path::Component::ParentDir => {
                    clean.pop();
                }
                _ => {}
            }
        }
        std::fs::symlink_metadata(&clean).with_context(|| format!("source {}", clean.display()))?;
        out.push(clean);
    }
    out.sort_by(|a, b| compare_paths(&rel_of(a), &rel_of(b)));
    let mut kept: Vec<PathBuf> = vec![];
    for s in out {
        if kept.iter().any(|k| s.starts_with(k)) {
            continue;
        }
        kept.push(s);
    }
    if kept.is_empty() {
        bail!("no sources");
    }
    Ok(kept)
}

/// Walks every source, pushing entries in walk order into `sink`.
pub fn walk(sources: &[PathBuf], excludes: &Excludes, sink: &mut dyn EntrySink) -> Result<()> {
    // (dev, ino) of multiply-linked files already sent -> their first path.
    let mut links: HashMap<(u64, u64), Vec<u8>> = HashMap::new();
    let mut sent_dirs: Vec<Vec<u8>> = vec![];
    for src in sources {
        // Ancestors of the source first, so the server has every parent.
        let mut anc = PathBuf::from("/");
        let comps: Vec<_> = src.components().skip(1).collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            anc.push(c);
            let rel = rel_of(&anc);
            if sent_dirs.contains(&rel) {
                continue;
            }
            let md = std::fs::symlink_metadata(&anc)?;
            let e = meta::read_entry(&anc, rel.clone(), &md)?;
            sink.entry(anc.clone(), e)?;
            sent_dirs.push(rel);
        }
        let wd = walkdir::WalkDir::new(src)
            .follow_links(false)
            .same_file_system(true)
            .sort_by(|a, b| a.file_name().as_bytes().cmp(b.file_name().as_bytes()));
        let mut it = wd.into_iter();
        while let Some(item) = it.next() {
            let de = match item {
                Ok(d) => d,
                Err(e) => {
                    let vanished = e
                        .io_error()
                        .is_some_and(|io| io.kind() == std::io::ErrorKind::NotFound);
                    sink.warning(WalkWarning {
                        path: e.path().map(Path::to_path_buf).unwrap_or_default(),
                        message: e.to_string(),
                        vanished,
                    });
                    continue;
                }
            };
            let abs = de.path();
            let rel = rel_of(abs);
            if rel.is_empty() {
                continue; // the root itself
            }
            let is_dir = de.file_type().is_dir();
            if de.depth() > 0 && excludes.is_excluded(&rel, is_dir) {
                if is_dir {
                    it.skip_current_dir();
                }
                continue;
            }
            let md = match std::fs::symlink_metadata(abs) {
                Ok(m) => m,
                Err(e) => {
                    sink.warning(WalkWarning {
                        path: abs.to_path_buf(),
                        vanished: e.kind() == std::io::ErrorKind::NotFound,
                        message: e.to_string(),
                    });
                    continue;
                }
            };
            let mut e = match meta::read_entry(abs, rel.clone(), &md) {
                Ok(e) => e,
                Err(err) => {
                    sink.warning(WalkWarning {
                        path: abs.to_path_buf(),
                        vanished: err.kind() == std::io::ErrorKind::NotFound,
                        message: err.to_string(),
                    });
                    continue;
                }
            };
            if e.path.len() > byteback_protocol::limits::MAX_PATH {
                sink.warning(WalkWarning {
                    path: abs.to_path_buf(),
                    message: "path too long; skipped".into(),
                    vanished: false,
                });
                if is_dir {
                    it.skip_current_dir();
                }
                continue;
            }
            if md.file_type().is_file() && md.nlink() > 1 {
                let key = (md.dev(), md.ino());
                if let Some(first) = links.get(&key) {
                    e.kind = Kind::HardLink {
                        target: first.clone(),
                    };
                } else {
                    links.insert(key, rel.clone());
                }
            }
            sink.entry(abs.to_path_buf(), e)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excludes_follow_rsync_spirit() {
        let x = Excludes::new(&["/tmp/", "*.log", "/var/cache/apt/archives/", "cache/"]).unwrap();
        assert!(x.is_excluded(b"tmp", true));
        assert!(!x.is_excluded(b"tmp", false));
        assert!(!x.is_excluded(b"home/tmp", true));
        assert!(x.is_excluded(b"var/log/syslog.log", false));
        assert!(x.is_excluded(b"a/b/cache", true));
        assert!(!x.is_excluded(b"a/b/cache", false));
        assert!(x.is_excluded(b"var/cache/apt/archives", true));
    }

    struct VecSink(Vec<Entry>);
    impl EntrySink for VecSink {
        fn entry(&mut self, _abs: PathBuf, entry: Entry) -> Result<()> {
            self.0.push(entry);
            Ok(())
        }
        fn warning(&mut self, _w: WalkWarning) {}
    }

    #[test]
    fn walk_is_in_protocol_order_with_ancestors_and_hard_links() {
        let d = tempfile::tempdir().unwrap();
        let root = d.path().join("src");
        std::fs::create_dir_all(root.join("a")).unwrap();
        std::fs::write(root.join("a/f"), b"x").unwrap();
        std::fs::write(root.join("a.b"), b"y").unwrap();
        std::fs::hard_link(root.join("a/f"), root.join("z")).unwrap();
        std::fs::write(root.join("skip.log"), b"y").unwrap();
        let mut sink = VecSink(vec![]);
        let x = Excludes::new(&["*.log"]).unwrap();
        walk(
            &normalise_sources(std::slice::from_ref(&root)).unwrap(),
            &x,
            &mut sink,
        )
        .unwrap();
        for w in sink.0.windows(2) {
            assert_eq!(
                compare_paths(&w[0].path, &w[1].path),
                std::cmp::Ordering::Less
            );
        }
        let names: Vec<String> = sink
            .0
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        let base = rel_of(&root);
        let base = String::from_utf8_lossy(&base);
        assert!(names.contains(&format!("{base}/a/f")));
        assert!(!names.iter().any(|n| n.ends_with("skip.log")));
        // Every ancestor of the source is present.
        assert_eq!(names[0], base.split('/').next().unwrap());
        let z = sink.0.iter().find(|e| e.path.ends_with(b"/z")).unwrap();
        assert_eq!(
            z.kind,
            Kind::HardLink {
                target: format!("{base}/a/f").into_bytes()
            }
        );
    }
}
