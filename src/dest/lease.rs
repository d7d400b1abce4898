//! The run lock of a bucket: a lease object, since an object store has no file locks.
//!
//! `…/export.lock` in the bucket holds who has it and until when ([`Holder`]). It is taken
//! with a conditional write (create-if-absent), renewed every [`TTL`]`/4` with a write
//! conditional on the version this run wrote last, and deleted on release. A run that finds
//! the lease held refuses at once ([`LockError::Busy`]), unless:
//! - it has expired (its holder stopped renewing: killed, or its machine gone): taken over,
//!   with a write conditional on the version read, so of two runs taking over one wins;
//! - its holder is a process of this machine that no longer runs (a kill -9 and a rerun here,
//!   the common case): taken over at once rather than after the lease runs out.
//!
//! A run whose renewal finds the lease taken over (it stalled for longer than the lease) stops
//! committing ([`LeaseState`]), and so does one that could not renew it for most of its
//! term: the other run owns the location now.
//!
//! This needs a store with conditional writes: S3 (since 2024) and most S3-compatible
//! servers, GCS and Azure have them.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion};
use serde::{Deserialize, Serialize};

use super::remote::{locked, LeaseState, Remote};
use crate::durable::lock::LockError;

/// How long a lease lasts without renewal.
pub const TTL: Duration = Duration::from_secs(60);

/// The lease object's content.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
struct Holder {
    host: String,
    pid: u32,
    /// Milliseconds since the epoch.
    expires_at: i64,
    /// Which boot of which kernel, which pid namespace, and when the process started: a
    /// holder is known dead on this machine only when all of them are this process's (a
    /// hostname alone is shared by containers; a pid alone is reused, and is 1 again in every
    /// restarted container). Empty when unknown (not Linux).
    #[serde(default)]
    boot: String,
    #[serde(default)]
    pid_ns: String,
    #[serde(default)]
    started: String,
}

/// What `Holder` says of this process.
#[derive(Clone, Debug, Default)]
struct Me {
    host: String,
    boot: String,
    pid_ns: String,
    started: String,
}

impl Me {
    fn now() -> Me {
        let read = |p: &str| {
            std::fs::read_to_string(p)
                .map(|s| s.trim().to_owned())
                .unwrap_or_default()
        };
        Me {
            host: host(),
            boot: read("/proc/sys/kernel/random/boot_id"),
            pid_ns: std::fs::read_link("/proc/self/ns/pid")
                .map(|p| p.display().to_string())
                .unwrap_or_default(),
            started: start_time(std::process::id()).unwrap_or_default(),
        }
    }

    /// Whether `h` was a process of this boot, in this pid namespace, that has ended (its
    /// pid is gone, or now belongs to a process started at another time).
    fn outlived(&self, h: &Holder) -> bool {
        let same_place = !self.boot.is_empty()
            && !self.pid_ns.is_empty()
            && h.host == self.host
            && h.boot == self.boot
            && h.pid_ns == self.pid_ns;
        same_place && !h.started.is_empty() && start_time(h.pid).is_none_or(|now| now != h.started)
    }
}

/// The start time of process `pid` (field 22 of `/proc/<pid>/stat`, clock ticks since boot),
/// `None` if there is no such process (or no /proc).
fn start_time(pid: u32) -> Option<String> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces: count after it.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19).map(str::to_owned)
}

#[derive(Debug)]
pub struct Lease {
    remote: Arc<Remote>,
    rel: String,
    renewal: tokio::task::JoinHandle<()>,
    version: Arc<std::sync::Mutex<UpdateVersion>>,
    state: Arc<LeaseState>,
}

fn host() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/proc/sys/kernel/hostname")
                .ok()
                .map(|h| h.trim().to_owned())
        })
        .unwrap_or_default()
}

fn now_ms() -> i64 {
    crate::timefmt::now_millis()
}

fn body(me: &Me) -> Vec<u8> {
    serde_json::to_vec(&Holder {
        host: me.host.clone(),
        pid: std::process::id(),
        expires_at: now_ms() + TTL.as_millis() as i64,
        boot: me.boot.clone(),
        pid_ns: me.pid_ns.clone(),
        started: me.started.clone(),
    })
    .unwrap_or_default()
}

impl Lease {
    pub fn acquire(remote: Arc<Remote>, rel: &str) -> Result<Lease, LockError> {
        let io = |e: super::DestError| LockError::Io {
            path: PathBuf::from(remote.url_of(rel)),
            source: e.into(),
        };
        let me = Me::now();
        let version = match remote.put_new(rel, body(&me)).map_err(io)? {
            Some(v) => v,
            None => {
                let Some((bytes, seen)) = remote.get_versioned(rel).map_err(io)? else {
                    // Released between the two requests: try once more.
                    return match remote.put_new(rel, body(&me)).map_err(io)? {
                        Some(v) => Ok(Lease::start(remote, rel, v)),
                        None => Err(busy(&remote, rel, "unknown")),
                    };
                };
                let holder: Option<Holder> = serde_json::from_slice(&bytes).ok();
                let stale = match &holder {
                    // Unreadable: written by something else, or damaged; it cannot be renewed.
                    None => true,
                    Some(h) => h.expires_at < now_ms() || me.outlived(h),
                };
                if !stale {
                    let who = holder.map_or_else(String::new, |h| {
                        format!(
                            "{} on {}, lease until {}",
                            h.pid,
                            if h.host.is_empty() {
                                "an unknown host"
                            } else {
                                &h.host
                            },
                            crate::timefmt::format_iso_millis(h.expires_at)
                        )
                    });
                    return Err(busy(&remote, rel, &who));
                }
                match remote.put_if(rel, body(&me), seen).map_err(io)? {
                    Some(v) => {
                        tracing::info!(lock = %remote.url_of(rel), "took over the lease of a run that ended without releasing it");
                        v
                    }
                    None => return Err(busy(&remote, rel, "another run took it over first")),
                }
            }
        };
        Ok(Lease::start(remote, rel, version))
    }

