//! The byte-budgeted pool every segment buffer of a backup comes from.
//!
//! File data read, its delta and the compressed chunk (until the writer has
//! sent it) are all lent by one [`BufPool`], so a backup's memory stays
//! bounded whatever the number or size of its files; closing the pool wakes
//! every delta job waiting for room when the backup fails.

use std::sync::{Condvar, Mutex};

use crate::error::{bail, Result};

use super::shared::{lock, wait};

/// Buffers of at least this capacity lend a small content a buffer of its
/// own size (see [`BufPool::shrink`]).
pub(super) const SHRINK_FROM: usize = 1 << 20;

/// A buffer lent by a [`BufPool`], with the capacity it is counted at.
pub(super) struct PoolBuf {
    pub(super) buf: Vec<u8>,
    pub(super) counted: usize,
}

/// The segment buffers of a backup. The capacity of every buffer the pool
/// owns, free or lent out (in a worker or queued for the writer), stays
/// within the budget, except that one request is always granted when
/// nothing is lent, so a segment larger than the budget still goes through.
/// Buffers are reused rather than freed, so a large transfer does not pay a
/// fresh mmap and its page faults per segment.
pub(super) struct BufPool {
    st: Mutex<PoolState>,
    cv: Condvar,
    cap: usize,
}

#[derive(Default)]
struct PoolState {
    /// Free buffers, any capacity.
    free: Vec<Vec<u8>>,
    /// Capacity of all the pool's buffers, free and lent.
    total: usize,
    /// Buffers lent out.
    lent: usize,
    /// The backup failed: nobody waits any more.
    closed: bool,
    /// Workers waiting for buffers.
    waiting: usize,
}

impl BufPool {
    pub(super) fn new(cap: usize) -> Self {
        BufPool {
            st: Mutex::new(PoolState::default()),
            cv: Condvar::new(),
            cap,
        }
    }

