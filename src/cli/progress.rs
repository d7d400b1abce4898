//! Progress on stderr: an indicatif bar on a terminal, plain periodic log lines otherwise.

use std::io::IsTerminal;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use crate::api::Stats;
use crate::export::Progress;

/// Shows progress until dropped.
pub struct ProgressReporter {
    task: tokio::task::JoinHandle<()>,
    bar: Option<ProgressBar>,
}

impl ProgressReporter {
    /// `quiet` shows nothing; `plain_every` is the interval of log lines when not on a terminal.
    pub fn start(
        progress: Arc<Progress>,
        stats: Arc<Stats>,
        quiet: bool,
        plain_every: Duration,
    ) -> ProgressReporter {
        let started = Instant::now();
        let on_terminal = std::io::stderr().is_terminal();
        if quiet {
            return ProgressReporter {
                task: tokio::spawn(async {}),
                bar: None,
            };
        }
        if on_terminal {
            let bar = ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr_with_hz(5));
            bar.set_style(
                ProgressStyle::with_template("{spinner} [{elapsed_precise}] {wide_bar} {pos}/{len} contacts ({per_sec}, ETA {eta}) {msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            let b = bar.clone();
            let task = tokio::spawn(async move {
                loop {
                    let total = progress.total.load(Relaxed);
                    if total > 0 {
                        b.set_length(total);
                    }
                    b.set_position(progress.contacts.load(Relaxed));
                    let s = stats.snapshot();
                    b.set_message(format!(
                        "| {} child requests, {} retries, {} x429, waited {:.0}s on the limit",
                        s.tasks + s.notes + s.appointments,
                        s.retries,
                        s.rate_limited,
                        s.limiter_wait_secs
                    ));
                    tokio::time::sleep(Duration::from_millis(200)).await;
                }
            });
            ProgressReporter {
                task,
                bar: Some(bar),
            }
        } else {
            let task = tokio::spawn(async move {
                loop {
                    tokio::time::sleep(plain_every).await;
                    let s = stats.snapshot();
                    let done = progress.contacts.load(Relaxed);
                    let total = progress.total.load(Relaxed);
                    let secs = started.elapsed().as_secs_f64().max(0.001);
                    tracing::info!(
                        contacts = done,
                        total,
                        contacts_per_sec = format!("{:.1}", done as f64 / secs),
                        requests = s.attempts,
                        retries = s.retries,
                        rate_limited = s.rate_limited,
                        "progress"
                    );
                }
            });
            ProgressReporter { task, bar: None }
        }
    }
}

impl Drop for ProgressReporter {
    fn drop(&mut self) {
        self.task.abort();
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
