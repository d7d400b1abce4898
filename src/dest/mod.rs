//! Where a run's files land: a local directory, or a bucket of an object store
//! (`s3://bucket/prefix`, `gs://…`, `az://…`; `file:///dir` is a local directory).
//!
//! # One layout, two places
//! The engine writes the same tree either way (`<entity>/…/part-*.{parquet,csv}`, `_state/`,
//! `_manifest.json`), through a [`Dest`]:
//! - **A local directory** is written as it always was: every file durably, in place
//!   ([`crate::durable`]).
//! - **An object store**: part files are *streamed* into the bucket as multipart uploads
//!   while they are written ([`PartFile`]), in chunks of [`remote::CHUNK`] bytes, so memory
//!   never holds a whole file. An object store makes a multipart object visible only when its
//!   upload completes, all at once: no reader ever sees half a part, and a part killed
//!   mid-upload never appears at all. The small files a run reads back (the checkpoint, the
//!   incremental state, the `seen` log) are kept in a local *work directory*
//!   ([`remote::work_dir`]) and mirrored to the bucket at every commit ([`Dest::sync_state`],
//!   checkpoint last), so the bucket alone is enough to resume: a run on another machine (a
//!   new pod) starts by pulling the location's state from it ([`Dest::pull_state`]). The
//!   manifest is uploaded last, as on disk it is written last.
//!
//! # Locks
//! [`Dest::lock`] takes the local lock file ([`crate::durable::lock`]) and, for a bucket, a
//! lease object beside it ([`lease`]), so two workers on two machines handed the same
//! location refuse each other as two processes on one machine do.
//!
//! # Credentials
//! From the environment and the platforms' usual chains, as `object_store` reads them
//! (`AWS_*`, web identity and container credentials, instance metadata; `GOOGLE_*` and
//! application default credentials; `AZURE_*` and managed identity): never from a pipeline file
//! or a flag, and never logged. Plain `http://` endpoints are accepted for loopback only
//! (a local test server); anything else must be https ([`remote`]).

mod lease;
pub mod remote;

use std::fmt;
use std::fs::File;
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

pub use remote::Remote;

use crate::durable::lock::{LockError, RunLock};

/// What `--out` names: a directory, or an object store URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Dir(PathBuf),
    /// Boxed: settings holding a target stay small.
    Store(Box<url::Url>),
}

/// URL schemes of the object stores `--out` accepts.
pub const STORE_SCHEMES: &[&str] = &["s3", "s3a", "gs", "az", "abfs", "abfss", "azure"];

impl FromStr for Target {
    type Err = String;

    /// `scheme://…` is a URL (an object store, or `file://` for a directory); anything else
    /// is a directory path.
    fn from_str(s: &str) -> Result<Target, String> {
        let Some((scheme, _)) = s.split_once("://") else {
            return Ok(Target::Dir(PathBuf::from(s)));
        };
        let plain = !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'-' | b'.'));
        if !plain {
            return Ok(Target::Dir(PathBuf::from(s)));
        }
        // What may be shown of `s`: nothing between `://` and an `@` (a user or key).
        let shown = match s.split_once("://") {
            Some((scheme, rest)) => match rest.split_once('@') {
                Some((_, host)) => format!("{scheme}://…@{host}"),
                None => s.to_owned(),
            },
            None => s.to_owned(),
        };
        let url = url::Url::parse(s).map_err(|e| format!("'{shown}' is not a valid URL: {e}"))?;
        match url.scheme() {
            "file" => url
                .to_file_path()
                .map(Target::Dir)
                .map_err(|()| format!("'{s}' is not a local path: use file:///absolute/dir")),
            scheme if STORE_SCHEMES.contains(&scheme) => {
                if url.host_str().is_none_or(str::is_empty) {
                    return Err(format!(
                        "'{s}' names no bucket: use {scheme}://BUCKET/PREFIX"
                    ));
                }
                if url.query().is_some()
                    || url.fragment().is_some()
                    || !url.username().is_empty()
                    || url.password().is_some()
                {
                    return Err(format!("'{}' carries a query, fragment or user: credentials come from the environment (AWS_*, GOOGLE_*, AZURE_*), never from the URL", remote::redact(&url)));
                }
                Ok(Target::Store(Box::new(url)))
            }
            other => Err(format!(
                "'{other}://' is not an output this tool writes to: use a directory, file://, s3://, gs:// or az://"
            )),
        }
    }
}

impl From<PathBuf> for Target {
    fn from(p: PathBuf) -> Target {
        Target::Dir(p)
    }
}

