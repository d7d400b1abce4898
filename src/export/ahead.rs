//! The location-wide listings, started before the contact listing ends.
//!
//! The location-wide phase ([`super::wide`]) reads tasks and appointments in chains of round
//! trips: task pages follow each other's offsets, appointment windows go two at a time after
//! the calendar listing. Once the contact listing is over, nothing else fills the location's
//! pace while those chains wait for their replies, so every export ended on them: at 200
//! locations on one machine, a location's last 6 s used about two thirds of its pace
//! (BENCHMARKS.md, "Share, fifth pass").
//!
//! So a full export starts those listings while the contact listing still has a tenth of the
//! location's contacts to go (at least [`LEAD_CONTACTS`]): their requests share the pace with
//! the notes requests of the listing's last pages, and their pages wait in a spool until the
//! phase reads them, in order, as it would have read the server's replies. The phase keeps
//! all its logic (the filter by listed contacts, repeats, commits, the verification sample);
//! only where its pages come from changes. The requests are the ones the phase would have
//! sent, earlier (seconds for a small location, minutes for one of 50,000 contacts); only a
//! run stopped before its phase committed them asks for them again.
//!
//! - **On disk, not in memory**: a location's tasks and appointments are about 1.5 MB per
//!   1,000 contacts, hundreds of MB for 200 locations at once. The spool is an anonymous
//!   temporary file in the state directory (`tempfile::tempfile_in`: the OS deletes it when it
//!   is closed, also after a kill -9); memory holds each page's place in it.
//! - **Not durable**: a run stopped before its phase committed the pages (a signal, the
//!   budget, a failed request, a spool that cannot be written) asks for them again: at most
//!   the phase's own requests, a few per hundred contacts. Dropping [`Fetched`] stops the
//!   fetching. The same holds for the windows when the listing ends with so few contacts
//!   that the phase goes per contact after all.
//! - **Only where the phase's requests do not depend on what the listing finds**: no
//!   incremental state (its changed contacts decide the task batches), no `--business`. The
//!   appointment windows' plan depends on the number of contacts: it is made for the
//!   listing's announced total, and the phase adopts it.
//! - A fetch that ends without its last page (a bug in it) is an error for the phase, never
//!   a listing that looks complete.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use futures::{Stream, StreamExt};
use tokio::sync::{mpsc, oneshot};

use super::ExportPlan;
use crate::api::{ApiError, Client};
use crate::extract::ExtractError;
use crate::schema::Entity;
use crate::wide::{self as engine, EventsPlan, RepeatGuard, WidePage};

/// Contacts still to list, at the least, when the location-wide listings start (a tenth of
/// the location when that is more): about 20 s of the location's pace, more than a small
/// location's task pages take one after another.
pub const LEAD_CONTACTS: u64 = 200;

/// The location-wide listings of one export: waiting for the listing to near its end, then
/// under way.
pub(super) struct Ahead {
    waiting: Option<Waiting>,
    fetched: Fetched,
}

struct Waiting {
    client: Arc<Client>,
    location_id: String,
    dir: PathBuf,
    tasks: bool,
    appointments: bool,
}

/// What [`Ahead`] started: the entities' pages, for the phase to take.
#[derive(Default)]
pub(super) struct Fetched {
    pub tasks: Option<Spooled>,
    pub appointments: Option<AheadEvents>,
}

impl Ahead {
    /// The listings of `plan`'s location-wide phase, to start near the end of the contact
    /// listing. Only for a phase whose requests do not depend on what the listing finds (the
    /// caller's to say: see the module doc).
    pub fn new(client: &Arc<Client>, plan: &ExportPlan, dir: &Path) -> Ahead {
        Ahead {
            waiting: Some(Waiting {
                client: client.clone(),
                location_id: plan.location_id.clone(),
                dir: dir.to_path_buf(),
                tasks: plan.include.tasks,
                appointments: plan.include.appointments,
            }),
            fetched: Fetched::default(),
        }
    }

