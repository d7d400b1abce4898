//! The integration tests: one test binary (one link of the library, not one per file), each
//! file a module. Run one file's tests with `cargo test --release --locked --test it
//! <module>::`, e.g. `--test it snapshots::`.

mod common;

mod auth;
mod children_by;
mod cli;
mod custom_fields;
#[cfg(feature = "delta")]
mod delta;
mod economy;
mod events_export;
mod export;
mod http_hardening;
mod import;
mod import_crash;
mod import_input;
mod listen;
mod listing;
mod object_store;
mod pipeline;
mod resume;
mod runs;
mod shard;
mod skipped;
mod snapshots;
mod terminal;