impl From<&Path> for Target {
    fn from(p: &Path) -> Target {
        Target::Dir(p.to_path_buf())
    }
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Dir(p) => write!(f, "{}", p.display()),
            Target::Store(u) => write!(f, "{u}"),
        }
    }
}

impl Target {
    /// The local directory `--out` names, or `None` for an object store.
    pub fn dir(&self) -> Option<&Path> {
        match self {
            Target::Dir(p) => Some(p),
            Target::Store(_) => None,
        }
    }
}

/// A destination opened for a run. Cheap to clone (the store connection is shared).
#[derive(Clone)]
pub struct Dest {
    /// The directory the run's files are written under: OUT itself, or, for an object
    /// store, the work directory mirroring the bucket's prefix.
    root: PathBuf,
    remote: Option<Arc<Remote>>,
}

impl fmt::Debug for Dest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Dest({})", self.describe())
    }
}

impl From<PathBuf> for Dest {
    fn from(root: PathBuf) -> Dest {
        Dest::local(root)
    }
}

impl From<&Path> for Dest {
    fn from(root: &Path) -> Dest {
        Dest::local(root)
    }
}

impl From<&PathBuf> for Dest {
    fn from(root: &PathBuf) -> Dest {
        Dest::local(root)
    }
}

/// A step against an object store failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {what}: {detail}{hint}")]
pub struct DestError {
    /// `connect to`, `upload`, `download`, `list`, `delete`, …
    pub action: &'static str,
    /// The object's URL (or the local file's path).
    pub what: String,
    pub detail: String,
    /// `\nhint: …`, or empty.
    pub hint: String,
}

impl From<DestError> for io::Error {
    fn from(e: DestError) -> io::Error {
        io::Error::other(e)
    }
}

impl Dest {
    /// A local directory.
    pub fn local(root: impl Into<PathBuf>) -> Dest {
        Dest {
            root: root.into(),
            remote: None,
        }
    }

    /// Opens `target`: a directory as it is; an object store by connecting to it (one list
    /// request, so a wrong bucket or missing credentials fail here, before any API request).
    pub fn open(target: &Target) -> Result<Dest, DestError> {
        match target {
            Target::Dir(p) => Ok(Dest::local(p)),
            Target::Store(url) => {
                let remote = Remote::connect(url)?;
                Ok(Dest {
                    root: remote.work_dir().to_path_buf(),
                    remote: Some(Arc::new(remote)),
                })
            }
        }
    }

    /// The local directory the run's files are written under (see the field).
    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn is_remote(&self) -> bool {
        self.remote.is_some()
    }

    /// For a bucket: a client of its own for the store (rooted at the bucket), the prefix and
    /// the URL (nothing secret in it): what a Delta log store (`crate::delta`) is built from.
    #[cfg(feature = "delta")]
    #[allow(clippy::type_complexity)]
    pub(crate) fn remote_store(
        &self,
    ) -> Option<
        Result<
            (
                Arc<dyn object_store::ObjectStore>,
                object_store::path::Path,
                String,
            ),
            DestError,
        >,
    > {
        self.remote.as_ref().map(|r| r.store_and_prefix())
    }

    /// What a user calls this destination: the directory, or the bucket URL.
    pub fn describe(&self) -> String {
        match &self.remote {
            Some(r) => r.url().to_owned(),
            None => self.root.display().to_string(),
        }
    }

    /// Where `path` (under [`Dest::root`]) is, for a message: the object's URL for a bucket.
    pub fn show(&self, path: &Path) -> String {
        match (&self.remote, rel(&self.root, path)) {
            (Some(r), Some(rel)) => r.url_of(&rel),
            _ => path.display().to_string(),
        }
    }

    /// Starts part file `fin` (under [`Dest::root`]): locally at `tmp` in its directory,
    /// renamed over `fin` by [`PartFile::commit`]; in a bucket as a multipart upload to `fin`'s
    /// key, visible once committed.
    pub fn create_part(&self, tmp: &Path, fin: &Path) -> io::Result<PartFile> {
        match &self.remote {
            None => {
                if let Some(dir) = tmp.parent() {
                    std::fs::create_dir_all(dir)?;
                }
                let file = File::create(tmp)?;
                Ok(PartFile::Local {
                    file: BufWriter::with_capacity(LOCAL_BUFFER, file),
                    tmp: tmp.to_path_buf(),
                    fin: fin.to_path_buf(),
                })
            }
            Some(r) => {
                let rel = rel(&self.root, fin).ok_or_else(|| outside(fin))?;
                Ok(PartFile::Remote(r.clone().create(&rel)?))
            }
        }
    }

