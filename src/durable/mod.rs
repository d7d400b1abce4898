//! Durable files: what a crash, a kill, or a second run at the same moment can rely on.
//!
//! # Atomic replacement
//! Every file the tool writes for later reading (part files, checkpoints, manifests, run
//! reports, the incremental state, the token store, the rejects file) is written one way: in
//! full under a temporary name in its final directory, fsynced, renamed over the final name,
//! and the directory fsynced ([`commit`]). Hence:
//! - a reader sees the old file or the new one, never half of one (a rename within one
//!   directory is atomic);
//! - once the write returned, the new file survives a power loss: the file's fsync makes its
//!   bytes durable, the directory's fsync makes the rename durable. The export's commit order
//!   (parts, then the checkpoint that lists them) depends on this;
//! - a write that fails leaves the old file as it was and removes its temporary file.
//!
//! [`write`], [`write_private`] and [`write_with`] name the temporary file themselves:
//! `.NAME.PID.N.tmp`, hidden, and unique to the process and the write, so two writers of one
//! file at once (two locations' exports into one OUT each writing `_report.json`) never
//! write into, or rename, each other's temporary file: each succeeds, and the last rename
//! wins whole. A process killed in the middle of a write leaves its temporary file behind:
//! nothing can tell a dead writer's file from a live one's. The part writer ([`crate::sink`])
//! names its own temporary files, which a resumed export recognises and removes, and hands
//! them to [`commit`].
//!
//! The directory is fsynced on unix only: Windows cannot open a directory as a file (there,
//! the rename's durability is the filesystem's). A filesystem that cannot fsync a directory
//! at all (it answers "invalid argument" or "unsupported", as some network filesystems do)
//! is accepted as it is; any other failure is an error, since the rename may then not last.
//!
//! # Locks
//! [`lock`]: one run at a time, with an exclusive lock on a lock file that the OS releases
//! when its holder dies.

pub mod lock;

use std::ffi::OsString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

/// A step of a durable write failed: what was done, and to which file.
#[derive(Debug, thiserror::Error)]
#[error("cannot {action} {}: {source}", path.display())]
pub struct WriteError {
    /// `create directory`, `create`, `write`, `fsync`, `replace` or `fsync directory`.
    pub action: &'static str,
    /// The file or directory the step concerned (the temporary file for `write` and `fsync`).
    pub path: PathBuf,
    #[source]
    pub source: io::Error,
}

