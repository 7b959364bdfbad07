//! The one check of "only root can change this file", for what is trusted for
//! where it is rather than for a signature: a plugin's trust anchors (keys, allow
//! lists: [`crate::local`]) and the agent's packaged plugins.
//!
//! It lives in the SDK, which depends on nothing heavier than `nix`, so plugins
//! get it without keel-common's dependencies; `keel-agent` depends on the SDK for
//! it (the crate graph stays one way: agent → sdk → proto).

use std::fs::Metadata;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

/// What a [`TrustError`] is about: the file itself or a directory above it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// The file that is checked.
    File,
    /// A directory above it (as it really is, links resolved).
    Directory,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Entry::File => "the file",
            Entry::Directory => "the directory",
        })
    }
}

/// Why a file is not trusted. Each names the path at fault and what is wrong.
#[derive(Debug, thiserror::Error)]
pub enum TrustError {
    /// The path names no file (it is empty, `/` or ends in `..`).
    #[error("{0} is not a file path")]
    NotAFilePath(PathBuf),
    /// The file's directory could not be resolved (missing, not readable).
    #[error("the directory of {path}: {source}")]
    Directory {
        /// The file whose directory it is.
        path: PathBuf,
        /// What resolving it said.
        source: std::io::Error,
    },
    /// The file or a directory above it could not be examined.
    #[error("{entry} {path}: {source}")]
    Unreadable {
        /// The file or a directory.
        entry: Entry,
        /// Its path.
        path: PathBuf,
        /// What `lstat` said.
        source: std::io::Error,
    },
    /// The file is a symbolic link, which anyone who can write its directory
    /// could have pointed anywhere.
    #[error("the file {0} is not a regular file: it is a symbolic link")]
    Symlink(PathBuf),
    /// The file is a directory, a device, a socket or a pipe.
    #[error("the file {0} is not a regular file")]
    NotRegular(PathBuf),
    /// The file or a directory is owned by someone other than root or this
    /// process's user.
    #[error("{entry} {path} is owned by uid {uid}: only root (or this process's user) may own it")]
    Owner {
        /// The file or a directory.
        entry: Entry,
        /// Its path.
        path: PathBuf,
        /// Its owner.
        uid: u32,
    },
    /// The file or a (not sticky) directory is writable by its group or others.
    #[error(
        "{entry} {path} is writable by group or others (mode {mode:04o}): what this host trusts must not be writable by others than its owner"
    )]
    Writable {
        /// The file or a directory.
        entry: Entry,
        /// Its path.
        path: PathBuf,
        /// Its permission bits.
        mode: u32,
    },
}

/// A file that passed [`check_trusted`].
#[derive(Debug)]
pub struct TrustedFile {
    /// Where the file really is: its directories with their links resolved (the
    /// file itself is never a link). Read it from here.
    pub path: PathBuf,
    /// Its metadata as checked.
    pub metadata: Metadata,
}

/// Refuses `path` unless it is a regular file (not a link) and it and every
/// directory above it are owned by root or by this process's user and writable by
/// no one else. A sticky directory such as /tmp may be writable by all (nobody
/// else can replace what is in it). The directories are checked as they really
/// are: a directory that is a link (/lib → /usr/lib) is resolved first, so the
/// link's own 0777 mode does not count but where it leads does.
pub fn check_trusted(path: &Path) -> Result<TrustedFile, TrustError> {
    let not_a_file = || TrustError::NotAFilePath(path.to_owned());
    let file = path.file_name().ok_or_else(not_a_file)?;
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        Some(_) => Path::new("."),
        None => return Err(not_a_file()),
    };
    let parent = std::fs::canonicalize(parent).map_err(|source| TrustError::Directory {
        path: path.to_owned(),
        source,
    })?;
    let resolved = parent.join(file);
    let metadata = check_entry(&resolved, Entry::File)?;
    if metadata.file_type().is_symlink() {
        return Err(TrustError::Symlink(resolved));
    }
    if !metadata.is_file() {
        return Err(TrustError::NotRegular(resolved));
    }
    for dir in resolved.ancestors().skip(1).filter(|d| !d.as_os_str().is_empty()) {
        check_entry(dir, Entry::Directory)?;
    }
    Ok(TrustedFile {
        path: resolved,
        metadata,
    })
}

/// The owner and write checks of one entry; the metadata is `lstat`'s.
fn check_entry(path: &Path, entry: Entry) -> Result<Metadata, TrustError> {
    let m = std::fs::symlink_metadata(path).map_err(|source| TrustError::Unreadable {
        entry,
        path: path.to_owned(),
        source,
    })?;
    if m.file_type().is_symlink() {
        // Only the file can be a link here (the directories are resolved); its
        // mode says nothing, so the caller refuses it as a link.
        return Ok(m);
    }
    let me = nix::unistd::geteuid().as_raw();
    if m.uid() != 0 && m.uid() != me {
        return Err(TrustError::Owner {
            entry,
            path: path.to_owned(),
            uid: m.uid(),
        });
    }
    let sticky_dir = m.is_dir() && m.mode() & 0o1000 != 0;
    if m.mode() & 0o022 != 0 && !(sticky_dir && entry == Entry::Directory) {
        return Err(TrustError::Writable {
            entry,
            path: path.to_owned(),
            mode: m.mode() & 0o7777,
        });
    }
    Ok(m)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    fn mode(path: &Path, mode: u32) {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    }

    #[test]
    fn a_file_only_its_owner_can_change_is_trusted_where_it_really_is() {
        let dir = tempfile::tempdir().unwrap();
        let real = dir.path().join("real");
        std::fs::create_dir(&real).unwrap();
        mode(dir.path(), 0o755);
        mode(&real, 0o755);
        let file = real.join("p.toml");
        std::fs::write(&file, "x").unwrap();
        mode(&file, 0o644);
        let trusted = check_trusted(&file).unwrap();
        assert!(trusted.metadata.is_file());

        // A directory that is a link is judged by where it leads, not by the
        // link's own mode (always 0777).
        let linked = dir.path().join("linked");
        std::os::unix::fs::symlink(&real, &linked).unwrap();
        let through = check_trusted(&linked.join("p.toml")).unwrap();
        assert_eq!(through.path, trusted.path);
        mode(&real, 0o775);
        let e = check_trusted(&linked.join("p.toml")).unwrap_err();
        assert!(
            matches!(&e, TrustError::Writable { entry: Entry::Directory, path, mode: 0o775 } if *path == trusted.path.parent().unwrap()),
            "{e}"
        );
        mode(&real, 0o755);

        assert!(matches!(check_trusted(&real), Err(TrustError::NotRegular(_))));
        assert!(matches!(
            check_trusted(Path::new("/")),
            Err(TrustError::NotAFilePath(_))
        ));
        assert!(matches!(
            check_trusted(&dir.path().join("nowhere/p.toml")),
            Err(TrustError::Directory { .. })
        ));
        let e = check_trusted(&real.join("missing")).unwrap_err();
        assert!(matches!(e, TrustError::Unreadable { entry: Entry::File, .. }), "{e}");
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn a_sticky_directory_above_is_fine_a_writable_file_in_it_is_not() {
        let dir = tempfile::tempdir().unwrap();
        mode(dir.path(), 0o1777);
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "x").unwrap();
        mode(&file, 0o600);
        check_trusted(&file).unwrap();
        mode(&file, 0o666);
        assert!(matches!(
            check_trusted(&file),
            Err(TrustError::Writable { entry: Entry::File, .. })
        ));
    }
}