    /// `k` buffers of capacity at least `len` each, all at once (a worker
    /// never holds some while waiting for more), waiting while they would
    /// take the pool over its budget.
    pub(super) fn take(&self, k: usize, len: usize) -> Result<Vec<PoolBuf>> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup failed");
            }
            // Reuse the largest free buffers; the others may be dropped to make room.
            st.free.sort_unstable_by_key(Vec::capacity);
            let reuse = st.free.len().min(k);
            let keep_from = st.free.len() - reuse;
            let grow: usize = st.free[keep_from..]
                .iter()
                .map(|b| len.saturating_sub(b.capacity()))
                .sum::<usize>()
                + (k - reuse) * len;
            let spare: usize = st.free[..keep_from].iter().map(Vec::capacity).sum();
            if st.total + grow <= self.cap + spare || st.lent == 0 {
                let mut dropped = 0;
                while st.total + grow > self.cap + dropped {
                    let Some(b) = st.free.first() else { break };
                    if st.free.len() <= reuse {
                        break;
                    }
                    dropped += b.capacity();
                    st.free.remove(0);
                }
                st.total -= dropped;
                let at = st.free.len() - reuse;
                let mut out: Vec<PoolBuf> = st
                    .free
                    .split_off(at)
                    .into_iter()
                    .map(|buf| PoolBuf { buf, counted: 0 })
                    .collect();
                for b in &mut out {
                    let before = b.buf.capacity();
                    if before < len {
                        // Contents are scratch: no need to copy them over.
                        b.buf = Vec::with_capacity(len);
                    }
                    b.counted = b.buf.capacity();
                    st.total = st.total + b.counted - before;
                }
                while out.len() < k {
                    let buf = Vec::with_capacity(len);
                    st.total += buf.capacity();
                    out.push(PoolBuf {
                        counted: buf.capacity(),
                        buf,
                    });
                }
                st.lent += k;
                return Ok(out);
            }
            st.waiting += 1;
            st = wait(&self.cv, st);
            st.waiting -= 1;
        }
    }

    /// Takes back a buffer lent at capacity `counted` (it may have grown since).
    pub(super) fn give(&self, buf: Vec<u8>, counted: usize) {
        let wake = {
            let mut st = lock(&self.st);
            st.lent = st.lent.saturating_sub(1);
            st.total = (st.total + buf.capacity()).saturating_sub(counted);
            if st.total > self.cap || st.closed {
                st.total -= buf.capacity().min(st.total);
            } else {
                st.free.push(buf);
            }
            // Only a waiter needs the (system) call.
            st.waiting > 0
        };
        if wake {
            self.cv.notify_all();
        }
    }

    /// `b.buf[from..]` in a buffer of its own length, when that is at most
    /// an eighth of a buffer of [`SHRINK_FROM`] or more, and `b`'s buffer
    /// back among the free ones for the next segment (otherwise `b` and
    /// `from` as they are). A small delta waiting for the writer then holds
    /// its own bytes of the budget rather than a segment's, so the delta
    /// workers are not held up by a queue of them; the large buffer is kept,
    /// not freed and allocated again (which cost peak memory: freed
    /// segment-sized blocks stay in the allocator's arenas).
    pub(super) fn shrink(&self, b: PoolBuf, from: usize) -> (PoolBuf, usize) {
        let len = b.buf.len().saturating_sub(from);
        if b.counted < SHRINK_FROM || len > b.counted / 8 {
            return (b, from);
        }
        {
            let mut st = lock(&self.st);
            // Only within the budget: going over it would free a large buffer
            // on its way back, to be allocated again for the next segment.
            if st.total + len > self.cap || st.closed {
                return (b, from);
            }
            st.total += len;
            st.lent += 1;
        }
        let small = b.buf[from.min(b.buf.len())..].to_vec();
        self.give_back(b);
        (
            PoolBuf {
                counted: len,
                buf: small,
            },
            0,
        )
    }

    pub(super) fn give_back(&self, b: PoolBuf) {
        self.give(b.buf, b.counted);
    }

    pub(super) fn close(&self) {
        {
            let mut st = lock(&self.st);
            st.closed = true;
            st.free.clear();
        }
        self.cv.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    #[test]
    fn pool_keeps_its_budget_and_reuses_buffers() {
        let pool = Arc::new(BufPool::new(10 << 20));
        let a = pool.take(2, 4 << 20).unwrap();
        assert!(a.iter().all(|b| b.buf.capacity() >= 4 << 20));
        // Another 8 MiB would exceed 10 MiB: it waits until some come back.
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.take(2, 4 << 20).map(|v| v.len()));
        std::thread::sleep(std::time::Duration::from_millis(50));
        assert!(!waiter.is_finished());
        for b in a {
            pool.give_back(b);
        }
        assert_eq!(waiter.join().unwrap().unwrap(), 2);
        let st = pool.st.lock().unwrap();
        assert!(st.total <= 10 << 20, "{}", st.total);
        assert_eq!(st.lent, 2);
    }

    /// A small delta in a segment-sized buffer gets a buffer of its own
    /// size and the large one goes back for the next segment, within the
    /// budget only; a large content, or a small buffer, is left as it is.
    #[test]
    fn shrink_lends_small_contents_their_own_size_within_the_budget() {
        let pool = BufPool::new(10 << 20);
        let mut a = pool.take(1, 4 << 20).unwrap().pop().unwrap();
        a.buf.extend_from_slice(&[7u8; 5000]);
        let (small, start) = pool.shrink(a, 1000);
        assert_eq!((small.buf.as_slice(), start), (&[7u8; 4000][..], 0));
        assert_eq!(small.counted, 4000);
        {
            let st = pool.st.lock().unwrap();
            assert_eq!((st.lent, st.free.len()), (1, 1));
            assert!(st.total >= (4 << 20) + 4000 && st.total <= 10 << 20);
        }
        // The large buffer is reused, not allocated again.
        let b = pool.take(1, 4 << 20).unwrap().pop().unwrap();
        assert!(pool.st.lock().unwrap().free.is_empty());
        // More than an eighth of the buffer: kept as it is.
        let mut big = b;
        big.buf.resize(1 << 20, 1);
        let (same, start) = pool.shrink(big, 5);
        assert_eq!(
            (same.buf.len(), start, same.counted >= 4 << 20),
            (1 << 20, 5, true)
        );
        pool.give_back(same);
        // Below SHRINK_FROM: kept as it is.
        let mut little = pool.take(1, 64 << 10).unwrap().pop().unwrap();
        little.buf.push(1);
        let (same, start) = pool.shrink(little, 0);
        assert!(same.buf.capacity() >= 64 << 10 && start == 0);
        pool.give_back(same);
        pool.give_back(small);
        let st = pool.st.lock().unwrap();
        assert_eq!(st.lent, 0);
        assert!(st.total <= 10 << 20, "{}", st.total);
    }

    /// A copy that would take the pool over its budget is not made.
    #[test]
    fn shrink_stays_within_the_budget() {
        let pool = BufPool::new(4 << 20);
        let mut a = pool.take(1, 4 << 20).unwrap().pop().unwrap();
        a.buf.resize(300 << 10, 3);
        let (same, start) = pool.shrink(a, 0);
        assert_eq!((same.buf.len(), start), (300 << 10, 0));
        assert!(same.counted >= 4 << 20);
        pool.give_back(same);
        assert_eq!(pool.st.lock().unwrap().lent, 0);
    }

    #[test]
    fn pool_grants_an_oversized_request_when_idle_and_wakes_on_close() {
        let pool = Arc::new(BufPool::new(1 << 20));
        let big = pool.take(3, 4 << 20).unwrap();
        let p2 = pool.clone();
        let waiter = std::thread::spawn(move || p2.take(1, 16).is_err());
        std::thread::sleep(std::time::Duration::from_millis(50));
        pool.close();
        assert!(waiter.join().unwrap());
        for b in big {
            pool.give_back(b);
        }
        // Buffers above the budget are freed, not kept.
        assert!(pool.st.lock().unwrap().total <= 1 << 20);
    }
}
