//! Where the server is and which token to present: flags, else `KEEL_*`
//! environment variables, else the TOML configuration file. Anything missing or
//! unusable is a [`UsageError`] (exit 64) that says how to provide it.

use std::fmt;
use std::path::{Path, PathBuf};

use keel_common::secret::Secret;
use reqwest::Url;
use serde::Deserialize;

use crate::cli::ConnArgs;

/// Configuration or usage that cannot work; `keelctl` exits 64 with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(message: impl Into<String>) -> UsageError {
    UsageError(message.into())
}

/// What `keelctl` needs to call the server.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The server's base URL.
    pub server: Url,
    /// The bearer token.
    pub token: Secret,
    /// The PEM of the only CA to trust for HTTPS, and where it came from.
    pub ca: Option<(PathBuf, String)>,
}

/// The configuration file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    server: Option<String>,
    token: Option<Secret>,
    token_file: Option<PathBuf>,
    ca_file: Option<PathBuf>,
}

/// The environment, as a lookup: the process's, or a fixed one in tests.
pub trait Env {
    /// The value of `name`, if set and not empty.
    fn var(&self, name: &str) -> Option<String>;
}

/// The process environment.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

/// Where the configuration file is by default: `$XDG_CONFIG_HOME/keel/keelctl.toml`,
/// else `~/.config/keel/keelctl.toml`.
pub fn default_path(env: &dyn Env) -> Option<PathBuf> {
    let xdg = env
        .var("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .filter(|p| p.is_absolute());
    let base = xdg.or_else(|| env.var("HOME").map(|h| Path::new(&h).join(".config")))?;
    Some(base.join("keel").join("keelctl.toml"))
}

/// Reads the configuration file: the one named (which must exist) or the default
/// (which may be missing).
fn read_file(args: &ConnArgs, env: &dyn Env) -> Result<(Option<PathBuf>, FileConfig), UsageError> {
    let (path, required) = match &args.config {
        Some(p) => (p.clone(), true),
        None => match default_path(env) {
            Some(p) => (p, false),
            None => return Ok((None, FileConfig::default())),
        },
    };
    let text = match std::fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
            return Ok((None, FileConfig::default()));
        }
        Err(e) => return Err(usage(format!("{}: cannot read: {e}", path.display()))),
    };
    let file: FileConfig = toml::from_str(&text).map_err(|e| {
        let message = e.message().to_owned();
        usage(format!("{}: {message}", path.display()))
    })?;
    if file.token.is_some() {
        warn_if_shared(&path);
    }
    Ok((Some(path), file))
}

/// Warns on stderr when a file holding a token can be read by other users.
fn warn_if_shared(path: &Path) {
    use std::os::unix::fs::PermissionsExt;
    let shared = std::fs::metadata(path).is_ok_and(|m| m.permissions().mode() & 0o077 != 0);
    if shared {
        eprintln!(
            "keelctl: warning: {} holds a token and other users can read it; chmod 600 it",
            path.display()
        );
    }
}

/// A path from the configuration file, relative to the file's directory.
fn beside(file: Option<&Path>, p: PathBuf) -> PathBuf {
    match file.and_then(Path::parent) {
        Some(dir) if p.is_relative() => dir.join(p),
        _ => p,
    }
}

fn read_token_file(path: &Path, source: &str) -> Result<Secret, UsageError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| usage(format!("cannot read the token file {} ({source}): {e}", path.display())))?;
    let token = text.trim();
    if token.is_empty() {
        return Err(usage(format!("the token file {} ({source}) is empty", path.display())));
    }
    Ok(Secret::new(token))
}

