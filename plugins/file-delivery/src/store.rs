//! The delivered files and their index.
//!
//! Files live under `files_dir`; every access goes through directory file
//! descriptors opened with `O_NOFOLLOW` from that root down, so no name, and no
//! symbolic link planted in the tree, reaches a file outside it. A file is written
//! to a temporary file in its directory, synced, renamed over the old one and the
//! directory synced: a reader sees the old file or the new, never a part. A
//! bundle's files share their syncs ([`Store::deliver_all`]): all are written,
//! then synced (one by one up to [`SYNC_EACH_UP_TO`], else one `syncfs`), then
//! renamed, then each directory is synced once.
//!
//! The index holds for each name the version, digest, digest key, mode, readers and
//! keeper of its last delivery, and keeps a removed name's version, so that nothing
//! older can come back. It is a snapshot (`<state_dir>/index.json`, 0600) and a
//! journal (`index.journal`, 0600) of one JSON line per change, appended and
//! synced before a task is answered: one small write per task, whatever the
//! number of files. When the journal holds more lines than twice the entries (and
//! at least [`COMPACT_MIN`]), the snapshot is rewritten and the journal emptied. A
//! torn last line (a crash mid-append) is dropped on open; a bad line before it is
//! an error that names the line.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::{Read, Write};
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use nix::errno::Errno;
use nix::fcntl::{OFlag, openat, renameat};
use nix::sys::stat::{Mode, mkdirat};
use nix::unistd::{UnlinkatFlags, unlinkat};
use serde::{Deserialize, Serialize};

use crate::envelope::{self, Envelope, MAX_FILE_BYTES, Opened};

const INDEX: &str = "index.json";
const JOURNAL: &str = "index.journal";
/// A batch of up to this many deliveries syncs each changed file; a larger one
/// syncs the file system once (and closes each temporary file as soon as it is
/// written, so a bundle holds a descriptor per file only for its directory).
pub const SYNC_EACH_UP_TO: usize = 4;
/// The journal is compacted only past this many lines.
pub const COMPACT_MIN: usize = 256;
const HOST_KEY: &str = "host.key";

/// What the index knows of one name.
#[derive(Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    /// The version of the last delivery or removal.
    pub version: u64,
    /// Digest of the delivered content (empty once removed).
    pub digest: String,
    /// The digest key, hex (empty once removed).
    pub digest_key: String,
    /// Permission bits, octal.
    pub mode: String,
    /// Local readers through the file server.
    pub readers: Vec<String>,
    /// The keeper that signed it, hex.
    pub keeper: String,
    /// Removed: only the version is kept.
    #[serde(default)]
    pub removed: bool,
}

impl std::fmt::Debug for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Entry")
            .field("version", &self.version)
            .field("digest", &self.digest)
            .field("mode", &self.mode)
            .field("readers", &self.readers)
            .field("removed", &self.removed)
            .finish_non_exhaustive()
    }
}

/// What a delivery or removal did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The file was written.
    Written,
    /// The file already had this content and mode; nothing was written.
    Unchanged,
    /// The file was removed.
    Removed,
    /// There was no file to remove.
    Absent,
}

impl Outcome {
    /// As reported.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Written => "written",
            Outcome::Unchanged => "unchanged",
            Outcome::Removed => "removed",
            Outcome::Absent => "absent",
        }
    }
}

/// A file's state as the inventory reports it.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct Item {
    /// Name under the files directory.
    pub name: String,
    /// Version of its last delivery.
    pub version: u64,
    /// Digest of what is on disk now (empty when missing).
    pub digest: String,
    /// Permission bits it was delivered with, octal.
    pub mode: String,
    /// Its readers.
    pub readers: Vec<String>,
    /// `ok`, `missing` (deleted on the host) or `modified` (changed on the host).
    pub state: &'static str,
}

