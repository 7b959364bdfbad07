//! The plugin's configuration: the `DETAIL` JSON, parsed once at start-up into
//! [`Config`] and checked, with every refusal naming the option at fault.

use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

/// `timeout` when unset, in seconds.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// The smallest `timeout`, in seconds.
pub const MIN_TIMEOUT_SECS: u64 = 1;
/// The largest `timeout`, in seconds (a day): a bound that keeps deadline
/// arithmetic far from overflow.
pub const MAX_TIMEOUT_SECS: u64 = 86_400;
/// `threads` when unset.
pub const DEFAULT_THREADS: usize = 1;
/// The largest `threads`.
pub const MAX_THREADS: usize = 32;
/// `queue_size` when unset.
pub const DEFAULT_QUEUE_SIZE: usize = 1024;
/// The largest `queue_size` (Wazuh's limit).
pub const MAX_QUEUE_SIZE: usize = 220_000;
/// `exec_path` and `socket` must be shorter than this many bytes (Linux `PATH_MAX`).
pub const PATH_MAX: usize = 4096;
/// The longest unix socket path a `sockaddr_un` holds (108 bytes with the NUL).
pub const SOCKET_PATH_MAX: usize = 107;

/// The `DETAIL` JSON as written; every field optional.
#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename = "key-request configuration")]
struct Detail {
    /// A program with optional arguments, split on ASCII whitespace; "" = none.
    #[serde(default)]
    exec_path: String,
    /// A unix socket path; "" = none.
    #[serde(default)]
    socket: String,
    /// Seconds one lookup may take.
    #[serde(default = "default_timeout")]
    timeout: u64,
    /// Worker threads performing lookups.
    #[serde(default = "default_threads")]
    threads: usize,
    /// Most tasks waiting for a lookup at once.
    #[serde(default = "default_queue_size")]
    queue_size: usize,
}

fn default_timeout() -> u64 {
    DEFAULT_TIMEOUT_SECS
}
fn default_threads() -> usize {
    DEFAULT_THREADS
}
fn default_queue_size() -> usize {
    DEFAULT_QUEUE_SIZE
}

/// A checked configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The exec provider, if `exec_path` is set.
    pub exec: Option<ExecCommand>,
    /// The socket provider's path, if `socket` is set.
    pub socket: Option<PathBuf>,
    /// How long one lookup may take.
    pub timeout: Duration,
    /// Worker threads performing lookups.
    pub threads: usize,
    /// Most tasks waiting for a lookup at once.
    pub queue_size: usize,
}

/// The exec provider's program and its fixed arguments; `id 001` or `ip 10.1.2.3`
/// follow them.
#[derive(Clone, PartialEq, Eq)]
pub struct ExecCommand {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: String,
    /// Arguments before the lookup's.
    pub args: Vec<String>,
}

// The arguments may carry settings an administrator would rather not see in a log
// (a database user, a host): Debug shows the program and how many arguments.
impl std::fmt::Debug for ExecCommand {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ExecCommand")
            .field("program", &self.program)
            .field("args", &self.args.len())
            .finish()
    }
}

/// Why a configuration was refused. The message names the option.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// `DETAIL` is not the JSON object expected, or a value has the wrong type.
    #[error("{0}")]
    Json(String),
    /// An option's value is out of its range or malformed.
    #[error("{option}: {problem}")]
    Option {
        /// The option's name.
        option: &'static str,
        /// What is wrong with its value.
        problem: String,
    },
    /// Neither provider is configured.
    #[error("exec_path and socket are both empty: set at least one")]
    NoProvider,
}

impl ConfigError {
    fn option(option: &'static str, problem: impl Into<String>) -> Self {
        ConfigError::Option {
            option,
            problem: problem.into(),
        }
    }
}

/// Parses and checks `DETAIL`; an empty or absent one is `{}`.
pub fn parse(detail: &str) -> Result<Config, ConfigError> {
    let text = if detail.trim().is_empty() { "{}" } else { detail };
    let raw: Detail = serde_path_to_error::deserialize(&mut serde_json::Deserializer::from_str(text)).map_err(|e| {
        let path = e.path().to_string();
        if matches!(path.as_str(), "" | "." | "?") {
            ConfigError::Json(format!("DETAIL: {}", e.inner()))
        } else {
            ConfigError::Json(format!("{path}: {}", e.inner()))
        }
    })?;
    let exec = match check_path("exec_path", &raw.exec_path)? {
        None => None,
        Some(text) => {
            let mut words = text.split_ascii_whitespace().map(str::to_owned);
            // check_path refused an empty or space-led value, so there is a first word.
            let program = words.next().unwrap_or_default();
            Some(ExecCommand {
                program,
                args: words.collect(),
            })
        }
    };
    let socket = match check_path("socket", &raw.socket)? {
        None => None,
        Some(text) if text.len() > SOCKET_PATH_MAX => {
            return Err(ConfigError::option(
                "socket",
                format!(
                    "{} bytes, longer than a unix socket address holds ({SOCKET_PATH_MAX})",
                    text.len()
                ),
            ));
        }
        Some(text) => Some(PathBuf::from(text)),
    };
    if exec.is_none() && socket.is_none() {
        return Err(ConfigError::NoProvider);
    }
    if !(MIN_TIMEOUT_SECS..=MAX_TIMEOUT_SECS).contains(&raw.timeout) {
        return Err(ConfigError::option(
            "timeout",
            format!(
                "{} s is out of range: it must be {MIN_TIMEOUT_SECS} to {MAX_TIMEOUT_SECS} seconds",
                raw.timeout
            ),
        ));
    }
    if !(1..=MAX_THREADS).contains(&raw.threads) {
        return Err(ConfigError::option(
            "threads",
            format!("{} is out of range: it must be 1 to {MAX_THREADS}", raw.threads),
        ));
    }
    if !(1..=MAX_QUEUE_SIZE).contains(&raw.queue_size) {
        return Err(ConfigError::option(
            "queue_size",
            format!("{} is out of range: it must be 1 to {MAX_QUEUE_SIZE}", raw.queue_size),
        ));
    }
    Ok(Config {
        exec,
        socket,
        timeout: Duration::from_secs(raw.timeout),
        threads: raw.threads,
        queue_size: raw.queue_size,
    })
}

