//! The token store: one JSON file holding the OAuth tokens of each location and agency.
//!
//! It holds refresh tokens, which are as good as a password until revoked, so the file is
//! created with mode 0600 (in a 0700 directory when the tool creates it) and a store that
//! other users may read or write is refused rather than used. Every change is written to a
//! temporary file in the same directory, synced, and renamed over the store: a crash leaves
//! the old store or the new one, never half of one. That matters because each refresh
//! returns a new refresh token and invalidates the previous one: losing the newest means
//! logging in again.
//!
//! A store in a directory any user may write (world-writable) is refused too (unix), with or
//! without the sticky bit: without it anyone can replace the store with one holding their
//! own grant (the user's runs then export from, or import into, their location); with it
//! (`/tmp`) they can still take the store's name before the first login, and such
//! directories are emptied on reboot anyway. ssh refuses group-writable directories as
//! well; here a group-writable one is only warned about, because with user-private groups
//! (umask 002) every directory is group-writable and the group holds the user alone.
//!
//! A store that is a symbolic link (a dotfiles setup linking `~/.config/contacts-etl/tokens.json`
//! into a private directory) is written through: the link is resolved and the target
//! replaced atomically in the target's own directory, whose permissions are checked too.
//! Replacing the link by a regular file, as renaming over the link's path did, left the
//! target holding a refresh token that refresh had spent: whatever still read the target
//! (the dotfiles checkout, another tool pointed at it) was refused with `invalid_grant`. Refusing links would
//! break such setups for no gain: whoever can plant a link in the store's directory can
//! replace the store anyway, and that directory must not be writable by others.
//!
//! Writers in one process are serialised; the read-modify-write of another process running
//! at the same moment could lose the other's update. Token sources therefore re-read the
//! store before and after a refused refresh and adopt a token another process rotated.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::AuthError;

/// A secret string (token, client secret). `Debug` never shows it; serialises as the plain
/// string (the store has to hold it).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// The secret itself, for the one place that sends it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(***)")
    }
}

/// Whose token: one sub-account (location), or an agency (company).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum UserType {
    Location,
    Company,
}

impl UserType {
    /// The value of the API's `user_type` form field.
    pub fn as_str(self) -> &'static str {
        match self {
            UserType::Location => "Location",
            UserType::Company => "Company",
        }
    }
}

impl std::str::FromStr for UserType {
    type Err = String;
    fn from_str(s: &str) -> Result<UserType, String> {
        match s.to_ascii_lowercase().as_str() {
            "location" | "sub-account" => Ok(UserType::Location),
            "company" | "agency" => Ok(UserType::Company),
            _ => Err(format!("'{s}' is not a user type: use Location or Company")),
        }
    }
}

/// Which entry of the store.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum StoreKey {
    Location(String),
    Company(String),
}

impl StoreKey {
    fn as_string(&self) -> String {
        match self {
            StoreKey::Location(id) => format!("location:{id}"),
            StoreKey::Company(id) => format!("company:{id}"),
        }
    }
}

impl std::fmt::Display for StoreKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreKey::Location(id) => write!(f, "location {id}"),
            StoreKey::Company(id) => write!(f, "agency (company) {id}"),
        }
    }
}

/// One stored grant. `Debug` shows everything but the tokens.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct StoredToken {
    pub user_type: UserType,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub company_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub location_id: Option<String>,
    pub access_token: Secret,
    /// Absent for a location token obtained from an agency token (renewed by exchanging the
    /// agency token again, not by refreshing).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_token: Option<Secret>,
    /// When the access token expires, in seconds since the epoch.
    pub expires_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<String>,
    /// When this entry was written, in seconds since the epoch.
    #[serde(default)]
    pub updated_at: i64,
}

impl StoredToken {
    /// The entry this token belongs in, if it names its location or company.
    pub fn key(&self) -> Option<StoreKey> {
        match self.user_type {
            UserType::Location => self.location_id.clone().map(StoreKey::Location),
            UserType::Company => self.company_id.clone().map(StoreKey::Company),
        }
    }
}

