//! Local files a plugin trusts for where they are.
//!
//! A plugin's trust anchors (the keys whose signatures it believes, the targets it
//! may reach) must not come from the server, which only sends `DETAIL`: they live
//! in a local file that only root can change. [`check_trusted`] says whether a file
//! is such a file; [`config_path`] reads the one thing `DETAIL` may say: which
//! file.

use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::trust::TrustError;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Detail {
    #[serde(default)]
    config: Option<PathBuf>,
}

/// Why `DETAIL` named no usable configuration file.
#[derive(Debug, thiserror::Error)]
pub enum DetailError {
    /// `DETAIL` is not JSON, or holds more than `config`.
    #[error("DETAIL: {0}")]
    Json(#[source] serde_json::Error),
    /// `DETAIL`'s `config` is a relative path.
    #[error("DETAIL: config: {} is not an absolute path", .0.display())]
    Relative(PathBuf),
}

/// Why a trusted file could not be read.
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The file is not one that only root can change.
    #[error(transparent)]
    Untrusted(#[from] TrustError),
    /// The file passed the check but could not be read.
    #[error("{}: {source}", .path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// What reading it said.
        source: std::io::Error,
    },
}

/// The configuration file a plugin's `DETAIL` names (`{"config": "/abs/path"}`),
/// or `default` when `DETAIL` is empty or names none. Nothing else may be in
/// `DETAIL`: the file, which the server cannot change, holds the plugin's trust
/// anchors.
pub fn config_path(detail: &str, default: &str) -> Result<PathBuf, DetailError> {
    if detail.trim().is_empty() {
        return Ok(PathBuf::from(default));
    }
    let d: Detail = serde_json::from_str(detail).map_err(DetailError::Json)?;
    let path = d.config.unwrap_or_else(|| PathBuf::from(default));
    if !path.is_absolute() {
        return Err(DetailError::Relative(path));
    }
    Ok(path)
}

/// Refuses `path` unless only root (or this process's user) can change it: see
/// [`crate::trust::check_trusted`], the one implementation of the check.
pub fn check_trusted(path: &Path) -> Result<(), TrustError> {
    crate::trust::check_trusted(path).map(drop)
}

/// The contents of `path`, if [`check_trusted`] passes it.
pub fn read_trusted(path: &Path) -> Result<String, ReadError> {
    let trusted = crate::trust::check_trusted(path)?;
    std::fs::read_to_string(&trusted.path).map_err(|source| ReadError::Read {
        path: path.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn detail_only_names_the_file() {
        assert_eq!(config_path("", "/etc/p.toml").unwrap(), PathBuf::from("/etc/p.toml"));
        assert_eq!(config_path("{}", "/etc/p.toml").unwrap(), PathBuf::from("/etc/p.toml"));
        assert_eq!(
            config_path(r#"{"config":"/etc/x.toml"}"#, "/etc/p.toml").unwrap(),
            PathBuf::from("/etc/x.toml")
        );
        assert!(
            config_path(r#"{"config":"x.toml"}"#, "/d")
                .unwrap_err()
                .to_string()
                .contains("not an absolute path")
        );
        assert!(
            config_path(r#"{"allow":["0.0.0.0/0:*"]}"#, "/d")
                .unwrap_err()
                .to_string()
                .contains("unknown field")
        );
        assert!(
            config_path("not json", "/d")
                .unwrap_err()
                .to_string()
                .starts_with("DETAIL: ")
        );
    }

    #[test]
    fn a_file_others_can_change_is_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let file = dir.path().join("p.toml");
        std::fs::write(&file, "x = 1").unwrap();
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o644)).unwrap();
        check_trusted(&file).unwrap();
        assert_eq!(read_trusted(&file).unwrap(), "x = 1");
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o664)).unwrap();
        assert!(
            read_trusted(&file)
                .unwrap_err()
                .to_string()
                .contains("writable by group or others")
        );
        assert!(
            check_trusted(&file)
                .unwrap_err()
                .to_string()
                .contains("writable by group or others (mode 0664)")
        );
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = check_trusted(&file).unwrap_err().to_string();
        assert!(e.contains(&format!("{} is writable", dir.path().display())), "{e}");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let link = dir.path().join("link.toml");
        std::os::unix::fs::symlink(&file, &link).unwrap();
        assert!(
            check_trusted(&link)
                .unwrap_err()
                .to_string()
                .contains("is not a regular file")
        );
        assert!(check_trusted(&dir.path().join("missing")).is_err());
    }
}
