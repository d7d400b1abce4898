//! One run at a time: an exclusive lock on a lock file, taken with [`File::try_lock`].
//!
//! The lock belongs to the open file (`flock` on Linux and macOS, `LockFileEx` on Windows),
//! and the OS releases it when its holder ends, however it ends: a lock left by a crashed or
//! killed run never blocks the next one, which simply takes it over (and says so, from the
//! pid the dead run wrote into the file). Because it belongs to the open file rather than to
//! the process, two opens within one process exclude each other too.
//!
//! The file holds the holder's pid while it runs, for the "another run is in progress"
//! message, and is emptied on release: an empty file means the last run released cleanly.
//! The lock is never waited for: a second run is refused at once ([`LockError::Busy`]).

use std::fs::{File, OpenOptions, TryLockError};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

/// Held while the run lasts; released on drop (or by the OS when the process ends).
#[derive(Debug)]
pub struct RunLock {
    file: File,
    pub path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("another run is in progress (pid {pid}, lock {path}); runs of one pipeline, exports of one location into one output, and imports or undos with one journal never overlap. Nothing was done: wait for it to finish, or stop it")]
    Busy { path: PathBuf, pid: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl RunLock {
    /// Takes the lock at `path` or reports who holds it. Never waits.
    pub fn acquire(path: &Path) -> Result<RunLock, LockError> {
        let io = |source| LockError::Io {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        match file.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => {
                return Err(LockError::Busy {
                    path: path.to_path_buf(),
                    pid: written_pid(&mut file),
                })
            }
            Err(TryLockError::Error(e)) => return Err(io(e)),
        }
        let stale = written_pid(&mut file);
        if !stale.is_empty() {
            tracing::info!(lock = %path.display(), stale_pid = stale, "took over the lock of a run that ended without releasing it");
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(RunLock {
            file,
            path: path.to_path_buf(),
        })
    }
}

/// The pid in the lock file, empty if none. Windows refuses to read a file another handle
/// has locked, so there a holder's pid is not known.
fn written_pid(file: &mut File) -> String {
    let mut text = String::new();
    let _ = file.read_to_string(&mut text);
    text.trim().to_owned()
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // Emptied through the locked handle itself (Windows refuses every other handle while
        // the lock is held); the lock goes when the handle closes.
        let _ = self.file.set_len(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::BufRead;

    #[test]
    fn a_second_open_of_a_held_lock_file_is_refused_with_the_holders_pid() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let _first = RunLock::acquire(&p).unwrap();
        let e = RunLock::acquire(&p).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e}");
        let shown = e.to_string();
        assert!(shown.starts_with("another run is in progress"), "{shown}");
        assert!(
            shown.contains(&format!(
                "(pid {}, lock {}",
                std::process::id(),
                p.display()
            )),
            "{shown}"
        );
        // The OS holds the lock, as any other program opening the file sees it.
        let other = File::open(&p).unwrap();
        assert!(matches!(other.try_lock(), Err(TryLockError::WouldBlock)));
    }

    #[test]
    fn dropping_the_lock_releases_it_and_empties_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let first = RunLock::acquire(&p).unwrap();
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            std::process::id().to_string()
        );
        drop(first);
        assert_eq!(std::fs::read_to_string(&p).unwrap(), "");
        let other = File::open(&p).unwrap();
        other.try_lock().expect("released on drop");
        drop(other);
        let _again = RunLock::acquire(&p).unwrap();
    }

    /// Set to a lock file's path in the child process that holds it.
    const HOLDER_ENV: &str = "CONTACTS_ETL_TEST_LOCK_HOLDER";

    #[test]
    fn a_lock_held_by_another_process_is_refused_and_taken_over_once_it_is_killed() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        // This test binary again, running only the holder below.
        let mut child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "durable::lock::tests::hold_the_lock_until_killed",
                "--nocapture",
            ])
            .env(HOLDER_ENV, &p)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        let holding = std::io::BufReader::new(child.stdout.take().unwrap())
            .lines()
            .map(Result::unwrap)
            .find(|l| l.starts_with("holding "))
            .expect("the child took the lock");
        assert_eq!(holding, format!("holding {}", child.id()));

        match RunLock::acquire(&p) {
            #[cfg(unix)]
            Err(LockError::Busy { pid, .. }) => assert_eq!(pid, child.id().to_string()),
            #[cfg(not(unix))]
            Err(LockError::Busy { .. }) => {}
            other => panic!("expected busy, got {other:?}"),
        }

        // Killed, it releases nothing itself: the OS drops its lock.
        child.kill().unwrap();
        child.wait().unwrap();
        assert_eq!(std::fs::read_to_string(&p).unwrap(), child.id().to_string());
        let _taken = RunLock::acquire(&p).expect("a dead holder's lock is taken over");
        assert_eq!(
            std::fs::read_to_string(&p).unwrap(),
            std::process::id().to_string()
        );
    }

    #[test]
    #[ignore = "the lock holder run in a child process by a_lock_held_by_another_process_…"]
    fn hold_the_lock_until_killed() {
        let Some(p) = std::env::var_os(HOLDER_ENV) else {
            return;
        };
        let _lock = RunLock::acquire(Path::new(&p)).unwrap();
        println!("holding {}", std::process::id());
        // Until killed (or the parent goes away, closing stdin).
        let _ = std::io::stdin().read_to_end(&mut Vec::new());
    }
}
