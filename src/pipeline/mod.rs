//! Kept for the lock until it moves (issue 12).
pub mod lock;