impl WriteError {
    fn at<'p>(action: &'static str, path: &'p Path) -> impl FnOnce(io::Error) -> WriteError + 'p {
        move |source| WriteError {
            action,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// For callers whose errors carry an `io::Error`: keeps the kind, and the message names the
/// step and the file.
impl From<WriteError> for io::Error {
    fn from(e: WriteError) -> io::Error {
        io::Error::new(e.source.kind(), e)
    }
}

/// Who may read a new file.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Access {
    /// As the process's umask allows.
    Default,
    /// The owner only (mode 0600 on unix), for files holding secrets.
    Private,
}

/// Replaces `path` by `bytes` atomically (see the module doc), creating its directory if
/// needed.
pub fn write(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    replace(path, Access::Default, |f| f.write_all(bytes))
}

/// [`write`] for a file holding secrets: the new file is readable and writable by its owner
/// only (mode 0600 on unix) from the moment it exists.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), WriteError> {
    replace(path, Access::Private, |f| f.write_all(bytes))
}

/// [`write`] with the content written by `fill`, so a large file can be streamed.
pub fn write_with(
    path: &Path,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    replace(path, Access::Default, fill)
}

fn replace(
    path: &Path,
    access: Access,
    fill: impl FnOnce(&mut File) -> io::Result<()>,
) -> Result<(), WriteError> {
    let (mut file, tmp) = create_temp_with(path, access)?;
    if let Err(e) = fill(&mut file) {
        drop(file);
        let _ = fs::remove_file(&tmp);
        return Err(WriteError::at("write", &tmp)(e));
    }
    commit(file, &tmp, path)
}

/// Creates `path`'s directory if needed and a new temporary file for `path` in it, for a
/// writer that needs to own the file (a CSV writer); finish with [`commit`].
pub fn create_temp(path: &Path) -> Result<(File, PathBuf), WriteError> {
    create_temp_with(path, Access::Default)
}

fn create_temp_with(path: &Path, access: Access) -> Result<(File, PathBuf), WriteError> {
    let dir = parent(path);
    fs::create_dir_all(dir).map_err(WriteError::at("create directory", dir))?;
    let tmp = temp_path(path);
    let mut options = OpenOptions::new();
    // `create_new`: never a file that already exists (left by someone else, or a link).
    options.write(true).create_new(true);
    #[cfg(unix)]
    if access == Access::Private {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = access;
    let file = options.open(&tmp).map_err(WriteError::at("create", &tmp))?;
    Ok((file, tmp))
}

/// Makes `file`, written in full at `tmp` (in `path`'s directory), durable as `path`: fsync,
/// rename over `path`, fsync the directory. On failure before the rename the temporary file
/// is removed and `path` is left as it was.
pub fn commit(file: File, tmp: &Path, path: &Path) -> Result<(), WriteError> {
    let synced = file.sync_all();
    drop(file);
    let renamed = synced
        .map_err(WriteError::at("fsync", tmp))
        .and_then(|()| fs::rename(tmp, path).map_err(WriteError::at("replace", path)));
    if renamed.is_err() {
        let _ = fs::remove_file(tmp);
    }
    renamed?;
    sync_dir(parent(path))
}

/// Makes a rename in `dir`, or a file created in it, durable (see the module doc for the
/// platforms and filesystems where it cannot).
pub fn sync_dir(dir: &Path) -> Result<(), WriteError> {
    #[cfg(unix)]
    {
        match File::open(dir).and_then(|d| d.sync_all()) {
            Err(e)
                if !matches!(
                    e.kind(),
                    io::ErrorKind::InvalidInput | io::ErrorKind::Unsupported
                ) =>
            {
                return Err(WriteError::at("fsync directory", dir)(e));
            }
            _ => {}
        }
    }
    #[cfg(not(unix))]
    let _ = dir;
    Ok(())
}

/// The directory a file is written in (`.` for a bare file name).
fn parent(path: &Path) -> &Path {
    path.parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."))
}

/// Removes the temporary files ([`temp_path`] names) that other processes left in `dir`:
/// writers killed in the middle of a write. Only for a directory the caller holds the lock of
/// (a location's state directory during its export), where no other live process writes.
/// Returns how many were removed; a directory that does not exist has none.
pub fn remove_stale_temps(dir: &Path) -> io::Result<usize> {
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let own = std::process::id().to_string();
    let mut removed = 0;
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        // `.NAME.PID.N.tmp`
        let Some(rest) = name.strip_prefix('.').and_then(|n| n.strip_suffix(".tmp")) else {
            continue;
        };
        let mut tail = rest.rsplitn(3, '.');
        let (Some(serial), Some(pid), Some(file)) = (tail.next(), tail.next(), tail.next()) else {
            continue;
        };
        let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
        if file.is_empty() || !digits(serial) || !digits(pid) || pid == own {
            continue;
        }
        match fs::remove_file(entry.path()) {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// Makes temporary names unique within this process.
static TEMP_SERIAL: AtomicU64 = AtomicU64::new(0);

/// `.NAME.PID.N.tmp` next to `path`.
fn temp_path(path: &Path) -> PathBuf {
    let mut name = OsString::from(".");
    name.push(path.file_name().unwrap_or("file".as_ref()));
    name.push(format!(
        ".{}.{}.tmp",
        std::process::id(),
        TEMP_SERIAL.fetch_add(1, Ordering::Relaxed)
    ));
    parent(path).join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn temporary_files_left_by_killed_writers_are_removed_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let own = temp_path(&d.join("checkpoint.json"));
        for name in [
            ".checkpoint.json.4242.0.tmp",
            "._report.json.77.3.tmp",
            "checkpoint.json",
            ".part-00001.parquet.tmp",
            ".notes.x.tmp",
            "keep.4242.0.tmp",
        ] {
            fs::write(d.join(name), b"x").unwrap();
        }
        fs::write(&own, b"x").unwrap();
        assert_eq!(remove_stale_temps(d).unwrap(), 2);
        let mut left: Vec<String> = fs::read_dir(d)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        left.sort();
        let own_name = own.file_name().unwrap().to_str().unwrap().to_owned();
        let mut want = vec![
            ".notes.x.tmp".to_owned(),
            ".part-00001.parquet.tmp".to_owned(),
            "checkpoint.json".to_owned(),
            "keep.4242.0.tmp".to_owned(),
            own_name,
        ];
        want.sort();
        assert_eq!(left, want);
        assert_eq!(remove_stale_temps(&d.join("missing")).unwrap(), 0);
    }

    fn names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn write_replaces_the_whole_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("sub/state.json");
        write(&p, b"first, and longer").unwrap();
        write(&p, b"second").unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"second");
        assert_eq!(names(&dir.path().join("sub")), ["state.json"]);
    }

    #[test]
    fn two_writers_of_one_file_at_once_both_succeed_and_the_last_rename_wins() {
        // A second writer of the same file (another location's export writing the shared
        // `_report.json`) runs its whole write while the first is writing. With one fixed
        // temporary name the second took over the first's temporary file and renamed it
        // away, and the first failed with "No such file".
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("_report.json");
        write_with(&p, |f| {
            f.write_all(b"first")?;
            write(&p, b"second").map_err(io::Error::from)
        })
        .unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"first");
        assert_eq!(names(dir.path()), ["_report.json"]);
    }

