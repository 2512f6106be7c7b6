//! Progress reporting for long operations (backup, restore, verify, migration).
//!
//! Libraries report through this trait; the CLI draws bars with `indicatif`,
//! the daemon keeps numbers for its API. Nothing here draws anything.

/// Receives progress of one long operation, in bytes or items.
pub trait Progress: Send + Sync {
    /// Sets the total amount of work.
    fn set_total(&self, total: u64);
    /// Adds finished work.
    fn advance(&self, done: u64);
    /// Names the current phase or file.
    fn set_phase(&self, phase: &str);
}

/// Ignores all progress.
#[derive(Debug, Default, Clone, Copy)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn set_total(&self, _: u64) {}
    fn advance(&self, _: u64) {}
    fn set_phase(&self, _: &str) {}
}
