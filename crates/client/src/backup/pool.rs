//! The byte-budgeted pool every segment buffer of a backup comes from.
//!
//! File data read, its delta and the compressed chunk (until the writer has
//! sent it) are all lent by one [`BufPool`], so a backup's memory stays
//! bounded whatever the number or size of its files; closing the pool wakes
//! every delta job waiting for room when the backup fails.

use std::sync::{Condvar, Mutex};

use crate::error::{bail, Result};

use super::shared::{lock, wait};

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