/// Why a delivery, removal or read failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// A replay or an out-of-order delivery.
    #[error("{name}: version {got} is older than the version {have} this host holds; refused")]
    Stale {
        /// Name.
        name: String,
        /// The envelope's version.
        got: u64,
        /// The index's version.
        have: u64,
    },
    /// Same version, other content.
    #[error("{0}: this version was delivered with other content; refused")]
    Conflict(String),
    /// A name given twice in one bundle.
    #[error("{0}: named twice in one bundle; the second is refused")]
    Twice(String),
    /// The host holds `max_files` files.
    #[error("this host holds {0} files, its max_files; remove one first")]
    Full(usize),
    /// A component of the path is a symbolic link or not a directory.
    #[error("{0}: a component of the path is a symbolic link or not a directory; refused")]
    NotBeneath(String),
    /// Not a delivered file.
    #[error("{0}: no such delivered file")]
    NotFound(String),
    /// The file on disk is not a regular file or too large.
    #[error("{0}: not a regular file of at most {MAX_FILE_BYTES} bytes")]
    NotRegular(String),
    /// I/O.
    #[error("{what}: {err}")]
    Io {
        /// What was being done.
        what: String,
        /// The error.
        err: std::io::Error,
    },
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StoreError {
    let what = what.into();
    move |err| StoreError::Io { what, err }
}

fn errno(name: &str, what: &str) -> impl FnOnce(Errno) -> StoreError {
    let name = name.to_owned();
    let what = what.to_owned();
    move |e| match e {
        Errno::ELOOP | Errno::ENOTDIR => StoreError::NotBeneath(name),
        Errno::ENOENT => StoreError::NotFound(name),
        e => StoreError::Io {
            what: format!("{name}: {what}"),
            err: e.into(),
        },
    }
}

/// The delivered files, their index and the host key.
#[derive(Debug)]
pub struct Store {
    files_dir: PathBuf,
    state_dir: PathBuf,
    max_files: usize,
    index: Mutex<Index>,
}

/// The index in memory, and its journal.
#[derive(Debug)]
struct Index {
    entries: BTreeMap<String, Entry>,
    journal: File,
    journal_lines: usize,
}

#[derive(Serialize, Deserialize)]
struct Change {
    name: String,
    entry: Entry,
}

fn invalid(path: &Path, message: String) -> StoreError {
    StoreError::Io {
        what: path.display().to_string(),
        err: std::io::Error::new(std::io::ErrorKind::InvalidData, message),
    }
}

impl Index {
    fn open(state_dir: &Path) -> Result<Index, StoreError> {
        let path = state_dir.join(INDEX);
        let mut entries: BTreeMap<String, Entry> = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| invalid(&path, e.to_string()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(io(path.display().to_string())(e)),
        };
        let path = state_dir.join(JOURNAL);
        let mut journal = std::fs::OpenOptions::new()
            .read(true)
            .append(true)
            .create(true)
            .mode(0o600)
            .open(&path)
            .map_err(io(path.display().to_string()))?;
        let mut text = Vec::new();
        journal.read_to_end(&mut text).map_err(io(path.display().to_string()))?;
        let mut lines = 0;
        let mut good = 0;
        for (i, line) in text.split_inclusive(|b| *b == b'\n').enumerate() {
            // A torn last line: the change was never answered.
            if !line.ends_with(b"\n") {
                break;
            }
            let c: Change = serde_json::from_slice(line).map_err(|e| invalid(&path, format!("line {}: {e}", i + 1)))?;
            entries.insert(c.name, c.entry);
            lines += 1;
            good += line.len();
        }
        if good < text.len() {
            journal.set_len(good as u64).map_err(io(path.display().to_string()))?;
        }
        Ok(Index {
            entries,
            journal,
            journal_lines: lines,
        })
    }

    /// Records changes durably (one append, one sync); compacts the journal when
    /// it has grown.
    fn record(&mut self, state_dir: &Path, changes: Vec<Change>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        let mut lines = Vec::new();
        for change in &changes {
            serde_json::to_writer(&mut lines, change).map_err(|e| io("index")(std::io::Error::other(e)))?;
            lines.push(b'\n');
        }
        let what = state_dir.join(JOURNAL).display().to_string();
        self.journal
            .write_all(&lines)
            .and_then(|()| self.journal.sync_data())
            .map_err(io(what.clone()))?;
        self.journal_lines += changes.len();
        for change in changes {
            self.entries.insert(change.name, change.entry);
        }
        if self.journal_lines > COMPACT_MIN.max(2 * self.entries.len()) {
            let json = serde_json::to_vec(&self.entries).map_err(|e| io("index")(std::io::Error::other(e)))?;
            write_private(&state_dir.join(INDEX), &json)?;
            self.journal
                .set_len(0)
                .and_then(|()| self.journal.sync_data())
                .map_err(io(what))?;
            self.journal_lines = 0;
        }
        Ok(())
    }
}