    /// Nothing to fetch ahead.
    pub fn none() -> Ahead {
        Ahead {
            waiting: None,
            fetched: Fetched::default(),
        }
    }

    /// After each listed page: starts the listings once `listed` of the announced `total`
    /// contacts leave the lead or fewer to go (never with the total unknown).
    pub fn at(&mut self, listed: u64, total: u64) {
        if total == 0 || listed + lead(total) < total {
            return;
        }
        let Some(w) = self.waiting.take() else {
            return;
        };
        tracing::debug!(location = %w.location_id, listed, total, "starting the location-wide listings ahead of their phase");
        if w.tasks {
            self.fetched.tasks = Spooled::start(&w.dir, Entity::Tasks, |pages| {
                spool(
                    engine::location_tasks(
                        w.client.clone(),
                        w.location_id.clone(),
                        None,
                        None,
                        RepeatGuard::default(),
                    ),
                    pages,
                )
            });
        }
        if w.appointments {
            let (tx, plan) = oneshot::channel();
            let (client, location) = (w.client.clone(), w.location_id.clone());
            let pages = Spooled::start(&w.dir, Entity::Appointments, |pages| async move {
                let p = match EventsPlan::ask(&client, &location, total).await {
                    Ok(p) => p,
                    Err(e) => {
                        let _ = tx.send((Err(e), false));
                        return;
                    }
                };
                let worth = p.cheaper_than_per_contact(total);
                let _ = tx.send((Ok(p.clone()), worth));
                if worth {
                    let windows =
                        engine::location_events(client, location, p, None, RepeatGuard::default());
                    spool(windows, pages).await;
                }
            });
            self.fetched.appointments = pages.map(|pages| AheadEvents { plan, pages });
        }
    }

    /// What was started (nothing if the listing ended before the lead, or this run had
    /// nothing to fetch ahead).
    pub fn take(self) -> Fetched {
        self.fetched
    }
}

/// Contacts left to list when the listings start, for an announced `total`.
fn lead(total: u64) -> u64 {
    (total / 10).max(LEAD_CONTACTS)
}

/// The appointments fetched ahead: the window plan (or the calendar listing's error), then
/// the windows' pages.
pub(super) struct AheadEvents {
    plan: oneshot::Receiver<(Result<EventsPlan, ApiError>, bool)>,
    pages: Spooled,
}

impl AheadEvents {
    /// The plan the windows were asked by, and their pages when the plan was cheaper than
    /// per contact for the announced total; `None` if the fetch stopped before planning.
    pub async fn plan(self) -> Option<(Result<EventsPlan, ApiError>, Option<Spooled>)> {
        let (plan, worth) = self.plan.await.ok()?;
        Some((plan, worth.then_some(self.pages)))
    }
}

/// One place in the spool per message: the pages in order, then the end.
enum Msg {
    Page { at: u64, len: usize },
    Failed(ExtractError),
    End,
}

/// One listing's pages as they come, kept in an anonymous temporary file until read.
pub(super) struct Spooled {
    entity: Entity,
    dir: PathBuf,
    file: Arc<Mutex<File>>,
    rx: mpsc::UnboundedReceiver<Msg>,
    _fetch: Task<()>,
}

/// Where the fetching task writes its pages.
struct SpoolWriter {
    entity: Entity,
    dir: PathBuf,
    file: Arc<Mutex<File>>,
    tx: mpsc::UnboundedSender<Msg>,
    end: u64,
}

/// A task of the location's run, stopped when its owner is dropped (the run ended, failed or
/// went on without it): nothing it does outlives the run that asked for it.
pub(super) struct Task<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> Task<T> {
    pub fn spawn(f: impl std::future::Future<Output = T> + Send + 'static) -> Task<T> {
        Task(tokio::spawn(f))
    }

    /// What the task gave; `None` if it was cancelled (the runtime shutting down). A panic
    /// in it goes on here, in its owner.
    pub async fn join(mut self) -> Option<T> {
        match (&mut self.0).await {
            Ok(v) => Some(v),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(_) => None,
        }
    }
}