    /// The names of the files directly in `dir` (under [`Dest::root`]); none if it does not
    /// exist. In a bucket: the objects under `dir/`.
    pub fn list_files(&self, dir: &Path) -> io::Result<Vec<String>> {
        match &self.remote {
            None => {
                let entries = match std::fs::read_dir(dir) {
                    Ok(e) => e,
                    Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
                    Err(e) => return Err(e),
                };
                let mut names = Vec::new();
                for entry in entries {
                    let entry = entry?;
                    if entry.file_type()?.is_file() {
                        names.push(entry.file_name().to_string_lossy().into_owned());
                    }
                }
                Ok(names)
            }
            Some(r) => Ok(r.list(&rel(&self.root, dir).ok_or_else(|| outside(dir))?)?),
        }
    }

    /// Removes the file at `path` (under [`Dest::root`]), in the bucket and in the work
    /// directory; one that is not there is not an error.
    pub fn remove(&self, path: &Path) -> io::Result<()> {
        if let Some(r) = &self.remote {
            r.delete(&rel(&self.root, path).ok_or_else(|| outside(path))?)?;
        }
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Whether the file at `path` exists: in the bucket for an object store (for a path under
    /// [`Dest::root`]).
    pub fn exists(&self, path: &Path) -> io::Result<bool> {
        // A file outside OUT (an explicit `--state-dir`) is local whatever OUT is.
        match (&self.remote, rel(&self.root, path)) {
            (Some(r), Some(rel)) => Ok(r.exists(&rel)?),
            _ => Ok(path.exists()),
        }
    }

    /// The content of the file at `path`, `None` if there is none: the bucket's object for an
    /// object store (not the work directory's copy) for a path under [`Dest::root`].
    pub fn read(&self, path: &Path) -> io::Result<Option<Vec<u8>>> {
        // A file outside OUT (an explicit `--state-dir`) is local whatever OUT is.
        match (&self.remote, rel(&self.root, path)) {
            (Some(r), Some(rel)) => Ok(r.get_versioned(&rel)?.map(|(bytes, _)| bytes.to_vec())),
            _ => match std::fs::read(path) {
                Ok(b) => Ok(Some(b)),
                Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
                Err(e) => Err(e),
            },
        }
    }

    /// Makes the local file `path` (under [`Dest::root`], already written durably) the
    /// destination's: uploads it to a bucket; nothing more for a directory.
    pub fn publish(&self, path: &Path) -> io::Result<()> {
        match &self.remote {
            None => Ok(()),
            Some(r) => Ok(r.upload(path, &rel(&self.root, path).ok_or_else(|| outside(path))?)?),
        }
    }

    /// After a commit in the state directory `dir`: uploads the files of `dir` that changed
    /// since the last sync, `checkpoint.json` last (so the bucket's checkpoint never names
    /// what the bucket lacks), and deletes from the bucket the files removed locally. Fails
    /// if this run lost its lease on the destination lock ([`lease`]).
    pub fn sync_state(&self, dir: &Path) -> io::Result<()> {
        match &self.remote {
            None => Ok(()),
            Some(r) => Ok(r.sync_dir(dir, &rel(&self.root, dir).ok_or_else(|| outside(dir))?)?),
        }
    }

    /// Before a run reads its state directory `dir`: replaces the work directory's copy by
    /// the bucket's (the bucket is the truth; the work directory may be stale or new). Lock
    /// and temporary files stay.
    pub fn pull_state(&self, dir: &Path) -> io::Result<()> {
        match &self.remote {
            None => Ok(()),
            Some(r) => Ok(r.pull_dir(dir, &rel(&self.root, dir).ok_or_else(|| outside(dir))?)?),
        }
    }

    /// Takes the run lock `path` (under [`Dest::root`]): the local lock file and, for a
    /// bucket, the lease object at the same place in it. Never waits.
    pub fn lock(&self, path: &Path) -> Result<DestLock, LockError> {
        let local = RunLock::acquire(path)?;
        let lease = match &self.remote {
            None => None,
            Some(r) => {
                let key = rel(&self.root, path).ok_or_else(|| LockError::Io {
                    path: path.to_path_buf(),
                    source: outside(path),
                })?;
                Some(lease::Lease::acquire(r.clone(), &key)?)
            }
        };
        Ok(DestLock {
            _lease: lease,
            _local: local,
        })
    }
}

/// Held while the run lasts; releases the lease, then the local lock, on drop.
#[derive(Debug)]
pub struct DestLock {
    // Field order is drop order: the lease goes before the local lock.
    _lease: Option<lease::Lease>,
    _local: RunLock,
}

/// The buffer of a local part file: the encoders' many small writes become few syscalls.
/// Every open part of every running location has one (800 in a pipeline of 200 locations),
/// so it stays small: a write call per 32 KiB costs nothing next to encoding them.
const LOCAL_BUFFER: usize = 32 * 1024;

/// A part file being written ([`Dest::create_part`]). Dropped without
/// [`commit`](PartFile::commit), it leaves a temporary file (local) or an upload that never
/// becomes visible (bucket; it is aborted).
pub enum PartFile {
    Local {
        file: BufWriter<File>,
        tmp: PathBuf,
        fin: PathBuf,
    },
    Remote(remote::Upload),
}

impl PartFile {
    /// Makes the file visible under its final name, durably; returns its size in bytes.
    pub fn commit(self) -> io::Result<u64> {
        match self {
            PartFile::Local { file, tmp, fin } => {
                let file = file.into_inner().map_err(|e| e.into_error())?;
                let bytes = file.metadata()?.len();
                crate::durable::commit(file, &tmp, &fin)?;
                Ok(bytes)
            }
            PartFile::Remote(upload) => Ok(upload.finish()?),
        }
    }
}

impl Write for PartFile {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            PartFile::Local { file, .. } => file.write(buf),
            PartFile::Remote(u) => u.write(buf),
        }
    }