/// The file's layout, versioned so a later layout can still read this one.
#[derive(Serialize, Deserialize)]
#[serde(tag = "version")]
enum StoreFile {
    #[serde(rename = "1")]
    V1 {
        #[serde(default)]
        tokens: BTreeMap<String, StoredToken>,
    },
}

/// Serialises read-modify-write cycles of every store within this process.
static WRITE_LOCK: Mutex<()> = Mutex::new(());
/// A group-writable store directory is reported once per process, not on every read.
static GROUP_WRITABLE_WARNED: AtomicBool = AtomicBool::new(false);

/// A token store file.
#[derive(Clone, Debug)]
pub struct TokenStore {
    path: PathBuf,
}

impl TokenStore {
    pub fn new(path: impl Into<PathBuf>) -> TokenStore {
        TokenStore { path: path.into() }
    }

    /// `$XDG_CONFIG_HOME/contacts-etl/tokens.json`, else `~/.config/contacts-etl/tokens.json`.
    pub fn default_path() -> Option<PathBuf> {
        let base = std::env::var_os("XDG_CONFIG_HOME")
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
            .or_else(|| {
                std::env::var_os("HOME")
                    .filter(|v| !v.is_empty())
                    .map(|h| PathBuf::from(h).join(".config"))
            })?;
        Some(base.join("contacts-etl").join("tokens.json"))
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    fn io(&self, source: std::io::Error) -> AuthError {
        AuthError::StoreIo {
            path: self.path.clone(),
            source,
        }
    }

    /// The file the store's path names: the path itself, or the end of its chain of
    /// symbolic links (which need not exist yet).
    fn target(&self) -> Result<PathBuf, AuthError> {
        resolve_links(&self.path).map_err(|e| self.io(e))
    }

    /// Every entry; an absent file is an empty store. Refuses a file others may read, or a
    /// store in a directory others may write.
    pub fn load(&self) -> Result<BTreeMap<String, StoredToken>, AuthError> {
        let target = self.target()?;
        check_directory(&self.path, &self.path)?;
        if target != self.path {
            check_directory(&self.path, &target)?;
        }
        let mut file = match File::open(&target) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
            Err(e) => return Err(self.io(e)),
        };
        // Checked on the open file, so the file read is the file checked.
        let meta = file.metadata().map_err(|e| self.io(e))?;
        if !meta.is_file() {
            return Err(AuthError::StoreCorrupt {
                path: self.path.clone(),
                message: "not a regular file".into(),
            });
        }
        check_private(&self.path, &meta)?;
        let mut text = String::new();
        file.read_to_string(&mut text).map_err(|e| self.io(e))?;
        if text.trim().is_empty() {
            return Ok(BTreeMap::new());
        }
        match serde_json::from_str::<StoreFile>(&text) {
            Ok(StoreFile::V1 { tokens }) => Ok(tokens),
            Err(e) => Err(AuthError::StoreCorrupt {
                path: self.path.clone(),
                message: format!("line {}, column {}: {e}", e.line(), e.column()),
            }),
        }
    }

    /// The entry for `key`, if any.
    pub fn get(&self, key: &StoreKey) -> Result<Option<StoredToken>, AuthError> {
        Ok(self.load()?.remove(&key.as_string()))
    }

    /// Every entry with its key, in key order.
    pub fn entries(&self) -> Result<Vec<StoredToken>, AuthError> {
        Ok(self.load()?.into_values().collect())
    }