impl Store {
    /// Opens (creating) the directories and reads the index.
    pub fn open(files_dir: &Path, state_dir: &Path, max_files: usize) -> Result<Store, StoreError> {
        create_dir(state_dir, 0o700)?;
        create_dir(files_dir, 0o755)?;
        let index = Index::open(state_dir)?;
        Ok(Store {
            files_dir: files_dir.to_owned(),
            state_dir: state_dir.to_owned(),
            max_files,
            index: Mutex::new(index),
        })
    }

    /// The host key: read from the state directory, or made and stored (0600).
    pub fn host_key(&self) -> Result<envelope::HostKey, StoreError> {
        let path = self.state_dir.join(HOST_KEY);
        match std::fs::read_to_string(&path) {
            Ok(text) => {
                let bytes = hex::decode(text.trim()).map_err(|e| StoreError::Io {
                    what: path.display().to_string(),
                    err: std::io::Error::new(std::io::ErrorKind::InvalidData, e),
                })?;
                envelope::HostKey::from_secret(&bytes).map_err(|m| StoreError::Io {
                    what: path.display().to_string(),
                    err: std::io::Error::new(std::io::ErrorKind::InvalidData, m),
                })
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                let key = envelope::HostKey::generate();
                write_private(&path, format!("{}\n", hex::encode(key.secret_bytes())).as_bytes())?;
                Ok(key)
            }
            Err(e) => Err(io(path.display().to_string())(e)),
        }
    }

    /// The index entry of `name`, if delivered and not removed.
    pub fn entry(&self, name: &str) -> Option<Entry> {
        self.lock().entries.get(name).filter(|e| !e.removed).cloned()
    }

