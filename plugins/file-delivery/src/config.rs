//! The plugin's configuration: a local TOML file that only root can change.
//!
//! The keeper keys decide whose deliveries this host believes, so they never come
//! from the server: `DETAIL` may only name the file (`{"config": "/path"}`), and
//! the file and every directory above it must be owned by root (or by the user
//! the plugin runs as) and writable by no one else.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use serde::Deserialize;

use keel_common::keys::ed25519_public;

/// Where the configuration is unless `DETAIL` says otherwise.
pub const DEFAULT_PATH: &str = "/etc/keel/file-delivery.toml";
/// The most files a host holds.
pub const MAX_FILES: usize = 4096;

/// The configuration, checked.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it came from.
    pub path: PathBuf,
    /// The keepers whose deliveries are believed.
    pub keeper_keys: Vec<VerifyingKey>,
    /// Where delivered files are written.
    pub files_dir: PathBuf,
    /// The host key and the index of delivered files.
    pub state_dir: PathBuf,
    /// The local file server's address (loopback only), or none.
    pub listen: Option<SocketAddr>,
    /// The most files this host holds.
    pub max_files: usize,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Raw {
    keeper_keys: Vec<String>,
    #[serde(default = "default_files_dir")]
    files_dir: PathBuf,
    #[serde(default = "default_state_dir")]
    state_dir: PathBuf,
    #[serde(default = "default_listen")]
    listen: String,
    #[serde(default = "default_max_files")]
    max_files: usize,
}

fn default_files_dir() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent/files")
}
fn default_state_dir() -> PathBuf {
    PathBuf::from("/var/lib/keel-agent/file-delivery")
}
fn default_listen() -> String {
    "127.0.0.1:2080".into()
}
fn default_max_files() -> usize {
    1024
}

/// The configuration file `DETAIL` names, or the default.
pub fn path_from_detail(detail: &str) -> Result<PathBuf, String> {
    keel_plugin_sdk::local::config_path(detail, DEFAULT_PATH).map_err(|e| e.to_string())
}

/// Reads and checks the configuration at `path`.
pub fn load(path: &Path) -> Result<Config, String> {
    let text = keel_plugin_sdk::local::read_trusted(path).map_err(|e| e.to_string())?;
    parse(path, &text)
}

/// Checks the configuration `text` of `path`.
pub fn parse(path: &Path, text: &str) -> Result<Config, String> {
    let at = |key: &str, msg: String| format!("{}: {key}: {msg}", path.display());
    let raw: Raw = toml::from_str(text).map_err(|e| format!("{}: {}", path.display(), e.message()))?;
    if raw.keeper_keys.is_empty() {
        return Err(at("keeper_keys", "empty: name at least one keeper's public key".into()));
    }
    let keeper_keys = raw
        .keeper_keys
        .iter()
        .enumerate()
        .map(|(i, k)| ed25519_public(k).map_err(|m| at(&format!("keeper_keys[{i}]"), m)))
        .collect::<Result<Vec<_>, _>>()?;
    for (key, dir) in [("files_dir", &raw.files_dir), ("state_dir", &raw.state_dir)] {
        if !dir.is_absolute() {
            return Err(at(key, format!("{} is not an absolute path", dir.display())));
        }
    }
    if raw.files_dir.starts_with(&raw.state_dir) || raw.state_dir.starts_with(&raw.files_dir) {
        return Err(at("files_dir", "must not be inside state_dir or contain it".into()));
    }
    let listen = match raw.listen.as_str() {
        "" | "off" => None,
        addr => {
            let a: SocketAddr = addr
                .parse()
                .map_err(|_| at("listen", format!("{addr:?} is not an address:port")))?;
            if !a.ip().is_loopback() {
                return Err(at(
                    "listen",
                    format!("{addr} is not a loopback address: the file server serves this host's components only"),
                ));
            }
            Some(a)
        }
    };
    if raw.max_files == 0 || raw.max_files > MAX_FILES {
        return Err(at("max_files", format!("must be 1-{MAX_FILES}")));
    }
    Ok(Config {
        path: path.to_owned(),
        keeper_keys,
        files_dir: raw.files_dir,
        state_dir: raw.state_dir,
        listen,
        max_files: raw.max_files,
    })
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    const KEY: &str = "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a";

    fn parse_err(text: &str) -> String {
        parse(Path::new("/etc/keel/file-delivery.toml"), text).unwrap_err()
    }

    #[test]
    fn defaults_and_errors_that_name_the_key() {
        let c = parse(Path::new("/x.toml"), &format!("keeper_keys = [\"{KEY}\"]")).unwrap();
        assert_eq!(c.listen, Some("127.0.0.1:2080".parse().unwrap()));
        assert_eq!(c.files_dir, PathBuf::from("/var/lib/keel-agent/files"));
        assert_eq!(c.max_files, 1024);
        for (text, want) in [
            ("keeper_keys = []", "keeper_keys: empty"),
            ("keeper_keys = [\"00\"]", "keeper_keys[0]: must be 32 bytes, not 1"),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nlisten = \"0.0.0.0:2080\""),
                "listen: 0.0.0.0:2080 is not a loopback address",
            ),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nlisten = \"localhost\""),
                "listen: \"localhost\" is not an address:port",
            ),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nfiles_dir = \"files\""),
                "files_dir: files is not an absolute path",
            ),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nfiles_dir = \"/s/f\"\nstate_dir = \"/s\""),
                "files_dir: must not be inside",
            ),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nmax_files = 0"),
                "max_files: must be 1-4096",
            ),
            (
                &format!("keeper_keys = [\"{KEY}\"]\nkeeper = 1"),
                "unknown field `keeper`",
            ),
        ] {
            let e = parse_err(text);
            assert!(e.contains(want), "{text}: {e}");
            assert!(e.starts_with("/etc/keel/file-delivery.toml"), "{e}");
        }
        assert_eq!(
            parse(
                Path::new("/x.toml"),
                &format!("keeper_keys = [\"{KEY}\"]\nlisten = \"off\"")
            )
            .unwrap()
            .listen,
            None
        );
    }

    #[test]
    fn detail_only_names_the_file() {
        assert_eq!(path_from_detail("").unwrap(), PathBuf::from(DEFAULT_PATH));
        assert_eq!(
            path_from_detail(r#"{"config":"/etc/x.toml"}"#).unwrap(),
            PathBuf::from("/etc/x.toml")
        );
        assert!(
            path_from_detail(r#"{"config":"x.toml"}"#)
                .unwrap_err()
                .contains("not an absolute path")
        );
        assert!(
            path_from_detail(r#"{"keeper_keys":["x"]}"#)
                .unwrap_err()
                .contains("unknown field")
        );
    }
}