impl<T> Drop for Task<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

fn spool_error(entity: Entity, dir: &Path, e: &std::io::Error) -> ExtractError {
    ExtractError::Spool {
        entity: entity.name(),
        dir: dir.display().to_string(),
        error: e.to_string(),
    }
}

impl Spooled {
    /// Starts `fetch` on its own task, writing into a new spool; `None` (the phase then asks
    /// the server itself) if no temporary file can be made in `dir`.
    fn start<F, Fut>(dir: &Path, entity: Entity, fetch: F) -> Option<Spooled>
    where
        F: FnOnce(SpoolWriter) -> Fut,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let file = match tempfile::tempfile_in(dir) {
            Ok(f) => Arc::new(Mutex::new(f)),
            Err(e) => {
                tracing::debug!(dir = %dir.display(), error = %e, "no spool for the location-wide {entity}: they are fetched in their phase");
                return None;
            }
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let writer = SpoolWriter {
            entity,
            dir: dir.to_path_buf(),
            file: file.clone(),
            tx,
            end: 0,
        };
        Some(Spooled {
            entity,
            dir: dir.to_path_buf(),
            file,
            rx,
            _fetch: Task::spawn(fetch(writer)),
        })
    }

    /// The pages, in the order they were fetched, as the listing's stream gave them.
    pub fn pages(self) -> impl Stream<Item = Result<WidePage, ExtractError>> + Send {
        futures::stream::unfold(Some(self), |s| async move {
            let mut s = s?;
            // A spooled page is ready at once: between two, the location's other tasks (the
            // other entity, the verification sample's requests) get their turn on its thread.
            tokio::task::yield_now().await;
            let item = match s.rx.recv().await {
                Some(Msg::Page { at, len }) => s.read(at, len),
                Some(Msg::Failed(e)) => Err(e),
                Some(Msg::End) => return None,
                None => Err(spool_error(
                    s.entity,
                    &s.dir,
                    &std::io::Error::other("the fetch ahead ended before its last page"),
                )),
            };
            // After an error nothing more comes: the phase reports it.
            let next = item.is_ok().then_some(s);
            Some((item, next))
        })
    }

    fn read(&self, at: u64, len: usize) -> Result<WidePage, ExtractError> {
        let fail = |e: std::io::Error| spool_error(self.entity, &self.dir, &e);
        let mut buf = vec![0; len];
        {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            f.seek(SeekFrom::Start(at)).map_err(fail)?;
            f.read_exact(&mut buf).map_err(fail)?;
        }
        serde_json::from_slice(&buf).map_err(|e| fail(e.into()))
    }
}

impl SpoolWriter {
    fn append(&mut self, page: &WidePage) -> Result<Msg, ExtractError> {
        let fail = |e: std::io::Error| spool_error(self.entity, &self.dir, &e);
        let bytes = serde_json::to_vec(page).map_err(|e| fail(e.into()))?;
        {
            let mut f = self.file.lock().unwrap_or_else(|e| e.into_inner());
            f.seek(SeekFrom::Start(self.end)).map_err(fail)?;
            f.write_all(&bytes).map_err(fail)?;
        }
        let at = self.end;
        self.end += bytes.len() as u64;
        Ok(Msg::Page {
            at,
            len: bytes.len(),
        })
    }
}

