//! The new manifest's order: every entry takes a slot in walk order; a
//! file's slot waits while its transfer runs, and entries behind it wait
//! with it (bounded: a client that sends too many is refused). Resolved
//! slots at the front leave in order, for the new manifest.

use std::collections::VecDeque;

use byteback_protocol::limits::{window_within_caps, MAX_BUFFERED_BYTES, MAX_PENDING};
use byteback_protocol::unchanged::EntryDigest;
use byteback_protocol::ManifestEntry;

use crate::error::{Error, Result};

/// An entry's place in the new manifest.
#[derive(Debug, PartialEq)]
pub(super) enum Slot {
    /// Resolved: this is its manifest entry.
    Ready(ManifestEntry),
    /// Carried over from the old manifest, with its digest.
    Carried(ManifestEntry, EntryDigest),
    /// Its transfer is running.
    Waiting,
    /// Given up, not in the manifest; carries the cost it was admitted with.
    Dropped(usize),
}

/// The slots not yet written, in walk order.
#[derive(Default)]
pub(super) struct Slots {
    queue: VecDeque<Slot>,
    /// Sequence number of the front slot.
    base: u64,
    /// Sum of `buffer_cost` of the entries queued (waiting ones included).
    bytes: usize,
}

impl Slots {
    /// Queues `s` (costing `cost` bytes of memory); returns its sequence number.
    pub fn push(&mut self, s: Slot, cost: usize) -> Result<u64> {
        // Entries behind an unfinished transfer wait here; the client's flow
        // control keeps this bounded and a client that ignores it is refused.
        self.bytes += cost;
        if !window_within_caps(self.queue.len(), self.bytes) {
            return Err(Error::Refused(format!(
                "client sent more than {MAX_PENDING} entries or {MAX_BUFFERED_BYTES} bytes behind unfinished transfers"
            )));
        }
        self.queue.push_back(s);
        Ok(self.base + self.queue.len() as u64 - 1)
    }

    /// Resolves slot `seq`, admitted at a cost of `was` bytes.
    pub fn set(&mut self, seq: u64, s: Slot, was: usize) {
        let cost = match &s {
            Slot::Ready(e) | Slot::Carried(e, _) => e.entry.buffer_cost(),
            Slot::Dropped(cost) => *cost,
            Slot::Waiting => was,
        };
        self.bytes = (self.bytes + cost).saturating_sub(was);
        if let Some(slot) = self.queue.get_mut((seq - self.base) as usize) {
            *slot = s;
        }
    }

    /// The next entry of the new manifest, if it is resolved (dropped ones
    /// are skipped), with its digest when known.
    pub fn pop_ready(&mut self) -> Option<(ManifestEntry, Option<EntryDigest>)> {
        loop {
            let cost = match self.queue.front()? {
                Slot::Waiting => return None,
                Slot::Ready(e) | Slot::Carried(e, _) => e.entry.buffer_cost(),
                Slot::Dropped(cost) => *cost,
            };
            self.bytes = self.bytes.saturating_sub(cost);
            self.base += 1;
            match self.queue.pop_front() {
                Some(Slot::Ready(e)) => return Some((e, None)),
                Some(Slot::Carried(e, d)) => return Some((e, Some(d))),
                _ => {}
            }
        }
    }

    /// Whether every slot has left.
    pub fn is_empty(&self) -> bool {
        self.queue.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use byteback_protocol::{Entry, Kind};

    fn me(path: &[u8]) -> ManifestEntry {
        ManifestEntry {
            entry: Entry {
                path: path.to_vec(),
                kind: Kind::Dir,
                mode: 0o755,
                uid: 0,
                gid: 0,
                mtime_sec: 0,
                mtime_nsec: 0,
                xattrs: vec![],
            },
            hash: [0; 32],
        }
    }

    #[test]
    fn entries_leave_in_walk_order_once_resolved() {
        let mut s = Slots::default();
        let a = s.push(Slot::Ready(me(b"a")), 10).expect("a");
        let b = s.push(Slot::Waiting, 10).expect("b");
        let c = s.push(Slot::Waiting, 10).expect("c");
        s.push(Slot::Ready(me(b"d")), 10).expect("d");
        assert_eq!((a, b, c), (0, 1, 2));
        assert_eq!(s.pop_ready().map(|e| e.0.entry.path), Some(b"a".to_vec()));
        assert_eq!(s.pop_ready(), None, "b is still waiting");
        s.set(c, Slot::Dropped(10), 10);
        assert_eq!(s.pop_ready(), None, "b is still waiting");
        s.set(b, Slot::Ready(me(b"b")), me(b"b").entry.buffer_cost());
        assert_eq!(s.pop_ready().map(|e| e.0.entry.path), Some(b"b".to_vec()));
        assert_eq!(s.pop_ready().map(|e| e.0.entry.path), Some(b"d".to_vec()));
        assert!(s.is_empty());
        assert_eq!(s.bytes, 0);
        assert_eq!(s.push(Slot::Waiting, 1).expect("e"), 4);
    }

    #[test]
    fn too_many_waiting_entries_are_refused() {
        let mut s = Slots::default();
        s.push(Slot::Waiting, 1).expect("first");
        for _ in 1..MAX_PENDING {
            s.push(Slot::Ready(me(b"x")), 1).expect("within the cap");
        }
        let e = s.push(Slot::Ready(me(b"x")), 1).expect_err("over the cap");
        assert!(e.to_string().contains("behind unfinished transfers"), "{e}");
        let mut s = Slots::default();
        let e = s
            .push(Slot::Waiting, MAX_BUFFERED_BYTES + 1)
            .expect_err("over the byte cap");
        assert!(e.to_string().contains("bytes behind"), "{e}");
    }
}
