//! Runs of unchanged entries ([`crate::ClientMsg::Unchanged`]) and the
//! manifest generation that lets a client use them.
//!
//! Every entry has a digest: the first 16 bytes of the BLAKE3 of its
//! encoding (bincode, as on the wire). A [`Chain`] hashes a sequence of
//! entry digests in order. The server keeps the chain of its manifest's
//! entries as the manifest's *generation*; a client that recorded the same
//! sequence of entries (its cache of the last backup, see the client's
//! `cache` module) has the same chain, and may then say "the next N entries
//! of your manifest are unchanged" with the chain of those N, which the
//! server checks against its own entries before carrying them over.

use crate::messages::Entry;

/// Digest of one entry.
pub type EntryDigest = [u8; 16];

/// The digest of `e`: the first 16 bytes of the BLAKE3 of its encoding.
pub fn entry_digest(e: &Entry) -> EntryDigest {
    thread_local! {
        static BUF: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    // Encoded whole, then hashed at once: a hasher fed field by field
    // cost twice as much.
    BUF.with_borrow_mut(|buf| {
        buf.clear();
        // Encoding into a vector cannot fail.
        let _ = bincode::serde::encode_into_std_write(e, buf, config());
        digest_of_encoding(buf)
    })
}

/// The digest of an entry from its encoding (a manifest holds it as the
/// start of each record).
pub fn digest_of_encoding(bytes: &[u8]) -> EntryDigest {
    let mut d = [0u8; 16];
    d.copy_from_slice(&blake3::hash(bytes).as_bytes()[..16]);
    d
}

fn config() -> impl bincode::config::Config {
    bincode::config::standard()
}

/// The hash of a sequence of entry digests, in order.
#[derive(Clone, Default)]
pub struct Chain {
    hasher: blake3::Hasher,
    count: u64,
}

impl Chain {
    /// An empty chain.
    pub fn new() -> Self {
        Chain::default()
    }

    /// Appends one entry's digest.
    pub fn push(&mut self, d: &EntryDigest) {
        self.hasher.update(d);
        self.count += 1;
    }

    /// Appends `e`'s digest; returns it.
    pub fn push_entry(&mut self, e: &Entry) -> EntryDigest {
        let d = entry_digest(e);
        self.push(&d);
        d
    }

    /// Entries pushed.
    pub fn len(&self) -> u64 {
        self.count
    }

    /// Whether nothing was pushed.
    pub fn is_empty(&self) -> bool {
        self.count == 0
    }

    /// The chain's hash: the count and the digests.
    pub fn finish(&self) -> [u8; 32] {
        let mut h = self.hasher.clone();
        h.update(&self.count.to_le_bytes());
        *h.finalize().as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::Kind;

    fn encoded(v: &Entry) -> Vec<u8> {
        bincode::serde::encode_to_vec(v, config()).unwrap()
    }

    fn e(path: &str, mtime: i64) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind: Kind::File { size: 3 },
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime_sec: mtime,
            mtime_nsec: 0,
            xattrs: vec![(b"user.a".to_vec(), b"1".to_vec())],
        }
    }

    #[test]
    fn digests_follow_every_field_and_chains_the_order() {
        let a = e("a", 1);
        assert_eq!(entry_digest(&a), entry_digest(&a.clone()));
        assert_eq!(
            &entry_digest(&a)[..],
            &blake3::hash(&encoded(&a)).as_bytes()[..16]
        );
        let mut b = a.clone();
        b.mtime_sec = 2;
        assert_ne!(entry_digest(&a), entry_digest(&b));
        let mut c = a.clone();
        c.xattrs[0].1 = b"2".to_vec();
        assert_ne!(entry_digest(&a), entry_digest(&c));
        let chain = |v: &[&Entry]| {
            let mut ch = Chain::new();
            for x in v {
                ch.push_entry(x);
            }
            ch.finish()
        };
        let z = e("z", 1);
        assert_eq!(chain(&[&a, &z]), chain(&[&a, &z]));
        assert_ne!(chain(&[&a, &z]), chain(&[&z, &a]));
        assert_ne!(chain(&[&a]), chain(&[&a, &a]));
        assert_ne!(chain(&[]), chain(&[&a]));
    }
}