    /// Every delivered name with its entry.
    pub fn entries(&self) -> Vec<(String, Entry)> {
        self.lock()
            .entries
            .iter()
            .filter(|(_, e)| !e.removed)
            .map(|(n, e)| (n.clone(), e.clone()))
            .collect()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Index> {
        self.index.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn check_version(&self, env: &Envelope, added: usize) -> Result<Option<Entry>, StoreError> {
        let index = self.lock();
        let old = index.entries.get(&env.name).cloned();
        if let Some(old) = &old {
            if env.version < old.version {
                return Err(StoreError::Stale {
                    name: env.name.clone(),
                    got: env.version,
                    have: old.version,
                });
            }
            if env.version == old.version && env.digest != old.digest {
                return Err(StoreError::Conflict(env.name.clone()));
            }
        } else if index.entries.values().filter(|e| !e.removed).count() + added >= self.max_files {
            return Err(StoreError::Full(self.max_files));
        }
        Ok(old)
    }

    /// Writes an opened delivery unless the file already holds it.
    pub fn deliver(&self, env: &Envelope, opened: &Opened) -> Result<Outcome, StoreError> {
        self.deliver_all(&[(env, opened)])
            .pop()
            .unwrap_or(Err(StoreError::NotFound(env.name.clone())))
    }

    /// Writes opened deliveries, each unless the file already holds it, with the
    /// syncs of all shared: every changed file is written to its temporary file,
    /// the file system is synced once, each is renamed into place, each directory
    /// synced once, and the index records them with one append and one sync. Each
    /// delivery has its own outcome; one refused does not stop the others. A name
    /// given twice is refused the second time (its order could undo the first).
    pub fn deliver_all(&self, items: &[(&Envelope, &Opened)]) -> Vec<Result<Outcome, StoreError>> {
        let mut outcomes: Vec<Result<Outcome, StoreError>> = Vec::with_capacity(items.len());
        let mut pending: Vec<Pending> = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut added = 0;
        // Few files keep their temporary file open to sync it; more close it
        // at once, so a bundle holds one descriptor per directory, not per file.
        let keep_open = items.len() <= SYNC_EACH_UP_TO;
        for (i, (env, opened)) in items.iter().enumerate() {
            if !seen.insert(env.name.as_str()) {
                outcomes.push(Err(StoreError::Twice(env.name.clone())));
                continue;
            }
            match self.prepare(env, opened, added, keep_open) {
                Ok(None) => outcomes.push(Ok(Outcome::Unchanged)),
                Ok(Some(p)) => {
                    added += usize::from(p.new_name);
                    outcomes.push(Ok(Outcome::Written));
                    pending.push(Pending { index: i, ..p });
                }
                Err(e) => outcomes.push(Err(e)),
            }
        }
        // Every temporary file's content on disk before any takes a name: a few
        // are synced one by one, more with one sync of the file system.
        let synced = if keep_open {
            pending
                .iter()
                .try_for_each(|p| p.file.as_ref().map_or(Ok(()), File::sync_all))
                .map_err(|e| e.to_string())
        } else if pending.is_empty() {
            Ok(())
        } else {
            File::open(&self.files_dir)
                .and_then(|root| nix::unistd::syncfs(&root).map_err(std::io::Error::from))
                .map_err(|e| e.to_string())
        };
        if let Err(e) = synced {
            for p in pending.drain(..) {
                let _ = unlinkat(&p.dir, p.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                outcomes[p.index] = Err(StoreError::Io {
                    what: items[p.index].0.name.clone(),
                    err: std::io::Error::other(format!("sync: {e}")),
                });
            }
        }
        let mut synced: Vec<(String, &Pending)> = Vec::new();
        for p in &pending {
            let name = &items[p.index].0.name;
            if let Err(e) = renameat(&p.dir, p.tmp.as_str(), &p.dir, p.base.as_str()).map_err(errno(name, "rename")) {
                let _ = unlinkat(&p.dir, p.tmp.as_str(), UnlinkatFlags::NoRemoveDir);
                outcomes[p.index] = Err(e);
                continue;
            }
            let parent = name.rsplit_once('/').map_or("", |(d, _)| d).to_owned();
            if !synced.iter().any(|(d, _)| *d == parent) {
                synced.push((parent, p));
            }
        }
        for (_, p) in &synced {
            if let Err(e) = nix::unistd::fsync(&p.dir) {
                let dir = items[p.index].0.name.rsplit_once('/').map_or("", |(d, _)| d);
                for q in &pending {
                    if items[q.index].0.name.rsplit_once('/').map_or("", |(d, _)| d) == dir {
                        outcomes[q.index] = Err(errno(&items[q.index].0.name, "sync directory")(e));
                    }
                }
            }
        }
        let changes: Vec<(usize, Change)> = items
            .iter()
            .enumerate()
            .filter(|(i, _)| outcomes[*i].is_ok())
            .map(|(i, (env, opened))| {
                (
                    i,
                    Change {
                        name: env.name.clone(),
                        entry: Entry {
                            version: env.version,
                            digest: env.digest.clone(),
                            digest_key: hex::encode(opened.digest_key),
                            mode: env.mode.clone(),
                            readers: env.readers.clone(),
                            keeper: env.keeper.clone(),
                            removed: false,
                        },
                    },
                )
            })
            .collect();
        let recorded: Vec<usize> = changes.iter().map(|(i, _)| *i).collect();
        if let Err(e) = self
            .lock()
            .record(&self.state_dir, changes.into_iter().map(|(_, c)| c).collect())
        {
            let msg = e.to_string();
            for i in recorded {
                outcomes[i] = Err(StoreError::Io {
                    what: "index".into(),
                    err: std::io::Error::other(msg.clone()),
                });
            }
        }
        outcomes
    }

    /// Checks one delivery and, when the file differs, writes its temporary file
    /// (not yet synced); `None` when the file already holds it. `added`: new names
    /// taken earlier in the same batch.
    fn prepare(
        &self,
        env: &Envelope,
        opened: &Opened,
        added: usize,
        keep_open: bool,
    ) -> Result<Option<Pending>, StoreError> {
        let old = self.check_version(env, added)?;
        let mode = envelope::parse_mode(&env.mode).map_err(|m| io(&env.name)(std::io::Error::other(m)))?;
        let (dir, base) = self.parent_dir(&env.name, true)?;
        let unchanged = match read_beneath(&dir, base, &env.name) {
            Ok((content, file_mode)) => {
                file_mode & 0o7777 == mode && envelope::digest(&opened.digest_key, &content) == env.digest
            }
            // Missing, or replaced on the host by a link or something else: the
            // rename puts the delivered file in its place.
            Err(StoreError::NotFound(_) | StoreError::NotBeneath(_) | StoreError::NotRegular(_)) => false,
            Err(e) => return Err(e),
        };
        if unchanged {
            return Ok(None);
        }
        let (tmp, file) = write_temp(&dir, base, &env.name, &opened.content, mode)?;
        Ok(Some(Pending {
            index: 0,
            base: base.to_owned(),
            dir,
            tmp,
            file: keep_open.then_some(file),
            new_name: old.is_none_or(|o| o.removed),
        }))
    }

    /// Removes a file; keeps its version.
    pub fn remove(&self, env: &Envelope) -> Result<Outcome, StoreError> {
        self.check_version(env, 0)?;
        let outcome = match self.parent_dir(&env.name, false) {
            Ok((dir, base)) => match unlinkat(&dir, base, UnlinkatFlags::NoRemoveDir) {
                Ok(()) => {
                    nix::unistd::fsync(&dir).map_err(errno(&env.name, "sync"))?;
                    Outcome::Removed
                }
                Err(Errno::ENOENT) => Outcome::Absent,
                Err(e) => return Err(errno(&env.name, "remove")(e)),
            },
            Err(StoreError::NotFound(_)) => Outcome::Absent,
            Err(e) => return Err(e),
        };
        self.record(
            &env.name,
            Entry {
                version: env.version,
                digest: String::new(),
                digest_key: String::new(),
                mode: String::new(),
                readers: Vec::new(),
                keeper: env.keeper.clone(),
                removed: true,
            },
        )?;
        Ok(outcome)
    }

    /// Every delivered file as it is on disk now.
    pub fn inventory(&self) -> Vec<Item> {
        self.entries()
            .into_iter()
            .map(|(name, e)| {
                let key: Option<[u8; 32]> = hex::decode(&e.digest_key).ok().and_then(|b| b.try_into().ok());
                let now = self
                    .read(&name)
                    .ok()
                    .and_then(|(content, _)| key.map(|k| envelope::digest(&k, &content)));
                let state = match &now {
                    None => "missing",
                    Some(d) if *d == e.digest => "ok",
                    Some(_) => "modified",
                };
                Item {
                    name,
                    version: e.version,
                    digest: now.unwrap_or_default(),
                    mode: e.mode,
                    readers: e.readers,
                    state,
                }
            })
            .collect()
    }

    /// A delivered file's content and mode, read beneath the files directory.
    pub fn read(&self, name: &str) -> Result<(Vec<u8>, u32), StoreError> {
        envelope::check_name(name).map_err(|_| StoreError::NotFound(name.to_owned()))?;
        let (dir, base) = self.parent_dir(name, false)?;
        read_beneath(&dir, base, name)
    }

    /// Opens the directory holding `name`, component by component, never following
    /// a link; with `create`, makes the missing directories (0755).
    fn parent_dir<'n>(&self, name: &'n str, create: bool) -> Result<(OwnedFd, &'n str), StoreError> {
        let flags = OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_RDONLY;
        let root = File::open(&self.files_dir).map_err(io(self.files_dir.display().to_string()))?;
        let mut dir: OwnedFd = root.into();
        let (parents, base) = match name.rsplit_once('/') {
            Some((p, b)) => (Some(p), b),
            None => (None, name),
        };
        for part in parents.into_iter().flat_map(|p| p.split('/')) {
            if create {
                match mkdirat(&dir, part, Mode::from_bits_truncate(0o755)) {
                    Ok(()) | Err(Errno::EEXIST) => {}
                    Err(e) => return Err(errno(name, "create directory")(e)),
                }
            }
            dir = openat(&dir, part, flags, Mode::empty()).map_err(errno(name, "open directory"))?;
        }
        Ok((dir, base))
    }

    fn record(&self, name: &str, entry: Entry) -> Result<(), StoreError> {
        self.lock().record(
            &self.state_dir,
            vec![Change {
                name: name.to_owned(),
                entry,
            }],
        )
    }
}

fn read_beneath(dir: &impl AsFd, base: &str, name: &str) -> Result<(Vec<u8>, u32), StoreError> {
    let fd = openat(
        dir,
        base,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC | OFlag::O_NONBLOCK,
        Mode::empty(),
    )
    .map_err(errno(name, "open"))?;
    let file = File::from(fd);
    let meta = file.metadata().map_err(io(name))?;
    if !meta.is_file() || meta.len() > MAX_FILE_BYTES as u64 {
        return Err(StoreError::NotRegular(name.to_owned()));
    }
    let mut content = Vec::with_capacity(meta.len() as usize);
    file.take(MAX_FILE_BYTES as u64 + 1)
        .read_to_end(&mut content)
        .map_err(io(name))?;
    if content.len() > MAX_FILE_BYTES {
        return Err(StoreError::NotRegular(name.to_owned()));
    }
    Ok((content, meta.mode()))
}

/// Writes `content` to a new temporary file beside `base` (mode `mode`, not
/// synced); its name and the open file.
fn write_temp(dir: &OwnedFd, base: &str, name: &str, content: &[u8], mode: u32) -> Result<(String, File), StoreError> {
    let mut rand = [0u8; 8];
    getrandom::fill(&mut rand).map_err(|e| io(name)(std::io::Error::other(e.to_string())))?;
    let tmp = format!(".{base}.{}.tmp", hex::encode(rand));
    let fd = openat(
        dir,
        tmp.as_str(),
        OFlag::O_WRONLY | OFlag::O_CREAT | OFlag::O_EXCL | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::from_bits_truncate(0o600),
    )
    .map_err(errno(name, "create"))?;
    let mut file = File::from(fd);
    let written = file
        .write_all(content)
        .and_then(|()| file.set_permissions(std::fs::Permissions::from_mode(mode)));
    if let Err(e) = written {
        drop(file);
        let _ = unlinkat(dir, tmp.as_str(), UnlinkatFlags::NoRemoveDir);
        return Err(io(name)(e));
    }
    Ok((tmp, file))
}

/// A delivery written to its temporary file, to be renamed into place.
struct Pending {
    /// Its place in the batch.
    index: usize,
    /// The directory holding it.
    dir: OwnedFd,
    /// Its name in `dir`.
    base: String,
    /// The temporary file's name in `dir`.
    tmp: String,
    /// The temporary file, while it is kept open to be synced on its own.
    file: Option<File>,
    /// It takes a name the index does not hold.
    new_name: bool,
}

fn create_dir(dir: &Path, mode: u32) -> Result<(), StoreError> {
    keel_common::fsutil::create_dir(dir, mode).map_err(io(dir.display().to_string()))
}

fn write_private(path: &Path, bytes: &[u8]) -> Result<(), StoreError> {
    keel_common::fsutil::write_private(path, bytes).map_err(io(path.display().to_string()))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use crate::envelope::{FileSpec, Keeper};

    struct Fixture {
        _dir: tempfile::TempDir,
        files: PathBuf,
        store: Store,
        keeper: Keeper,
        host: envelope::HostKey,
    }

    fn fixture() -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let files = dir.path().join("files");
        let store = Store::open(&files, &dir.path().join("state"), 3).unwrap();
        let host = store.host_key().unwrap();
        Fixture {
            files,
            store,
            keeper: Keeper::from_seed(&[3; 32]),
            host,
            _dir: dir,
        }
    }

    impl Fixture {
        fn opened(&self, name: &str, content: &[u8], version: u64) -> (Envelope, Opened) {
            let spec = FileSpec {
                name: name.into(),
                mode: "0640".into(),
                readers: vec![],
            };
            let env = self
                .keeper
                .seal(&self.host.public_hex(), &spec, content, version)
                .unwrap();
            let opened = env
                .open(
                    &[keel_common::keys::ed25519_public(&self.keeper.public_hex()).unwrap()],
                    &self.host,
                )
                .unwrap();
            (env, opened)
        }

        fn deliver(&self, name: &str, content: &[u8], version: u64) -> Result<Outcome, StoreError> {
            let (env, opened) = self.opened(name, content, version);
            self.store.deliver(&env, &opened)
        }
    }

    #[test]
    fn a_batch_shares_its_syncs_and_each_file_keeps_its_own_outcome() {
        let dir = tempfile::tempdir().unwrap();
        let mut f = fixture();
        f.store = Store::open(&f.files, &dir.path().join("state"), 64).unwrap();
        f.host = f.store.host_key().unwrap();
        f.deliver("old", b"held", 50).unwrap();
        let mut items: Vec<(Envelope, Opened)> = (0..SYNC_EACH_UP_TO + 3)
            .map(|i| f.opened(&format!("d{}/f{i}", i % 2), format!("content {i}").as_bytes(), 10))
            .collect();
        items.push(f.opened("old", b"older", 40));
        items.push(f.opened("d0/f0", b"again", 11));
        let refs: Vec<(&Envelope, &Opened)> = items.iter().map(|(e, o)| (e, o)).collect();
        let outcomes = f.store.deliver_all(&refs);
        let n = SYNC_EACH_UP_TO + 3;
        assert!(
            outcomes[..n].iter().all(|o| matches!(o, Ok(Outcome::Written))),
            "{outcomes:?}"
        );
        assert!(
            matches!(&outcomes[n], Err(StoreError::Stale { got: 40, have: 50, .. })),
            "{outcomes:?}"
        );
        let e = outcomes[n + 1].as_ref().unwrap_err().to_string();
        assert_eq!(e, "d0/f0: named twice in one bundle; the second is refused");
        for i in 0..n {
            let path = f.files.join(format!("d{}/f{i}", i % 2));
            assert_eq!(std::fs::read(&path).unwrap(), format!("content {i}").as_bytes());
        }
        assert_eq!(std::fs::read(f.files.join("old")).unwrap(), b"held");
        let left: Vec<_> = walk(&f.files)
            .into_iter()
            .filter(|p| p.to_string_lossy().ends_with(".tmp"))
            .collect();
        assert!(left.is_empty(), "no temporary file left: {left:?}");
        // The index holds every written file, with one journal append.
        let again = Store::open(&f.files, &dir.path().join("state"), 64).unwrap();
        assert_eq!(again.entry("d1/f1").unwrap().version, 10);
        assert_eq!(again.entry("old").unwrap().version, 50);
        // The same batch again: nothing differs, nothing is written.
        let outcomes = again.deliver_all(&refs[..n]);
        assert!(
            outcomes.iter().all(|o| matches!(o, Ok(Outcome::Unchanged))),
            "{outcomes:?}"
        );
    }

    fn walk(dir: &Path) -> Vec<PathBuf> {
        let mut out = Vec::new();
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.file_type().unwrap().is_dir() {
                out.extend(walk(&e.path()));
            } else {
                out.push(e.path());
            }
        }
        out
    }