/// Parses and checks the server URL: `https://…`, or `http://…` to a loopback
/// address only (the token would otherwise cross the network in clear).
pub fn parse_server(text: &str, source: &str) -> Result<Url, UsageError> {
    let url = Url::parse(text.trim()).map_err(|e| {
        usage(format!(
            "invalid server URL {text:?} ({source}): {e}; expected e.g. https://keel.example:6752"
        ))
    })?;
    match url.scheme() {
        "https" => {}
        "http" => {
            let loopback = match url.host() {
                Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
                Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
                Some(url::Host::Domain(d)) => d == "localhost",
                None => false,
            };
            if !loopback {
                return Err(usage(format!(
                    "refusing plain HTTP to {url} ({source}): the token would cross the network in clear; use https \
                     (plain HTTP is allowed only to a loopback address)"
                )));
            }
        }
        other => {
            return Err(usage(format!(
                "invalid server URL {text:?} ({source}): scheme {other:?}; expected https://host:port"
            )));
        }
    }
    if url.host().is_none() {
        return Err(usage(format!("invalid server URL {text:?} ({source}): no host")));
    }
    Ok(url)
}

fn where_file(file: Option<&Path>, env: &dyn Env) -> String {
    file.map(Path::to_path_buf)
        .or_else(|| default_path(env))
        .map_or_else(|| "the configuration file".to_owned(), |p| p.display().to_string())
}

