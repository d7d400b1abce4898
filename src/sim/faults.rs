//! Seeded fault injection: which requests fail, and how a failing reply is mangled.
//!
//! Transient faults are drawn per request (numbered draws); a child refusal is a property of
//! the contact and entity (hashed with the seed), since a refusal for good must meet a rerun
//! again.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::RwLock;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;

use super::rng::{hash, Rng};
use super::Faults;

pub(crate) struct Injector {
    faults: RwLock<Faults>,
    seed: u64,
    draws: AtomicU64,
}

/// What happens to one request. `fault` decides the reply; `slow` only delays it.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Plan {
    pub slow: Option<Duration>,
    pub fault: Option<Fault>,
    /// For a successful write: apply it, then answer 502.
    pub ambiguous: bool,
}

#[derive(Clone, Copy, Debug)]
pub(crate) enum Fault {
    /// Answer this 5xx without serving the request.
    Error(StatusCode),
    /// Serve a 200 whose body stops at this fraction of its length.
    Truncate(f64),
    /// Send the headers and this fraction of the body, then break the connection.
    Drop(f64),
}

impl Injector {
    pub(crate) fn new(faults: Faults, seed: u64) -> Injector {
        Injector {
            faults: RwLock::new(faults),
            seed,
            draws: AtomicU64::new(0),
        }
    }

    pub(crate) fn set(&self, faults: Faults) {
        *self.faults.write().unwrap_or_else(|e| e.into_inner()) = faults;
    }

    /// Whether the child list `entity` of `contact_id` is refused for good (403): the same
    /// answer for the same seed, contact and entity, whatever the request order.
    pub(crate) fn refuses_child(&self, contact_id: &str, entity: &str) -> bool {
        let rate = self
            .faults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .child_refusal_rate;
        if rate <= 0.0 {
            return false;
        }
        let key = hash(&[self.seed, 93, hash_str(entity), hash_str(contact_id)]);
        Rng::new(key).chance(rate)
    }

    /// Draws the plan for the next request. Draws are numbered, so a run with the same seed
    /// and the same request order faults the same requests.
    pub(crate) fn plan(&self) -> Plan {
        let f = self
            .faults
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if f.error_rate <= 0.0
            && f.truncate_rate <= 0.0
            && f.slow_rate <= 0.0
            && f.drop_rate <= 0.0
            && f.ambiguous_write_rate <= 0.0
        {
            return Plan::default();
        }
        let n = self.draws.fetch_add(1, Ordering::Relaxed);
        let mut r = Rng::new(hash(&[self.seed, 90, n]));
        let slow = r.chance(f.slow_rate).then_some(f.slow_delay);
        let u = r.unit();
        let fault = if u < f.error_rate {
            let codes = [
                StatusCode::INTERNAL_SERVER_ERROR,
                StatusCode::BAD_GATEWAY,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::GATEWAY_TIMEOUT,
            ];
            Some(Fault::Error(r.pick(&codes)))
        } else if u < f.error_rate + f.truncate_rate {
            Some(Fault::Truncate(r.unit()))
        } else if u < f.error_rate + f.truncate_rate + f.drop_rate {
            Some(Fault::Drop(r.unit()))
        } else {
            None
        };
        Plan {
            slow,
            fault,
            ambiguous: r.chance(f.ambiguous_write_rate),
        }
    }
}

/// Hashes a string (its length and its bytes, 8 at a time).
fn hash_str(s: &str) -> u64 {
    let words: Vec<u64> = std::iter::once(s.len() as u64)
        .chain(s.as_bytes().chunks(8).map(|c| {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            u64::from_le_bytes(b)
        }))
        .collect();
    hash(&words)
}

/// Where to cut a body of `len` bytes: at least one byte kept, at least one lost.
fn cut_at(len: usize, fraction: f64) -> usize {
    if len < 2 {
        return 0;
    }
    (1 + ((len - 2) as f64 * fraction) as usize).min(len - 1)
}

pub(crate) fn truncate(mut body: Vec<u8>, fraction: f64) -> Vec<u8> {
    body.truncate(cut_at(body.len(), fraction));
    body
}

/// A body that yields part of `body` and then fails, so the server aborts the connection
/// with fewer bytes sent than the `Content-Length` announced. The short pause before the
/// failure lets the server flush the headers and the first part, as a connection that dies
/// mid-transfer would.
pub(crate) fn dropping(body: Vec<u8>, fraction: f64) -> Body {
    use futures::StreamExt;
    let cut = cut_at(body.len(), fraction);
    let head = Bytes::from(body).slice(..cut);
    let first = futures::stream::once(async move { Ok::<Bytes, std::io::Error>(head) });
    let fail = futures::stream::once(async {
        tokio::time::sleep(Duration::from_millis(20)).await;
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionAborted,
            "simulated connection drop",
        ))
    });
    Body::from_stream(first.chain(fail))
}
