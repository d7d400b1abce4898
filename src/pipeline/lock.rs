//! The run lock moved to [`crate::durable::lock`]; this path stays for the callers that still
//! name it (the command-line glue, until the application layer names the new one).

pub use crate::durable::lock::{LockError, RunLock};
