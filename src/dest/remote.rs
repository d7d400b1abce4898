//! An object store as a destination: the connection, the work directory, and the blocking
//! bridge the engine's synchronous writers use.
//!
//! # Runtime
//! The engine writes parts on its own OS thread and commits from async code on a
//! current-thread runtime; `object_store` is async. A [`Remote`] owns a small multi-thread
//! runtime of its own (one worker) that runs every store request; [`Remote::block`] waits for
//! one from any thread (from inside a runtime, through a scoped thread, since a runtime cannot
//! be blocked on from within another). Waiting is bounded to one chunk's upload at a time per
//! part, so a slow bucket slows the writer, never fills memory.
//!
//! # Plain http
//! Credentials are signed into every request. An `http://` endpoint (`AWS_ENDPOINT`,
//! `AZURE_STORAGE_ENDPOINT`) is accepted only on loopback (a test server on this machine);
//! any other host must be https, whatever `*_ALLOW_HTTP` says.

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use bytes::Bytes;
use object_store::path::Path as Key;
use object_store::{
    ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, UpdateVersion, WriteMultipart,
};

use super::DestError;

/// Bytes per multipart chunk: S3's minimum for every chunk but the last. Memory per open
/// part is at most this, plus [`IN_FLIGHT`] chunks being uploaded.
pub const CHUNK: usize = 5 * 1024 * 1024;
/// Chunk uploads of one part in flight at once.
const IN_FLIGHT: usize = 2;

/// A connected object store under one prefix, with its local work directory.
pub struct Remote {
    store: Arc<dyn ObjectStore>,
    prefix: Key,
    /// `scheme://bucket/prefix`, without anything secret (there is nothing secret in a URL
    /// this tool accepts, see [`super::Target`]).
    url: String,
    work: PathBuf,
    rt: Option<tokio::runtime::Runtime>,
    /// What each file of the work directory was when last uploaded or downloaded, by its key
    /// relative to the prefix: a sync uploads only what changed, and deletes from the bucket
    /// what it knows is gone locally.
    synced: Mutex<HashMap<String, Stamp>>,
    /// The leases this process holds, by the `location_id=<id>` path segment they guard (the
    /// segment of `_state/location_id=<id>/export.lock`): every write under a path with that
    /// segment checks its lease first ([`Remote::check_lease`]).
    leases: Mutex<HashMap<String, Arc<LeaseState>>>,
}

/// What the renewal of a lease ([`super::lease`]) knows of it, read before every write under
/// its location ([`Remote::check_lease`]).
#[derive(Debug)]
pub(super) struct LeaseState {
    pub(super) lost: std::sync::atomic::AtomicBool,
    /// When the last renewal that succeeded was asked for.
    pub(super) renewed: Mutex<std::time::Instant>,
    /// How long after a renewal the lease is held for sure.
    pub(super) term: std::time::Duration,
}

impl LeaseState {
    /// Held for sure: not taken over, and renewed recently enough that no other run can
    /// have found it lapsed.
    pub(super) fn valid(&self) -> bool {
        !self.lost.load(std::sync::atomic::Ordering::SeqCst)
            && locked(&self.renewed).elapsed() < self.term
    }
}

impl std::fmt::Debug for Remote {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Remote({})", self.url)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Stamp {
    len: u64,
    modified: Option<SystemTime>,
}

impl Stamp {
    fn of(path: &Path) -> io::Result<Stamp> {
        let m = std::fs::metadata(path)?;
        Ok(Stamp {
            len: m.len(),
            modified: m.modified().ok(),
        })
    }
}

/// `m`'s guard, also after a thread panicked holding it (what it guards stays consistent:
/// each update is one insert or remove).
pub(super) fn locked<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `url` without user, password, query or fragment: what may be shown.
pub fn redact(url: &url::Url) -> String {
    let mut u = url.clone();
    let _ = u.set_username("");
    let _ = u.set_password(None);
    u.set_query(None);
    u.set_fragment(None);
    u.to_string()
}

/// The directory mirroring a bucket's state files on this machine:
/// `$CONTACTS_ETL_WORK_DIR/<bucket>-<hash of the URL>` (default under the system's temporary
/// directory). It may be lost at any time (a new pod): a run pulls what it needs from the
/// bucket.
pub fn work_dir(url: &url::Url) -> PathBuf {
    use std::hash::{Hash, Hasher};
    let base = std::env::var_os("CONTACTS_ETL_WORK_DIR")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| std::env::temp_dir().join("contacts-etl"));
    let mut h = std::collections::hash_map::DefaultHasher::new();
    redact(url).hash(&mut h);
    let bucket: String = url
        .host_str()
        .unwrap_or("bucket")
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' {
                c
            } else {
                '_'
            }
        })
        .take(40)
        .collect();
    base.join(format!("{bucket}-{:016x}", h.finish()))
}