/// Writes `pages` into the spool until the listing ends or fails.
async fn spool(pages: impl Stream<Item = Result<WidePage, ExtractError>>, mut w: SpoolWriter) {
    let mut pages = std::pin::pin!(pages);
    while let Some(page) = pages.next().await {
        let msg = page.and_then(|p| w.append(&p)).unwrap_or_else(Msg::Failed);
        let failed = matches!(msg, Msg::Failed(_));
        if w.tx.send(msg).is_err() || failed {
            return;
        }
    }
    let _ = w.tx.send(Msg::End);
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wide::{WidePos, WideRow};
    use serde_json::value::RawValue;

    fn page(i: u64, last: bool) -> WidePage {
        let raw = |s: String| RawValue::from_string(s).unwrap();
        WidePage {
            rows: (0..3)
                .map(|r| WideRow {
                    raw: raw(format!(
                        r#"{{"id":"t{i}-{r}","title":"Grüße \"{i}\"\n","contactId":"c{r}"}}"#
                    )),
                    id_key: Some(i * 10 + r),
                    contact_id: (r != 2).then(|| format!("c{r}")),
                })
                .collect(),
            repeats: i,
            non_objects: 1,
            next: (!last).then_some(WidePos::Tasks {
                batch: 0,
                skip: (i + 1) * 100,
            }),
        }
    }

    fn same(a: &WidePage, b: &WidePage) {
        assert_eq!(a.rows.len(), b.rows.len());
        for (x, y) in a.rows.iter().zip(&b.rows) {
            assert_eq!(x.raw.get(), y.raw.get(), "the row's text, byte for byte");
            assert_eq!((x.id_key, &x.contact_id), (y.id_key, &y.contact_id));
        }
        assert_eq!(
            (a.repeats, a.non_objects, &a.next),
            (b.repeats, b.non_objects, &b.next)
        );
    }

    async fn collect(s: Spooled) -> Vec<Result<WidePage, ExtractError>> {
        s.pages().collect().await
    }

    #[tokio::test]
    async fn the_phase_reads_every_page_as_fetched_then_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let pages = || (0..5).map(|i| page(i, i == 4));
        let source: Vec<_> = pages().collect();
        let s = Spooled::start(dir.path(), Entity::Tasks, |w| {
            spool(futures::stream::iter(source.into_iter().map(Ok)), w)
        })
        .unwrap();
        let got = collect(s).await;
        assert_eq!(got.len(), pages().count());
        for (g, p) in got.iter().zip(pages()) {
            same(g.as_ref().unwrap(), &p);
        }
        assert_eq!(
            std::fs::read_dir(dir.path()).unwrap().count(),
            0,
            "the spool has no name in the state directory"
        );
    }

    #[tokio::test]
    async fn a_failed_request_reaches_the_phase_after_the_pages_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let items = vec![
            Ok(page(0, false)),
            Err(ExtractError::PageLoop {
                request: "POST /locations/x/tasks/search (skip 100)".into(),
                reason: "the same page again".into(),
            }),
            Ok(page(1, true)),
        ];
        let s = Spooled::start(dir.path(), Entity::Tasks, |w| {
            spool(futures::stream::iter(items), w)
        })
        .unwrap();
        let got = collect(s).await;
        assert_eq!(got.len(), 2, "the page, then the error; nothing after it");
        same(got[0].as_ref().unwrap(), &page(0, false));
        assert!(matches!(got[1], Err(ExtractError::PageLoop { .. })));
    }

    #[tokio::test]
    async fn a_fetch_that_stops_without_its_end_is_an_error_not_a_short_listing() {
        let dir = tempfile::tempdir().unwrap();
        let s = Spooled::start(dir.path(), Entity::Appointments, |mut w| async move {
            let msg = w.append(&page(0, false)).unwrap();
            assert!(w.tx.send(msg).is_ok());
            // Ends here, as a panicking or cancelled fetch would: no `End`.
        })
        .unwrap();
        let got = collect(s).await;
        assert_eq!(got.len(), 2);
        assert!(got[0].is_ok());
        let e = got[1].as_ref().err().unwrap().to_string();
        assert!(
            e.contains("appointments") && e.contains("before its last page"),
            "{e}"
        );
    }

    #[test]
    fn the_listings_start_with_a_tenth_of_the_location_or_200_contacts_to_go() {
        assert_eq!(lead(1_000), 200);
        assert_eq!(lead(50_000), 5_000);
        assert_eq!(lead(150), 200, "a small location: from its first page");
    }
}
