//! One run of a pipeline at a time: an advisory `flock` on a lock file.
//!
//! The kernel releases the lock when its holder dies, however it dies, so a lock left by a
//! crashed or killed run never blocks the next one: it is simply taken over (and said so,
//! from the pid the dead run wrote into the file).

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

/// Held while the pipeline runs; released on drop (or by the kernel on death).
#[derive(Debug)]
pub struct RunLock {
    _file: File,
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
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut previous = String::new();
        let _ = file.read_to_string(&mut previous);
        // SAFETY: flock on a valid, open descriptor owned by `file`; no memory is involved.
        let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
        if rc != 0 {
            let err = std::io::Error::last_os_error();
            if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
                return Err(LockError::Busy {
                    path: path.to_path_buf(),
                    pid: previous.trim().to_owned(),
                });
            }
            return Err(io(err));
        }
        let previous = previous.trim();
        if !previous.is_empty() {
            tracing::info!(lock = %path.display(), stale_pid = previous, "took over the lock of a run that ended without releasing it");
        }
        file.set_len(0).map_err(io)?;
        file.seek(SeekFrom::Start(0)).map_err(io)?;
        write!(file, "{}", std::process::id()).map_err(io)?;
        file.sync_all().map_err(io)?;
        Ok(RunLock {
            _file: file,
            path: path.to_path_buf(),
        })
    }
}

impl Drop for RunLock {
    fn drop(&mut self) {
        // An empty file means "released cleanly"; the flock goes with the descriptor.
        let _ = std::fs::write(&self.path, b"");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_second_holder_is_refused_until_the_first_releases() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        let first = RunLock::acquire(&p).unwrap();
        let e = RunLock::acquire(&p).unwrap_err();
        assert!(matches!(e, LockError::Busy { .. }), "{e}");
        assert!(e.to_string().contains(&std::process::id().to_string()));
        drop(first);
        RunLock::acquire(&p).unwrap();
    }

    #[test]
    fn a_lock_file_left_by_a_dead_run_is_taken_over() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("x.lock");
        std::fs::write(&p, "999999").unwrap(); // written by a run that died holding the lock
        RunLock::acquire(&p).unwrap();
    }
}