fn is_loopback(endpoint: &str) -> bool {
    let Ok(u) = url::Url::parse(endpoint) else {
        return false;
    };
    match u.host() {
        Some(url::Host::Domain(d)) => d.eq_ignore_ascii_case("localhost"),
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        None => false,
    }
}

/// `Some(allow_http)` for a configured endpoint: whether it is plain http (then loopback);
/// an error for plain http elsewhere.
fn check_endpoint(url: &str, endpoint: Option<String>) -> Result<bool, DestError> {
    let Some(ep) = endpoint.filter(|e| !e.is_empty()) else {
        return Ok(false);
    };
    if !ep
        .get(..7)
        .is_some_and(|s| s.eq_ignore_ascii_case("http://"))
    {
        return Ok(false);
    }
    if is_loopback(&ep) {
        return Ok(true);
    }
    Err(DestError {
        action: "connect to",
        what: url.to_owned(),
        detail: format!(
            "the endpoint {} is plain http: the credentials would cross the network unencrypted",
            crate::schema::truncate_for_message(&ep, 80)
        ),
        hint: "\nhint: use an https:// endpoint (plain http is accepted for a loopback test server only)".into(),
    })
}

fn build(url: &url::Url) -> Result<(Arc<dyn ObjectStore>, Key), DestError> {
    let shown = redact(url);
    let err = |e: object_store::Error| {
        DestError {
        action: "connect to",
        what: shown.clone(),
        detail: message(&e),
        hint: "\nhint: credentials and settings come from the environment (AWS_*, GOOGLE_*, AZURE_*); see the README's \"Object storage\" section".into(),
    }
    };
    let store: Arc<dyn ObjectStore> = match url.scheme() {
        "s3" | "s3a" => {
            use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey};
            let b = AmazonS3Builder::from_env().with_url(url.as_str());
            let endpoint = b
                .get_config_value(&AmazonS3ConfigKey::S3Endpoint)
                .or_else(|| b.get_config_value(&AmazonS3ConfigKey::Endpoint));
            let http = check_endpoint(&shown, endpoint)?;
            Arc::new(b.with_allow_http(http).build().map_err(err)?)
        }
        "gs" => {
            use object_store::gcp::GoogleCloudStorageBuilder;
            Arc::new(
                GoogleCloudStorageBuilder::from_env()
                    .with_url(url.as_str())
                    .build()
                    .map_err(err)?,
            )
        }
        _ => {
            use object_store::azure::{AzureConfigKey, MicrosoftAzureBuilder};
            let b = MicrosoftAzureBuilder::from_env().with_url(url.as_str());
            let emulator = b
                .get_config_value(&AzureConfigKey::UseEmulator)
                .is_some_and(|v| v.eq_ignore_ascii_case("true"));
            let http =
                emulator || check_endpoint(&shown, b.get_config_value(&AzureConfigKey::Endpoint))?;
            Arc::new(b.with_allow_http(http).build().map_err(err)?)
        }
    };
    let prefix = Key::from_url_path(url.path().trim_matches('/')).map_err(|e| DestError {
        action: "connect to",
        what: shown.clone(),
        detail: format!("the prefix is not a valid object path: {e}"),
        hint: String::new(),
    })?;
    Ok((store, prefix))
}

/// An `object_store` error as one line for a message: its own text, without control
/// characters, bounded.
fn message(e: &object_store::Error) -> String {
    let text: String = e
        .to_string()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    crate::schema::truncate_for_message(&text, 400)
}

