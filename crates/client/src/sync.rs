//! Locks that outlive a panicked holder: the one place the client decides
//! what a poisoned mutex means.
//!
//! A thread that panics while holding one of the client's locks has already
//! failed what it was part of (a backup fails through its `Running` guard),
//! and every value guarded here is left consistent between statements, so
//! the data is still fine to read: the poison is dropped, not turned into a
//! second error.

use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

/// Locks `m`, whether or not a holder panicked.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` with `g`, whether or not a holder panicked.
pub(crate) fn wait<'a, T>(cv: &Condvar, g: MutexGuard<'a, T>) -> MutexGuard<'a, T> {
    cv.wait(g).unwrap_or_else(PoisonError::into_inner)
}

/// Waits on `cv` with `g` for at most `limit`, whether or not a holder panicked.
pub(crate) fn wait_timeout<'a, T>(
    cv: &Condvar,
    g: MutexGuard<'a, T>,
    limit: Duration,
) -> MutexGuard<'a, T> {
    cv.wait_timeout(g, limit)
        .unwrap_or_else(PoisonError::into_inner)
        .0
}