/// `None` for "", else the value if it is a usable path (Wazuh's rules, plus no NUL).
fn check_path<'a>(option: &'static str, value: &'a str) -> Result<Option<&'a str>, ConfigError> {
    if value.is_empty() {
        return Ok(None);
    }
    if value.starts_with(|c: char| c.is_ascii_whitespace()) {
        return Err(ConfigError::option(option, "starts with a space"));
    }
    if value.len() >= PATH_MAX {
        return Err(ConfigError::option(
            option,
            format!("{} bytes, must be shorter than {PATH_MAX} (PATH_MAX)", value.len()),
        ));
    }
    if value.contains('\0') {
        return Err(ConfigError::option(option, "contains a NUL byte"));
    }
    Ok(Some(value))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(detail: &str) -> String {
        parse(detail).unwrap_err().to_string()
    }

    #[test]
    fn defaults_and_splitting() {
        let c = parse(r#"{"exec_path":"/usr/bin/provider --db keys  -v"}"#).unwrap();
        let exec = c.exec.unwrap();
        assert_eq!(exec.program, "/usr/bin/provider");
        assert_eq!(exec.args, ["--db", "keys", "-v"]);
        assert_eq!(c.socket, None);
        assert_eq!(c.timeout, Duration::from_secs(60));
        assert_eq!((c.threads, c.queue_size), (1, 1024));
        let c = parse(r#"{"socket":"/run/kr.sock","timeout":5,"threads":32,"queue_size":220000}"#).unwrap();
        assert_eq!(c.socket.unwrap(), PathBuf::from("/run/kr.sock"));
        assert_eq!((c.timeout.as_secs(), c.threads, c.queue_size), (5, 32, 220_000));
    }

    #[test]
    fn each_option_is_named_when_wrong() {
        assert_eq!(err(""), "exec_path and socket are both empty: set at least one");
        assert_eq!(err(r#"{"exec_path":" /bin/p"}"#), "exec_path: starts with a space");
        assert_eq!(err(r#"{"socket":" /s"}"#), "socket: starts with a space");
        let long = "/p".repeat(2048);
        assert_eq!(
            err(&format!(r#"{{"exec_path":"{long}"}}"#)),
            "exec_path: 4096 bytes, must be shorter than 4096 (PATH_MAX)"
        );
        assert!(err(&format!(r#"{{"socket":"{long}"}}"#)).starts_with("socket: 4096 bytes"));
        let sock = format!("/{}", "s".repeat(107));
        assert_eq!(
            err(&format!(r#"{{"socket":"{sock}"}}"#)),
            "socket: 108 bytes, longer than a unix socket address holds (107)"
        );
        assert_eq!(err(r#"{"exec_path":"/p\u0000"}"#), "exec_path: contains a NUL byte");
        assert_eq!(
            err(r#"{"exec_path":"/p","timeout":0}"#),
            "timeout: 0 s is out of range: it must be 1 to 86400 seconds"
        );
        assert_eq!(
            err(r#"{"exec_path":"/p","threads":33}"#),
            "threads: 33 is out of range: it must be 1 to 32"
        );
        assert_eq!(
            err(r#"{"exec_path":"/p","threads":0}"#),
            "threads: 0 is out of range: it must be 1 to 32"
        );
        assert_eq!(
            err(r#"{"exec_path":"/p","queue_size":220001}"#),
            "queue_size: 220001 is out of range: it must be 1 to 220000"
        );
        assert!(err(r#"{"exec_path":"/p","timeout":"60"}"#).starts_with("timeout: invalid type: string"));
        assert!(err(r#"{"exec_path":"/p","threads":-1}"#).starts_with("threads: invalid value: integer `-1`"));
        assert!(err(r#"{"exec_path":"/p","path":"x"}"#).contains("unknown field `path`"));
        assert!(err("not json").starts_with("DETAIL: expected"));
    }

    #[test]
    fn debug_hides_the_arguments() {
        let c = parse(r#"{"exec_path":"/bin/p --user admin"}"#).unwrap();
        let shown = format!("{c:?}");
        assert!(shown.contains("/bin/p") && !shown.contains("admin"), "{shown}");
    }
}