fn hint_for(e: &object_store::Error) -> String {
    let credentials = "\nhint: check the credentials in the environment (AWS_*, GOOGLE_*, AZURE_*) and that they may list, read, write and delete under this prefix";
    match e {
        object_store::Error::NotFound { .. } => {
            "\nhint: check that the bucket exists and the URL names it".into()
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => credentials.into(),
        // S3 reports refused credentials as a generic error with the status and its code.
        _ => {
            let text = e.to_string();
            let refused = [
                "401 Unauthorized",
                "403 Forbidden",
                "SignatureDoesNotMatch",
                "InvalidAccessKeyId",
                "AccessDenied",
                "ExpiredToken",
            ];
            if refused.iter().any(|r| text.contains(r)) {
                credentials.into()
            } else if text.contains("NoSuchBucket") {
                "\nhint: check that the bucket exists and the URL names it".into()
            } else {
                String::new()
            }
        }
    }
}

impl Remote {
    /// Connects to the store `url` names and checks it answers (one list request).
    pub fn connect(url: &url::Url) -> Result<Remote, DestError> {
        let shown = redact(url);
        let (store, prefix) = build(url)?;
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("contacts-etl-store")
            .enable_all()
            .build()
            .map_err(|e| DestError {
                action: "connect to",
                what: shown.clone(),
                detail: format!("cannot start the upload runtime: {e}"),
                hint: String::new(),
            })?;
        let work = work_dir(url);
        std::fs::create_dir_all(&work).map_err(|e| DestError {
            action: "create the work directory for",
            what: shown.clone(),
            detail: format!("{}: {e}", work.display()),
            hint: "\nhint: set CONTACTS_ETL_WORK_DIR to a writable directory".into(),
        })?;
        let remote = Remote {
            store,
            prefix,
            url: shown.trim_end_matches('/').to_owned(),
            work,
            rt: Some(rt),
            synced: Mutex::new(HashMap::new()),
            leases: Mutex::new(HashMap::new()),
        };
        let probe = remote.prefix.clone();
        let store = remote.store.clone();
        remote
            .block(async move { store.list_with_delimiter(Some(&probe)).await })
            .map_err(|e| remote.error("list", "", &e))?;
        Ok(remote)
    }

    pub fn work_dir(&self) -> &Path {
        &self.work
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    /// A client of its own for the store (rooted at the bucket), the prefix under which this
    /// destination's keys live, and the URL. Its own, so that its connections are made and
    /// used on the caller's runtime only: one of the uploads' pooled connections used from
    /// another runtime stalls when that runtime blocks on an upload ([`Remote::block`]).
    #[cfg(feature = "delta")]
    pub(crate) fn store_and_prefix(
        &self,
    ) -> Result<(Arc<dyn ObjectStore>, Key, String), DestError> {
        let url = url::Url::parse(&self.url).map_err(|e| DestError {
            action: "connect to",
            what: self.url.clone(),
            detail: e.to_string(),
            hint: String::new(),
        })?;
        let (store, prefix) = build(&url)?;
        Ok((store, prefix, self.url.clone()))
    }

    /// The URL of `rel` (relative to the prefix).
    pub fn url_of(&self, rel: &str) -> String {
        if rel.is_empty() {
            self.url.clone()
        } else {
            format!("{}/{rel}", self.url)
        }
    }

    fn key(&self, rel: &str) -> Key {
        let mut key = self.prefix.clone();
        key.extend(rel.split('/').filter(|s| !s.is_empty()));
        key
    }

    fn error(&self, action: &'static str, rel: &str, e: &object_store::Error) -> DestError {
        DestError {
            action,
            what: self.url_of(rel),
            detail: message(e),
            hint: hint_for(e),
        }
    }

    fn runtime(&self) -> &tokio::runtime::Runtime {
        // Taken only by `drop`.
        self.rt
            .as_ref()
            .expect("the store runtime lives as long as the Remote")
    }

    /// Runs `f` on the store's runtime and waits for it, from any thread.
    pub(super) fn block<T: Send>(&self, f: impl std::future::Future<Output = T> + Send) -> T {
        let rt = self.runtime();
        if tokio::runtime::Handle::try_current().is_err() {
            return rt.block_on(f);
        }
        std::thread::scope(|s| {
            s.spawn(|| rt.block_on(f))
                .join()
                .unwrap_or_else(|p| std::panic::resume_unwind(p))
        })
    }

    /// The `location_id=<id>` segment of `rel`, if any.
    fn guarded(rel: &str) -> Option<&str> {
        rel.split('/').find(|seg| seg.starts_with("location_id="))
    }

    pub(super) fn register_lease(&self, lock_rel: &str, state: Arc<LeaseState>) {
        if let Some(seg) = Self::guarded(lock_rel) {
            locked(&self.leases).insert(seg.to_owned(), state);
        }
    }

    pub(super) fn unregister_lease(&self, lock_rel: &str) {
        if let Some(seg) = Self::guarded(lock_rel) {
            locked(&self.leases).remove(seg);
        }
    }

    /// Refuses a write under a location whose lease this process may no longer hold: taken
    /// over, or not renewed for so long that another run may take it over. (A run stalled
    /// past its lease must not overwrite what the run that took over writes.)
    fn check_lease(&self, rel: &str) -> Result<(), DestError> {
        let Some(seg) = Self::guarded(rel) else {
            return Ok(());
        };
        let state = locked(&self.leases).get(seg).cloned();
        match state {
            Some(st) if !st.valid() => Err(DestError {
                action: "write",
                what: self.url_of(rel),
                detail: "this run's lease on the location's lock lapsed (it could not be renewed in time, or another run took it over)".into(),
                hint: "\nhint: nothing more is written by this run; rerun to resume (the lock tells whether another run has the location)".into(),
            }),
            _ => Ok(()),
        }
    }

    /// Starts a multipart upload to `rel`.
    pub(super) fn create(self: Arc<Self>, rel: &str) -> io::Result<Upload> {
        let key = self.key(rel);
        let store = self.store.clone();
        let upload = self
            .block(async move { store.put_multipart(&key).await })
            .map_err(|e| self.error("start uploading", rel, &e))?;
        Ok(Upload {
            writer: Some(WriteMultipart::new_with_chunk_size(upload, CHUNK)),
            rel: rel.to_owned(),
            bytes: 0,
            since_wait: 0,
            remote: self,
        })
    }

    pub(super) fn list(&self, rel_dir: &str) -> Result<Vec<String>, DestError> {
        let key = self.key(rel_dir);
        let store = self.store.clone();
        let listed = self
            .block(async move { store.list_with_delimiter(Some(&key)).await })
            .map_err(|e| self.error("list", rel_dir, &e))?;
        Ok(listed
            .objects
            .iter()
            .filter_map(|o| o.location.filename().map(str::to_owned))
            .collect())
    }

    pub(super) fn delete(&self, rel: &str) -> Result<(), DestError> {
        self.check_lease(rel)?;
        let key = self.key(rel);
        let store = self.store.clone();
        match self.block(async move { store.delete(&key).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => {}
            Err(e) => return Err(self.error("delete", rel, &e)),
        }
        locked(&self.synced).remove(rel);
        Ok(())
    }

    pub(super) fn exists(&self, rel: &str) -> Result<bool, DestError> {
        let key = self.key(rel);
        let store = self.store.clone();
        match self.block(async move { store.head(&key).await }) {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(self.error("look for", rel, &e)),
        }
    }

    /// Uploads the local file `path` to `rel`: in one request up to [`CHUNK`] bytes, else as
    /// a multipart upload read a chunk at a time.
    pub(super) fn upload(&self, path: &Path, rel: &str) -> Result<(), DestError> {
        self.check_lease(rel)?;
        let local = |e: io::Error| DestError {
            action: "upload",
            what: self.url_of(rel),
            detail: format!("reading {}: {e}", path.display()),
            hint: String::new(),
        };
        let stamp = Stamp::of(path).map_err(local)?;
        let key = self.key(rel);
        let store = self.store.clone();
        let result = if stamp.len <= CHUNK as u64 {
            let bytes = std::fs::read(path).map_err(local)?;
            self.block(async move { store.put(&key, PutPayload::from(bytes)).await.map(|_| ()) })
        } else {
            let mut file = std::fs::File::open(path).map_err(local)?;
            self.block(async move {
                use std::io::Read;
                let mut w =
                    WriteMultipart::new_with_chunk_size(store.put_multipart(&key).await?, CHUNK);
                let mut buf = vec![0u8; CHUNK];
                loop {
                    let n = match file.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => n,
                        Err(e) => {
                            let _ = w.abort().await;
                            return Err(object_store::Error::Generic {
                                store: "local file",
                                source: Box::new(e),
                            });
                        }
                    };
                    w.put(Bytes::copy_from_slice(&buf[..n]));
                    w.wait_for_capacity(IN_FLIGHT).await?;
                }
                w.finish().await.map(|_| ())
            })
        };
        result.map_err(|e| self.error("upload", rel, &e))?;
        locked(&self.synced).insert(rel.to_owned(), stamp);
        Ok(())
    }

    /// Downloads `rel` into the local file `path`, replacing it durably.
    fn download(&self, rel: &str, path: &Path) -> Result<(), DestError> {
        let key = self.key(rel);
        let store = self.store.clone();
        let bytes = self
            .block(async move { store.get(&key).await?.bytes().await })
            .map_err(|e| self.error("download", rel, &e))?;
        let local = |e: io::Error| DestError {
            action: "download",
            what: self.url_of(rel),
            detail: format!("writing {}: {e}", path.display()),
            hint: String::new(),
        };
        crate::durable::write(path, &bytes).map_err(|e| local(e.into()))?;
        let stamp = Stamp::of(path).map_err(local)?;
        locked(&self.synced).insert(rel.to_owned(), stamp);
        Ok(())
    }

    /// See [`super::Dest::sync_state`].
    pub(super) fn sync_dir(&self, dir: &Path, rel_dir: &str) -> Result<(), DestError> {
        self.check_lease(rel_dir)?;
        let mut present = Vec::new();
        let entries = match std::fs::read_dir(dir) {
            Ok(e) => e.flatten().collect::<Vec<_>>(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Vec::new(),
            Err(e) => {
                return Err(DestError {
                    action: "sync",
                    what: self.url_of(rel_dir),
                    detail: format!("listing {}: {e}", dir.display()),
                    hint: String::new(),
                })
            }
        };
        let mut changed = Vec::new();
        for entry in entries {
            let name = entry.file_name().to_string_lossy().into_owned();
            if !is_state_file(&name) || !entry.file_type().is_ok_and(|t| t.is_file()) {
                continue;
            }
            let rel = format!("{rel_dir}/{name}");
            present.push(rel.clone());
            let Ok(stamp) = Stamp::of(&entry.path()) else {
                continue;
            };
            let known = locked(&self.synced).get(&rel).copied();
            if known != Some(stamp) {
                changed.push((name, rel));
            }
        }
        // The checkpoint names the other files: it goes last.
        changed.sort_by_key(|(name, _)| name == "checkpoint.json");
        for (name, rel) in &changed {
            self.upload(&dir.join(name), rel)?;
        }
        let gone: Vec<String> = locked(&self.synced)
            .keys()
            .filter(|k| {
                k.strip_prefix(rel_dir)
                    .and_then(|r| r.strip_prefix('/'))
                    .is_some_and(|r| !r.contains('/'))
                    && !present.contains(k)
            })
            .cloned()
            .collect();
        for rel in gone {
            self.delete(&rel)?;
        }
        Ok(())
    }

    /// See [`super::Dest::pull_state`].
    pub(super) fn pull_dir(&self, dir: &Path, rel_dir: &str) -> Result<(), DestError> {
        let remote: Vec<String> = self
            .list(rel_dir)?
            .into_iter()
            .filter(|n| is_state_file(n))
            .collect();
        if let Ok(entries) = std::fs::read_dir(dir) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if is_state_file(&name) && !remote.contains(&name) {
                    let _ = std::fs::remove_file(entry.path());
                }
            }
        }
        for name in &remote {
            self.download(&format!("{rel_dir}/{name}"), &dir.join(name))?;
        }
        Ok(())
    }

    /// Writes `body` to `rel` if nothing is there: `Ok(Some(version))`, or `Ok(None)` when an
    /// object already is.
    pub(super) fn put_new(
        &self,
        rel: &str,
        body: Vec<u8>,
    ) -> Result<Option<UpdateVersion>, DestError> {
        self.put_mode(rel, body, PutMode::Create)
    }

    /// Replaces `rel` by `body` if it is still at `version`: `Ok(None)` when it is not.
    pub(super) fn put_if(
        &self,
        rel: &str,
        body: Vec<u8>,
        version: UpdateVersion,
    ) -> Result<Option<UpdateVersion>, DestError> {
        self.put_mode(rel, body, PutMode::Update(version))
    }

    fn put_mode(
        &self,
        rel: &str,
        body: Vec<u8>,
        mode: PutMode,
    ) -> Result<Option<UpdateVersion>, DestError> {
        let key = self.key(rel);
        let store = self.store.clone();
        let opts = PutOptions::from(mode);
        match self.block(async move { store.put_opts(&key, PutPayload::from(body), opts).await }) {
            Ok(r) => Ok(Some(UpdateVersion {
                e_tag: r.e_tag,
                version: r.version,
            })),
            Err(
                object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. },
            ) => Ok(None),
            Err(e) => Err(self.error("write", rel, &e)),
        }
    }

    /// The object at `rel` and its version, if there is one.
    pub(super) fn get_versioned(
        &self,
        rel: &str,
    ) -> Result<Option<(Bytes, UpdateVersion)>, DestError> {
        let key = self.key(rel);
        let store = self.store.clone();
        let got = self.block(async move {
            let r = store.get(&key).await?;
            let version = UpdateVersion {
                e_tag: r.meta.e_tag.clone(),
                version: r.meta.version.clone(),
            };
            Ok::<_, object_store::Error>((r.bytes().await?, version))
        });
        match got {
            Ok(v) => Ok(Some(v)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(self.error("read", rel, &e)),
        }
    }

    /// Spawns `f` on the store's runtime (the lease's renewal).
    pub(super) fn spawn(
        &self,
        f: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> tokio::task::JoinHandle<()> {
        self.runtime().spawn(f)
    }

    pub(super) fn store(&self) -> Arc<dyn ObjectStore> {
        self.store.clone()
    }

    pub(super) fn key_of(&self, rel: &str) -> Key {
        self.key(rel)
    }
}

impl Drop for Remote {
    fn drop(&mut self) {
        // A runtime cannot be dropped (blocking) from async code; its tasks are done or
        // abandoned by now.
        if let Some(rt) = self.rt.take() {
            rt.shutdown_background();
        }
    }
}

/// The files a state directory mirrors: not lock files (the lease is its own object), not
/// temporary files of a write in progress.
fn is_state_file(name: &str) -> bool {
    !name.starts_with('.') && !name.ends_with(".lock")
}

/// A part being uploaded ([`super::PartFile::Remote`]).
pub struct Upload {
    remote: Arc<Remote>,
    writer: Option<WriteMultipart>,
    rel: String,
    bytes: u64,
    /// Bytes handed over since the last wait for upload capacity.
    since_wait: usize,
}

impl Upload {
    pub(super) fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let Some(w) = self.writer.as_mut() else {
            return Err(io::Error::other("write after finish"));
        };
        {
            // A full chunk starts its upload on the store's runtime.
            let _rt = self.remote.runtime().enter();
            w.write(buf);
        }
        self.bytes += buf.len() as u64;
        self.since_wait += buf.len();
        if self.since_wait >= CHUNK {
            self.since_wait = 0;
            let remote = self.remote.clone();
            remote
                .block(w.wait_for_capacity(IN_FLIGHT))
                .map_err(|e| io::Error::other(self.remote.error("upload", &self.rel, &e)))?;
        }
        Ok(buf.len())
    }

    /// Uploads the rest and completes the upload: the object appears, whole. Returns its
    /// size.
    pub(super) fn finish(mut self) -> Result<u64, DestError> {
        let Some(w) = self.writer.take() else {
            return Ok(self.bytes);
        };
        if let Err(e) = self.remote.check_lease(&self.rel) {
            // Never completed: the upload is aborted, the object never appears.
            self.writer = Some(w);
            return Err(e);
        }
        self.remote
            .block(w.finish())
            .map_err(|e| self.remote.error("upload", &self.rel, &e))?;
        Ok(self.bytes)
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        // Not finished: the upload never becomes an object; its chunks are discarded.
        if let Some(w) = self.writer.take() {
            drop(self.remote.spawn(async move {
                let _ = w.abort().await;
            }));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_is_for_loopback_only() {
        assert!(!check_endpoint("s3://b", None).unwrap());
        assert!(!check_endpoint("s3://b", Some("https://minio.corp:9000".into())).unwrap());
        for ok in [
            "http://127.0.0.1:9000",
            "http://localhost:9000",
            "http://[::1]:9000",
        ] {
            assert!(check_endpoint("s3://b", Some(ok.into())).unwrap(), "{ok}");
        }
        let e = check_endpoint("s3://b", Some("http://minio.corp:9000".into())).unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.contains("plain http") && shown.contains("hint: use an https://"),
            "{shown}"
        );
    }

    #[test]
    fn the_work_directory_is_one_per_url_and_named_after_the_bucket() {
        let a = work_dir(&url::Url::parse("s3://warehouse/contacts").unwrap());
        let b = work_dir(&url::Url::parse("s3://warehouse/other").unwrap());
        assert_ne!(a, b);
        assert!(a
            .file_name()
            .unwrap()
            .to_str()
            .unwrap()
            .starts_with("warehouse-"));
        assert_eq!(
            a,
            work_dir(&url::Url::parse("s3://warehouse/contacts").unwrap())
        );
    }

    #[test]
    fn state_files_exclude_locks_and_temporary_files() {
        assert!(is_state_file("checkpoint.json"));
        assert!(is_state_file("seen.tsv"));
        assert!(!is_state_file("export.lock"));
        assert!(!is_state_file(".checkpoint.json.12.0.tmp"));
    }
}