    /// Saves `entry` under its key, keeping every other entry: read, change, write to a
    /// temporary file, sync, rename.
    pub fn put(&self, entry: StoredToken) -> Result<(), AuthError> {
        let key = entry.key().ok_or_else(|| AuthError::StoreCorrupt {
            path: self.path.clone(),
            message: "a token without its location or company id cannot be stored".into(),
        })?;
        // The guarded data is (), so a poisoned lock is still a valid lock.
        let _guard = WRITE_LOCK
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut tokens = self.load()?;
        tokens.insert(key.as_string(), entry);
        let bytes = serde_json::to_vec_pretty(&StoreFile::V1 { tokens })
            .map_err(|e| self.io(std::io::Error::other(e)))?;
        self.write_atomically(&bytes)
    }

    /// Replaces the store's target (see [`TokenStore::target`]) atomically and 0600 from the
    /// start ([`crate::durable::write_private`]), in the target's directory, so a linked store
    /// stays a link.
    fn write_atomically(&self, bytes: &[u8]) -> Result<(), AuthError> {
        let target = self.target()?;
        let dir = match target.parent() {
            Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
            _ => PathBuf::from("."),
        };
        if !dir.exists() {
            create_private_dir(&dir).map_err(|e| self.io(e))?;
        }
        let mut text = Vec::with_capacity(bytes.len() + 1);
        text.extend_from_slice(bytes);
        text.push(b'\n');
        crate::durable::write_private(&target, &text).map_err(|e| self.io(e.into()))
    }
}

fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    let mut b = std::fs::DirBuilder::new();
    b.recursive(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::DirBuilderExt;
        b.mode(0o700);
    }
    b.create(dir)
}

/// Follows `path`'s symbolic links to the file they name; a dangling link resolves to the
/// path it points at (created on the first write). A relative link is read from the link's
/// directory, as the kernel reads it.
fn resolve_links(path: &Path) -> std::io::Result<PathBuf> {
    let mut p = path.to_path_buf();
    // Linux's own limit on the links of one lookup.
    for _ in 0..40 {
        match std::fs::symlink_metadata(&p) {
            Ok(m) if m.file_type().is_symlink() => {
                let to = std::fs::read_link(&p)?;
                p = match p.parent() {
                    Some(dir) if to.is_relative() => dir.join(to),
                    _ => to,
                };
            }
            Ok(_) => return Ok(p),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(p),
            Err(e) => return Err(e),
        }
    }
    Err(std::io::Error::other("too many levels of symbolic links"))
}

/// Refuses a store whose `file` (the store's path or its link target) lies in a
/// world-writable directory; warns once about a group-writable one. A directory that does
/// not exist yet is created 0700 later.
#[cfg(unix)]
fn check_directory(store: &Path, file: &Path) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let dir = match file.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let meta = match std::fs::metadata(dir) {
        Ok(m) => m,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(AuthError::StoreIo {
                path: dir.to_path_buf(),
                source: e,
            })
        }
    };
    let mode = meta.permissions().mode() & 0o7777;
    if mode & 0o002 == 0 {
        if mode & 0o020 != 0 && !GROUP_WRITABLE_WARNED.swap(true, Ordering::Relaxed) {
            tracing::warn!(
                "the directory {} of token store {} may be written by its group (mode {mode:04o}); fine if only you are in that group, else: chmod g-w {}",
                dir.display(),
                store.display(),
                dir.display()
            );
        }
        return Ok(());
    }
    Err(AuthError::StoreUnsafe {
        path: store.to_path_buf(),
        reason: format!(
            "the directory {} may be written by any user (mode {mode:04o}), who could replace the store with their own grant or take its name; it holds refresh tokens, so it is not used",
            dir.display()
        ),
        hint: format!(
            "keep the store in a private directory with --token-store (the default ~/.config/contacts-etl is created 0700), or chmod o-w {}",
            dir.display()
        ),
    })
}

#[cfg(not(unix))]
fn check_directory(_store: &Path, _file: &Path) -> Result<(), AuthError> {
    Ok(())
}