    fn start(remote: Arc<Remote>, rel: &str, version: UpdateVersion) -> Lease {
        let version = Arc::new(std::sync::Mutex::new(version));
        // Held for sure while renewed within three quarters of the lease: the last quarter is
        // the margin for clocks and delays before another run may find it lapsed.
        let state = Arc::new(LeaseState {
            lost: AtomicBool::new(false),
            renewed: std::sync::Mutex::new(std::time::Instant::now()),
            term: TTL - TTL / 4,
        });
        remote.register_lease(rel, state.clone());
        let renewal = {
            let (store, key, me) = (remote.store(), remote.key_of(rel), Me::now());
            let version = version.clone();
            let state = state.clone();
            remote.spawn(async move {
                let mut tick = tokio::time::interval(TTL / 4);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let current = locked(&version).clone();
                    let opts = PutOptions::from(PutMode::Update(current));
                    let asked = std::time::Instant::now();
                    match store.put_opts(&key, PutPayload::from(body(&me)), opts).await {
                        Ok(r) => {
                            // Valid from when it was asked for, not from the answer.
                            *locked(&state.renewed) = asked;
                            *locked(&version) = UpdateVersion {
                                e_tag: r.e_tag,
                                version: r.version,
                            };
                        }
                        Err(object_store::Error::Precondition { .. }
                        | object_store::Error::NotFound { .. }) => {
                            state.lost.store(true, Ordering::SeqCst);
                            tracing::error!(lock = %key, "this run's lease was taken over by another run: it stops committing");
                            return;
                        }
                        // A failed renewal is tried again at the next tick; the lease lasts
                        // for four.
                        Err(e) => tracing::warn!(lock = %key, error = %e, "cannot renew the lease"),
                    }
                }
            })
        };
        Lease {
            remote,
            rel: rel.to_owned(),
            renewal,
            version,
            state,
        }
    }
}

fn busy(remote: &Remote, rel: &str, who: &str) -> LockError {
    LockError::Busy {
        path: PathBuf::from(remote.url_of(rel)),
        pid: who.to_owned(),
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.renewal.abort();
        self.remote.unregister_lease(&self.rel);
        if self.state.lost.load(Ordering::SeqCst) {
            return;
        }
        // Deleted only while it is still this run's (a conditional delete is not in every
        // store's API: the version is compared first).
        let (store, key) = (self.remote.store(), self.remote.key_of(&self.rel));
        let mine = locked(&self.version).clone();
        self.remote.block(async move {
            if let Ok(meta) = store.head(&key).await {
                if meta.e_tag == mine.e_tag {
                    let _ = store.delete(&key).await;
                }
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn holder(me: &Me, pid: u32, started: &str) -> Holder {
        Holder {
            host: me.host.clone(),
            pid,
            expires_at: now_ms() + 60_000,
            boot: me.boot.clone(),
            pid_ns: me.pid_ns.clone(),
            started: started.to_owned(),
        }
    }

    #[cfg(target_os = "linux")]
    #[test]
    fn a_holder_is_taken_for_dead_only_on_this_boot_and_pid_namespace_when_its_process_ended() {
        let me = Me::now();
        // This very process: alive.
        assert!(!me.outlived(&holder(&me, std::process::id(), &me.started)));
        // Its pid, but a process started at another time (a restarted container's pid 1).
        assert!(me.outlived(&holder(&me, std::process::id(), "1")));
        // A pid no process has.
        assert!(me.outlived(&holder(&me, u32::MAX - 7, "12345")));
        // Another container with the same hostname (another pid namespace) or another boot:
        // never taken early, whatever its pid.
        let other_ns = Holder {
            pid_ns: "pid:[1]".into(),
            ..holder(&me, u32::MAX - 7, "12345")
        };
        assert!(!me.outlived(&other_ns));
        let other_boot = Holder {
            boot: "another-boot".into(),
            ..holder(&me, u32::MAX - 7, "12345")
        };
        assert!(!me.outlived(&other_boot));
    }

    #[test]
    fn a_lease_not_renewed_for_its_term_no_longer_allows_writes() {
        let now = std::time::Instant::now();
        let st = LeaseState {
            lost: AtomicBool::new(false),
            renewed: std::sync::Mutex::new(now),
            term: TTL - TTL / 4,
        };
        assert!(st.valid());
        // Last renewed a whole lease ago.
        if let Some(then) = now.checked_sub(TTL) {
            *st.renewed.lock().unwrap() = then;
            assert!(!st.valid(), "not renewed within its term");
            *st.renewed.lock().unwrap() = now;
        }
        st.lost.store(true, Ordering::SeqCst);
        assert!(!st.valid(), "taken over");
    }
}