    #[test]
    fn writes_only_what_changed_and_never_goes_back() {
        let f = fixture();
        assert_eq!(f.deliver("app/db.pass", b"one", 10).unwrap(), Outcome::Written);
        let path = f.files.join("app/db.pass");
        assert_eq!(std::fs::read(&path).unwrap(), b"one");
        assert_eq!(std::fs::metadata(&path).unwrap().mode() & 0o7777, 0o640);
        let inode = std::fs::metadata(&path).unwrap().ino();
        assert_eq!(f.deliver("app/db.pass", b"one", 11).unwrap(), Outcome::Unchanged);
        assert_eq!(std::fs::metadata(&path).unwrap().ino(), inode, "not rewritten");
        assert_eq!(f.deliver("app/db.pass", b"two", 12).unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        let e = f.deliver("app/db.pass", b"one", 11).unwrap_err().to_string();
        assert_eq!(
            e,
            "app/db.pass: version 11 is older than the version 12 this host holds; refused"
        );
        let e = f.deliver("app/db.pass", b"three", 12).unwrap_err().to_string();
        assert!(e.contains("delivered with other content"), "{e}");
        assert_eq!(std::fs::read(&path).unwrap(), b"two", "nothing accepted is lost");
        // No temporary file is left behind.
        let names: Vec<_> = std::fs::read_dir(f.files.join("app"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec!["db.pass"]);
    }

    #[test]
    fn the_inventory_sees_changes_made_on_the_host() {
        let f = fixture();
        f.deliver("a", b"A", 1).unwrap();
        f.deliver("b", b"B", 1).unwrap();
        f.deliver("c", b"C", 1).unwrap();
        std::fs::write(f.files.join("b"), b"tampered").unwrap();
        std::fs::remove_file(f.files.join("c")).unwrap();
        let inv = f.store.inventory();
        let states: Vec<_> = inv.iter().map(|i| (i.name.as_str(), i.state)).collect();
        assert_eq!(states, [("a", "ok"), ("b", "modified"), ("c", "missing")]);
        let key = f.keeper.digest_key(&f.host.public_hex());
        assert_eq!(inv[0].digest, envelope::digest(&key, b"A"));
        // A repair with the same content at a new version rewrites it.
        assert_eq!(f.deliver("b", b"B", 2).unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(f.files.join("b")).unwrap(), b"B");
        // max_files = 3.
        let e = f.deliver("d", b"D", 1).unwrap_err().to_string();
        assert_eq!(e, "this host holds 3 files, its max_files; remove one first");
    }

    #[test]
    fn removal_keeps_the_version() {
        let f = fixture();
        f.deliver("x/y", b"Y", 5).unwrap();
        let rm = f.keeper.removal(&f.host.public_hex(), "x/y", 6).unwrap();
        assert_eq!(f.store.remove(&rm).unwrap(), Outcome::Removed);
        assert!(!f.files.join("x/y").exists());
        assert_eq!(f.store.remove(&rm).unwrap(), Outcome::Absent);
        assert!(f.store.entry("x/y").is_none());
        let e = f.deliver("x/y", b"Y", 5).unwrap_err().to_string();
        assert!(
            e.contains("older than the version 6"),
            "a replayed delivery does not come back: {e}"
        );
        assert_eq!(f.deliver("x/y", b"Y2", 7).unwrap(), Outcome::Written);
    }

    #[test]
    fn links_in_the_tree_lead_nowhere() {
        let f = fixture();
        let outside = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(outside.path(), f.files.join("evil")).unwrap();
        let e = f.deliver("evil/passwd", b"root::0:0", 1).unwrap_err().to_string();
        assert!(e.contains("symbolic link"), "{e}");
        assert_eq!(
            std::fs::read_dir(outside.path()).unwrap().count(),
            0,
            "nothing written outside"
        );
        // A delivered file replaced by a link to a secret elsewhere is not served.
        f.deliver("ok", b"fine", 1).unwrap();
        let secret = outside.path().join("shadow");
        std::fs::write(&secret, b"secret").unwrap();
        std::fs::remove_file(f.files.join("ok")).unwrap();
        std::os::unix::fs::symlink(&secret, f.files.join("ok")).unwrap();
        assert!(matches!(f.store.read("ok").unwrap_err(), StoreError::NotBeneath(_)));
        assert_eq!(f.store.inventory()[0].state, "missing");
        // Delivering over the link replaces the link, not its target.
        assert_eq!(f.deliver("ok", b"fine", 2).unwrap(), Outcome::Written);
        assert_eq!(std::fs::read(&secret).unwrap(), b"secret");
        assert!(
            !std::fs::symlink_metadata(f.files.join("ok"))
                .unwrap()
                .file_type()
                .is_symlink()
        );
        assert!(matches!(
            f.store.read("../state/index.json").unwrap_err(),
            StoreError::NotFound(_)
        ));
    }

    #[test]
    fn the_index_survives_restarts_torn_lines_and_compaction() {
        let f = fixture();
        f.deliver("a", b"A", 1).unwrap();
        f.deliver("b", b"B", 1).unwrap();
        let reopen = || Store::open(&f.files, &f.store.state_dir, 3).unwrap();
        assert_eq!(reopen().entries().len(), 2);
        // A crash mid-append leaves a torn line: dropped, and the journal goes on.
        let journal = f.store.state_dir.join(JOURNAL);
        let mut j = std::fs::OpenOptions::new().append(true).open(&journal).unwrap();
        j.write_all(b"{\"name\":\"c\",\"ent").unwrap();
        let again = reopen();
        assert_eq!(again.entries().len(), 2);
        assert!(std::fs::read_to_string(&journal).unwrap().ends_with("}\n"));
        // A bad line that is not the last is an error naming it.
        std::fs::write(&journal, "garbage\n{}\n").unwrap();
        let e = Store::open(&f.files, &f.store.state_dir, 3).unwrap_err().to_string();
        assert!(e.contains("index.journal") && e.contains("line 1"), "{e}");
        std::fs::write(&journal, "").unwrap();
        // Compaction: the snapshot takes over and the journal starts again.
        let f = fixture();
        for v in 1..=(COMPACT_MIN as u64 + 1) {
            f.deliver("a", format!("{v}").as_bytes(), v).unwrap();
        }
        assert_eq!(std::fs::metadata(f.store.state_dir.join(JOURNAL)).unwrap().len(), 0);
        let back = Store::open(&f.files, &f.store.state_dir, 3).unwrap();
        assert_eq!(back.entry("a").unwrap().version, COMPACT_MIN as u64 + 1);
        f.deliver("a", b"next", COMPACT_MIN as u64 + 2).unwrap();
        let back = Store::open(&f.files, &f.store.state_dir, 3).unwrap();
        assert_eq!(back.entry("a").unwrap().version, COMPACT_MIN as u64 + 2);
        let meta = std::fs::metadata(f.store.state_dir.join(INDEX)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }

    #[test]
    fn the_host_key_is_kept_private() {
        let f = fixture();
        let again = f.store.host_key().unwrap();
        assert_eq!(again.public_hex(), f.host.public_hex(), "stable across restarts");
        let meta = std::fs::metadata(f.store.state_dir.join(HOST_KEY)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
        f.deliver("a", b"A", 1).unwrap();
        let meta = std::fs::metadata(f.store.state_dir.join(JOURNAL)).unwrap();
        assert_eq!(meta.mode() & 0o777, 0o600);
    }
}