/// Warns, as ssh does for a private key, when a file holding a secret (`--token-file`, the
/// client secret file) may be read or written by other users: they could use the secret.
/// A warning, not a refusal: the file is the user's choice, and a token file is often
/// written by a secret manager whose mode the user does not control.
pub fn warn_if_exposed(path: &Path, what: &str) {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        if let Ok(meta) = std::fs::metadata(path) {
            let mode = meta.permissions().mode() & 0o777;
            let open_to = match (mode & 0o044 != 0, mode & 0o022 != 0) {
                (true, true) => "read and written",
                (true, false) => "read",
                (false, true) => "written",
                (false, false) => return,
            };
            tracing::warn!(
                "{what} {} may be {open_to} by other users (mode {mode:04o}): anyone who can read it can use the secret; fix: chmod 600 {}",
                path.display(),
                path.display()
            );
        }
    }
    #[cfg(not(unix))]
    let _ = (path, what);
}

#[cfg(unix)]
fn check_private(path: &Path, meta: &std::fs::Metadata) -> Result<(), AuthError> {
    use std::os::unix::fs::PermissionsExt;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(AuthError::StorePermissions {
            path: path.to_path_buf(),
            mode,
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_private(_path: &Path, _meta: &std::fs::Metadata) -> Result<(), AuthError> {
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(loc: &str, access: &str, refresh: &str) -> StoredToken {
        StoredToken {
            user_type: UserType::Location,
            company_id: Some("co1".into()),
            location_id: Some(loc.into()),
            access_token: Secret::new(access),
            refresh_token: Some(Secret::new(refresh)),
            expires_at: 1_900_000_000,
            scope: Some("contacts.readonly".into()),
            user_id: None,
            updated_at: 0,
        }
    }

    #[test]
    fn put_creates_a_0600_file_and_keeps_other_entries() {
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("sub/tokens.json"));
        store.put(entry("L1", "acc-1", "ref-1")).unwrap();
        store.put(entry("L2", "acc-2", "ref-2")).unwrap();
        store.put(entry("L1", "acc-3", "ref-3")).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(store.path())
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(mode & 0o777, 0o600);
            let dmode = std::fs::metadata(dir.path().join("sub"))
                .unwrap()
                .permissions()
                .mode();
            assert_eq!(dmode & 0o777, 0o700);
        }
        let l1 = store
            .get(&StoreKey::Location("L1".into()))
            .unwrap()
            .unwrap();
        assert_eq!(l1.refresh_token.unwrap().expose(), "ref-3");
        assert!(store
            .get(&StoreKey::Location("L2".into()))
            .unwrap()
            .is_some());
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(dir.path().join("sub"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 1, "{names:?}");
    }

    #[cfg(unix)]
    #[test]
    fn group_readable_store_is_refused_with_the_chmod_fix() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let store = TokenStore::new(dir.path().join("tokens.json"));
        store.put(entry("L1", "acc-1", "ref-1")).unwrap();
        std::fs::set_permissions(store.path(), std::fs::Permissions::from_mode(0o640)).unwrap();
        let err = store.load().unwrap_err().to_string();
        assert!(err.contains(&store.path().display().to_string()), "{err}");
        assert!(err.contains("chmod 600"), "{err}");
        assert!(err.contains("0640"), "{err}");
        // Writing is refused too: it would first read the exposed file.
        assert!(store.put(entry("L2", "a", "r")).is_err());
    }

    #[test]
    fn corrupt_store_names_file_and_line() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tokens.json");
        crate::durable::write_private(&path, b"{\"version\":\"1\",\n\"tokens\": [}").unwrap();
        let err = TokenStore::new(&path).load().unwrap_err().to_string();
        assert!(err.contains("line 2"), "{err}");
        assert!(err.contains("tokens.json"), "{err}");
    }

    #[test]
    fn debug_of_an_entry_shows_no_token() {
        let e = entry("L1", "acc-SECRET", "ref-SECRET");
        let shown = format!("{e:?}");
        assert!(!shown.contains("SECRET"), "{shown}");
        assert!(shown.contains("L1"));
    }
}
