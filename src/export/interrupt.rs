//! Stopping a run on SIGTERM or SIGINT without losing what it did.
//!
//! A scheduler stops a job with SIGTERM, a person with Ctrl-C (SIGINT). Dying at once would
//! be safe (a rerun resumes from the checkpoint) but would leave no report and throw away the
//! pages fetched since the last commit. So the first signal only raises an [`Interrupt`]: the
//! export stops taking new pages, commits the complete ones through the normal commit path
//! (parts renamed, checkpoint written) and returns [`super::ExportError::Interrupted`]; the
//! command then writes its report with status `interrupted` and exits 128 + the signal number
//! (130 or 143), as a shell would report the signal. A second signal exits at once, for when
//! the commit itself hangs (a stuck disk): that is a kill, and the next run resumes as after one.

use std::sync::Arc;

use tokio::sync::watch;

/// The signals a run stops on.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum Signal {
    Int,
    Term,
}

impl Signal {
    pub fn name(self) -> &'static str {
        match self {
            Signal::Int => "SIGINT",
            Signal::Term => "SIGTERM",
        }
    }

    /// 128 + the signal number, the shell's convention for "ended by this signal".
    pub fn exit_code(self) -> u8 {
        match self {
            Signal::Int => 128 + 2,
            Signal::Term => 128 + 15,
        }
    }
}

impl std::fmt::Display for Signal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A request to stop, shared by everything a run does. Cloning shares it; the default is
/// never raised unless something calls [`Interrupt::raise`] (or [`install`] does).
#[derive(Clone, Debug)]
pub struct Interrupt {
    tx: Arc<watch::Sender<Option<Signal>>>,
}

impl Default for Interrupt {
    fn default() -> Self {
        Interrupt {
            tx: Arc::new(watch::channel(None).0),
        }
    }
}

impl Interrupt {
    /// Asks the run to stop. Only the first call counts (it decides the exit code).
    pub fn raise(&self, signal: Signal) {
        self.tx.send_if_modified(|s| {
            if s.is_none() {
                *s = Some(signal);
                true
            } else {
                false
            }
        });
    }

    /// The signal that asked the run to stop, if one did.
    pub fn signal(&self) -> Option<Signal> {
        *self.tx.borrow()
    }

    /// Waits until the run is asked to stop.
    pub async fn raised(&self) -> Signal {
        let mut rx = self.tx.subscribe();
        let waited = rx.wait_for(Option::is_some).await.map(|s| *s);
        match waited {
            Ok(Some(signal)) => signal,
            // The sender lives in `self`, so it cannot be gone; never resolve if it were.
            _ => std::future::pending().await,
        }
    }
}

/// Routes SIGINT and SIGTERM to `interrupt` for the rest of the process: the first raises it,
/// a second one exits the process at once with its own exit code. Needs a Tokio runtime.
pub fn install(interrupt: &Interrupt) -> std::io::Result<()> {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        let mut int = signal(SignalKind::interrupt())?;
        let mut term = signal(SignalKind::terminate())?;
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            loop {
                let got = tokio::select! {
                    Some(()) = int.recv() => Signal::Int,
                    Some(()) = term.recv() => Signal::Term,
                    else => return,
                };
                if interrupt.signal().is_some() {
                    tracing::warn!(signal = got.name(), "second signal: exiting at once (the next run resumes from the last commit)");
                    std::process::exit(i32::from(got.exit_code()));
                }
                tracing::warn!(signal = got.name(), "stopping: committing the complete pages and writing the report (a second signal exits at once)");
                interrupt.raise(got);
            }
        });
    }
    #[cfg(not(unix))]
    {
        let interrupt = interrupt.clone();
        tokio::spawn(async move {
            while tokio::signal::ctrl_c().await.is_ok() {
                if interrupt.signal().is_some() {
                    std::process::exit(i32::from(Signal::Int.exit_code()));
                }
                interrupt.raise(Signal::Int);
            }
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_first_signal_decides_and_waiters_wake() {
        let i = Interrupt::default();
        assert_eq!(i.signal(), None);
        let waiter = tokio::spawn({
            let i = i.clone();
            async move { i.raised().await }
        });
        tokio::task::yield_now().await;
        i.raise(Signal::Term);
        i.raise(Signal::Int);
        assert_eq!(waiter.await.unwrap(), Signal::Term);
        assert_eq!(i.signal(), Some(Signal::Term));
        // Raised before anyone waits: resolves at once.
        assert_eq!(i.raised().await, Signal::Term);
    }
}