    fn write_all(&mut self, buf: &[u8]) -> io::Result<()> {
        match self {
            PartFile::Local { file, .. } => file.write_all(buf),
            PartFile::Remote(u) => u.write(buf).map(|_| ()),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            PartFile::Local { file, .. } => file.flush(),
            // Chunks go out as they fill; the last one at `commit`.
            PartFile::Remote(_) => Ok(()),
        }
    }
}

/// `path` relative to `root`, `/`-separated; `None` if it is not under `root`.
fn rel(root: &Path, path: &Path) -> Option<String> {
    let rest = path.strip_prefix(root).ok()?;
    let parts: Vec<&str> = rest
        .components()
        .map(|c| match c {
            std::path::Component::Normal(s) => s.to_str(),
            _ => None,
        })
        .collect::<Option<_>>()?;
    Some(parts.join("/"))
}

fn outside(path: &Path) -> io::Error {
    io::Error::other(format!(
        "{} is outside the output's directory (a bug: every file of a run is under OUT)",
        path.display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn out_is_a_directory_unless_it_is_an_object_store_url() {
        assert_eq!(
            "exports/nightly".parse::<Target>().unwrap(),
            Target::Dir("exports/nightly".into())
        );
        assert_eq!(
            "file:///var/exports".parse::<Target>().unwrap(),
            Target::Dir("/var/exports".into())
        );
        let s3 = "s3://warehouse/contacts/raw".parse::<Target>().unwrap();
        assert!(matches!(&s3, Target::Store(u) if u.host_str() == Some("warehouse")));
        assert!(matches!(
            "gs://b/p".parse::<Target>().unwrap(),
            Target::Store(_)
        ));
        assert!(matches!(
            "az://container/p".parse::<Target>().unwrap(),
            Target::Store(_)
        ));
        // A Windows-style or odd local name is still a directory.
        assert!(matches!(
            "C:\\out".parse::<Target>().unwrap(),
            Target::Dir(_)
        ));
    }

    #[test]
    fn a_url_that_is_not_an_output_is_refused_with_what_to_use() {
        let e = "ftp://host/dir".parse::<Target>().unwrap_err();
        assert!(e.contains("s3://"), "{e}");
        let e = "s3:///prefix".parse::<Target>().unwrap_err();
        assert!(e.contains("names no bucket"), "{e}");
        let e = "s3://AKIAXXXX:secretkey@bucket/p"
            .parse::<Target>()
            .unwrap_err();
        assert!(e.contains("from the environment"), "{e}");
        assert!(
            !e.contains("secretkey"),
            "a credential in the URL is never shown: {e}"
        );
        // Only a password, and one that breaks the URL's syntax: neither is shown.
        let e = "s3://:secretkey@bucket/p".parse::<Target>().unwrap_err();
        assert!(
            e.contains("from the environment") && !e.contains("secretkey"),
            "{e}"
        );
        let e = "s3://AKIA:se/cret key@bucket/p"
            .parse::<Target>()
            .unwrap_err();
        assert!(!e.contains("se/cret") && !e.contains("AKIA"), "{e}");
    }

    #[test]
    fn relative_paths_are_slash_separated_and_stay_under_the_root() {
        let root = Path::new("/w/out");
        assert_eq!(
            rel(
                root,
                Path::new("/w/out/_state/location_id=L/checkpoint.json")
            )
            .as_deref(),
            Some("_state/location_id=L/checkpoint.json")
        );
        assert_eq!(rel(root, Path::new("/w/other/x")), None);
        assert_eq!(rel(root, Path::new("/w/out/../x")), None);
    }
}