    #[test]
    fn a_failed_write_keeps_the_old_file_and_leaves_no_temporary_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("checkpoint.json");
        write(&p, b"old").unwrap();
        let e = write_with(&p, |f| {
            f.write_all(b"half of the n")?;
            Err(io::Error::other("disk full"))
        })
        .unwrap_err();
        assert_eq!(e.action, "write");
        assert!(e.to_string().contains("disk full"), "{e}");
        assert!(e.to_string().contains(".checkpoint.json."), "{e}");
        assert_eq!(fs::read(&p).unwrap(), b"old");
        assert_eq!(names(dir.path()), ["checkpoint.json"]);
    }

    #[test]
    fn an_error_names_the_step_and_the_path() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("not-a-dir");
        fs::write(&file, b"").unwrap();
        let e = write(&file.join("x.json"), b"{}").unwrap_err();
        let shown = e.to_string();
        assert!(
            shown.starts_with(&format!("cannot create directory {}: ", file.display())),
            "{shown}"
        );
        // A directory in the way of the final name: nothing is replaced.
        let busy = dir.path().join("busy");
        fs::create_dir(&busy).unwrap();
        fs::write(busy.join("inside"), b"").unwrap();
        let e = write(&busy, b"{}").unwrap_err();
        assert_eq!(e.action, "replace", "{e}");
        assert!(e.to_string().contains(&busy.display().to_string()), "{e}");
        assert_eq!(names(dir.path()), ["busy", "not-a-dir"]);
    }

    #[test]
    fn commit_makes_a_streamed_file_the_final_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("out/rejects.csv");
        let (mut f, tmp) = create_temp(&p).unwrap();
        assert_eq!(tmp.parent(), p.parent());
        f.write_all(b"line,reason\n").unwrap();
        assert!(!p.exists(), "no final name before commit");
        commit(f, &tmp, &p).unwrap();
        assert_eq!(fs::read(&p).unwrap(), b"line,reason\n");
        assert_eq!(names(&dir.path().join("out")), ["rejects.csv"]);
    }

    #[cfg(unix)]
    #[test]
    fn write_private_creates_an_owner_only_file_even_over_an_open_one() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("tokens.json");
        fs::write(&p, b"old").unwrap();
        fs::set_permissions(&p, fs::Permissions::from_mode(0o644)).unwrap();
        write_private(&p, b"secret").unwrap();
        let mode = fs::metadata(&p).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert_eq!(fs::read(&p).unwrap(), b"secret");
    }
}