/// Resolves the settings from the flags, the environment and the configuration file,
/// in that order of precedence.
pub fn load(args: &ConnArgs, env: &dyn Env) -> Result<Settings, UsageError> {
    let (file_path, file) = read_file(args, env)?;
    let file_path = file_path.as_deref();
    let file_name = where_file(file_path, env);

    let (server, server_source) = if let Some(s) = &args.server {
        (s.clone(), "--server".to_owned())
    } else if let Some(s) = env.var("KEEL_SERVER") {
        (s, "KEEL_SERVER".to_owned())
    } else if let Some(s) = file.server.clone() {
        (s, format!("server in {file_name}"))
    } else {
        return Err(usage(format!(
            "no server given: use --server URL, set KEEL_SERVER, or put server = \"https://host:6752\" in {file_name}"
        )));
    };
    let server = parse_server(&server, &server_source)?;

    let token = if let Some(t) = &args.token {
        t.clone()
    } else if let Some(p) = &args.token_file {
        read_token_file(p, "--token-file")?
    } else if let Some(t) = env.var("KEEL_TOKEN") {
        Secret::new(t.trim())
    } else if let Some(p) = env.var("KEEL_TOKEN_FILE") {
        read_token_file(Path::new(&p), "KEEL_TOKEN_FILE")?
    } else if let Some(t) = file.token.clone() {
        t
    } else if let Some(p) = file.token_file.clone() {
        read_token_file(&beside(file_path, p), &format!("token_file in {file_name}"))?
    } else {
        return Err(usage(format!(
            "no API token given: use --token-file PATH (or --token TOKEN), set KEEL_TOKEN, or put token = \"…\" \
             in {file_name}; `keel-server token create --role operator` makes one"
        )));
    };
    if token.expose().trim().is_empty() {
        return Err(usage("the API token is empty"));
    }

    let ca_path = if let Some(p) = &args.ca_file {
        Some((p.clone(), "--ca-file".to_owned()))
    } else if let Some(p) = env.var("KEEL_CA_FILE") {
        Some((PathBuf::from(p), "KEEL_CA_FILE".to_owned()))
    } else {
        file.ca_file
            .clone()
            .map(|p| (beside(file_path, p), format!("ca_file in {file_name}")))
    };
    let ca = match ca_path {
        Some((path, source)) => {
            let pem = std::fs::read_to_string(&path)
                .map_err(|e| usage(format!("cannot read the CA file {} ({source}): {e}", path.display())))?;
            Some((path, pem))
        }
        None => None,
    };
    Ok(Settings { server, token, ca })
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;

    struct FakeEnv(HashMap<&'static str, String>);

    impl Env for FakeEnv {
        fn var(&self, name: &str) -> Option<String> {
            self.0.get(name).cloned()
        }
    }

    fn env(pairs: &[(&'static str, &str)]) -> FakeEnv {
        FakeEnv(pairs.iter().map(|(k, v)| (*k, (*v).to_owned())).collect())
    }

    #[test]
    fn flags_beat_the_environment_which_beats_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap().to_owned();
        let conf = dir.path().join(".config/keel");
        std::fs::create_dir_all(&conf).unwrap();
        std::fs::write(conf.join("ca.pem"), "pem").unwrap();
        std::fs::write(
            conf.join("keelctl.toml"),
            "server = \"https://file:1\"\ntoken = \"file-token\"\nca_file = \"ca.pem\"\n",
        )
        .unwrap();

        let s = load(&ConnArgs::default(), &env(&[("HOME", &home)])).unwrap();
        assert_eq!(s.server.as_str(), "https://file:1/");
        assert_eq!(s.token.expose(), "file-token");
        assert_eq!(s.ca.unwrap().1, "pem", "ca_file is relative to the file");

        let e = env(&[
            ("HOME", &home),
            ("KEEL_SERVER", "https://env:2"),
            ("KEEL_TOKEN", "env-token"),
        ]);
        let s = load(&ConnArgs::default(), &e).unwrap();
        assert_eq!((s.server.as_str(), s.token.expose()), ("https://env:2/", "env-token"));

        let args = ConnArgs {
            server: Some("http://127.0.0.1:3".into()),
            token: Some(Secret::new("flag-token")),
            ..ConnArgs::default()
        };
        let s = load(&args, &e).unwrap();
        assert_eq!(
            (s.server.as_str(), s.token.expose()),
            ("http://127.0.0.1:3/", "flag-token")
        );

        let token_file = dir.path().join("token");
        std::fs::write(&token_file, "from-file\n").unwrap();
        let args = ConnArgs {
            token_file: Some(token_file),
            ..ConnArgs::default()
        };
        assert_eq!(load(&args, &e).unwrap().token.expose(), "from-file");
    }

    #[test]
    fn missing_pieces_say_how_to_provide_them() {
        let dir = tempfile::tempdir().unwrap();
        let home = dir.path().to_str().unwrap();
        let e = load(&ConnArgs::default(), &env(&[("HOME", home)])).unwrap_err();
        assert!(e.0.contains("--server") && e.0.contains("KEEL_SERVER"), "{e}");
        let e = load(
            &ConnArgs::default(),
            &env(&[("HOME", home), ("KEEL_SERVER", "https://x")]),
        )
        .unwrap_err();
        assert!(e.0.contains("--token") && e.0.contains("KEEL_TOKEN"), "{e}");
        assert!(e.0.contains("keelctl.toml"), "names the file: {e}");
    }

    #[test]
    fn unknown_keys_and_a_missing_named_file_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.toml");
        std::fs::write(&path, "server = \"https://x\"\ntokn = \"t\"\n").unwrap();
        let args = ConnArgs {
            config: Some(path.clone()),
            ..ConnArgs::default()
        };
        let e = load(&args, &env(&[])).unwrap_err();
        assert!(e.0.contains("tokn") && e.0.contains(path.to_str().unwrap()), "{e}");
        let args = ConnArgs {
            config: Some(dir.path().join("missing.toml")),
            ..ConnArgs::default()
        };
        assert!(load(&args, &env(&[])).unwrap_err().0.contains("cannot read"));
    }

    #[test]
    fn plain_http_only_to_loopback() {
        assert!(parse_server("http://127.0.0.1:6752", "t").is_ok());
        assert!(parse_server("http://[::1]:6752", "t").is_ok());
        assert!(parse_server("http://localhost:6752", "t").is_ok());
        assert!(
            parse_server("http://10.0.0.1:6752", "t")
                .unwrap_err()
                .0
                .contains("plain HTTP")
        );
        assert!(parse_server("https://10.0.0.1:6752", "t").is_ok());
        assert!(parse_server("keel.example:6752", "t").is_err());
        assert!(parse_server("", "t").is_err());
    }
}
