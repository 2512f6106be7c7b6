//! An async lock on ranges of blocks: writes to disjoint blocks run
//! concurrently, while overlapping ones (a copy-on-write racing a write to the
//! same block, a truncate racing a write past the new end) take turns.
//!
//! The set of held ranges is tiny (one per in-flight request), so a linear
//! scan under a mutex beats any interval tree here.

use std::ops::Range;
use std::sync::{Arc, Mutex, PoisonError};

use tokio::sync::Notify;

/// Ranges of blocks currently held; cloned into every guard.
#[derive(Debug, Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, Range<u64>)>>,
    next_id: Mutex<u64>,
    released: Notify,
}

/// Holds a range of blocks until dropped. `Send + 'static`, so it can move
/// into a blocking closure and outlive a cancelled caller.
#[derive(Debug)]
pub struct RangeGuard {
    locks: Arc<RangeLocks>,
    id: u64,
}

impl RangeLocks {
    /// Waits until no held range overlaps `blocks`, then holds it.
    pub async fn lock(self: &Arc<Self>, blocks: Range<u64>) -> RangeGuard {
        let id = {
            let mut next = self.next_id.lock().unwrap_or_else(PoisonError::into_inner);
            *next += 1;
            *next
        };
        loop {
            // Register interest before checking, so a release between the
            // check and the wait still wakes us.
            let notified = self.released.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            {
                let mut held = self.held.lock().unwrap_or_else(PoisonError::into_inner);
                let busy = held
                    .iter()
                    .any(|(_, r)| r.start < blocks.end && blocks.start < r.end);
                if !busy {
                    held.push((id, blocks));
                    return RangeGuard {
                        locks: Arc::clone(self),
                        id,
                    };
                }
            }
            notified.await;
        }
    }
}

impl Drop for RangeGuard {
    fn drop(&mut self) {
        let mut held = self
            .locks
            .held
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        held.retain(|(id, _)| *id != self.id);
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_ones_do_not() {
        let locks = Arc::new(RangeLocks::default());
        let a = locks.lock(0..10).await;
        let _b = locks.lock(10..20).await; // disjoint: immediate
        let l2 = Arc::clone(&locks);
        let mut waiter = tokio::spawn(async move { l2.lock(5..6).await });
        // Still blocked: the timeout only bounds how long we look, it asserts
        // nothing about speed.
        assert!(tokio::time::timeout(Duration::from_millis(20), &mut waiter)
            .await
            .is_err());
        drop(a);
        let guard = waiter.await;
        assert!(guard.is_ok());
    }
}
