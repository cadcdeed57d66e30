//! The writer's queue: messages on their way to the wire, bounded, and
//! closed for good when the backup fails.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex};

use crate::error::{bail, Result};
use byteback_protocol::ClientMsg;

use super::shared::{lock, wait};

/// A message for the writer, with the pool capacity its data buffer was
/// counted at (0 if it has none from the pool).
pub(super) struct Outgoing {
    pub(super) msg: ClientMsg,
    pub(super) pooled: usize,
}

/// The writer's queue: bounded, and closed for good when the backup fails,
/// which wakes whoever waits on it (the writer for work, the others for room).
pub(super) struct Queue {
    st: Mutex<QueueState>,
    not_empty: Condvar,
    not_full: Condvar,
    cap: usize,
}

#[derive(Default)]
struct QueueState {
    items: VecDeque<Outgoing>,
    closed: bool,
    /// Senders waiting for room.
    pushers: usize,
    /// The writer waits for a message.
    popper: bool,
}

impl Queue {
    pub(super) fn new(cap: usize) -> Self {
        Queue {
            st: Mutex::new(QueueState::default()),
            not_empty: Condvar::new(),
            not_full: Condvar::new(),
            cap,
        }
    }

    /// Queues a message, waiting for room; fails once the queue is closed.
    pub(super) fn push(&self, o: Outgoing) -> Result<()> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup stopped");
            }
            if st.items.len() < self.cap {
                break;
            }
            st.pushers += 1;
            st = wait(&self.not_full, st);
            st.pushers -= 1;
        }
        st.items.push_back(o);
        let wake = st.popper;
        drop(st);
        if wake {
            self.not_empty.notify_one();
        }
        Ok(())
    }

    /// The next message; `None` when there is none and `block` is false.
    /// Fails once the queue is closed.
    pub(super) fn pop(&self, block: bool) -> Result<Option<Outgoing>> {
        let mut st = lock(&self.st);
        loop {
            if st.closed {
                bail!("the backup stopped");
            }
            if let Some(o) = st.items.pop_front() {
                let wake = st.pushers > 0;
                drop(st);
                if wake {
                    self.not_full.notify_one();
                }
                return Ok(Some(o));
            }
            if !block {
                return Ok(None);
            }
            st.popper = true;
            st = wait(&self.not_empty, st);
            st.popper = false;
        }
    }

    pub(super) fn close(&self) {
        let dropped = {
            let mut st = lock(&self.st);
            st.closed = true;
            std::mem::take(&mut st.items)
        };
        drop(dropped);
        self.not_empty.notify_all();
        self.not_full.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[test]
    fn a_closed_queue_wakes_its_waiters() {
        let q = Arc::new(Queue::new(1));
        let out = |n| Outgoing {
            msg: ClientMsg::FileAbort { id: n },
            pooled: 0,
        };
        q.push(out(1)).unwrap();
        let q2 = q.clone();
        let pusher = std::thread::spawn(move || q2.push(out(2)).is_err());
        let popper = {
            let q = Arc::new(Queue::new(1));
            let q3 = q.clone();
            (q, std::thread::spawn(move || q3.pop(true).is_err()))
        };
        std::thread::sleep(Duration::from_millis(50));
        assert!(!pusher.is_finished() && !popper.1.is_finished());
        q.close();
        popper.0.close();
        assert!(pusher.join().unwrap());
        assert!(popper.1.join().unwrap());
        assert!(q.pop(false).is_err());
    }
}
