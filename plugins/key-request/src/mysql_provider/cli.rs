//! The command line: `mysql_provider.py`'s options, with the same environment
//! variables and defaults, plus `--socket` to reach the database by its unix
//! socket. A usage error exits with status 2, as argparse does.

use std::path::PathBuf;

use clap::error::ErrorKind;
use clap::{CommandFactory, Parser, ValueEnum};

use super::db::{Password, Settings};
use crate::request::By;

/// The database host, if `--host` is not given.
pub const ENV_HOST: &str = "KEEL_KR_DB_HOST";
/// The database port, if `--port` is not given.
pub const ENV_PORT: &str = "KEEL_KR_DB_PORT";
/// The database's unix socket, if `--socket` is not given.
pub const ENV_SOCKET: &str = "KEEL_KR_DB_SOCKET";
/// The database user, if `--user` is not given.
pub const ENV_USER: &str = "KEEL_KR_DB_USER";
/// A file holding the password, if `--password-file` is not given.
pub const ENV_PASSWORD_FILE: &str = "KEEL_KR_DB_PASSWORD_FILE";
/// The password itself (used when no password file is named).
pub const ENV_PASSWORD: &str = "KEEL_KR_DB_PASSWORD";
/// The database, if `--database` is not given.
pub const ENV_NAME: &str = "KEEL_KR_DB_NAME";
/// The table, if `--table` is not given.
pub const ENV_TABLE: &str = "KEEL_KR_DB_TABLE";

/// Socket mode's worker threads (and database connections) by default.
pub const DEFAULT_THREADS: usize = 8;
/// The most worker threads (and database connections) socket mode may have.
pub const MAX_THREADS: usize = 256;
/// The longest table name, in characters (MySQL's identifier limit).
pub const MAX_TABLE_CHARS: usize = 64;

/// What a lookup is by, on the command line.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ByArg {
    /// The agent ID.
    Id,
    /// The agent's IP address.
    Ip,
}

impl From<ByArg> for By {
    fn from(b: ByArg) -> By {
        match b {
            ByArg::Id => By::Id,
            ByArg::Ip => By::Ip,
        }
    }
}

/// Agent keys from a MySQL or MariaDB table, for Keel's key-request plugin.
///
/// Exec mode: `keel-keyprovider-mysql [options] id 001` (or `ip 10.1.2.3`) prints
/// one reply on stdout. Socket mode: `keel-keyprovider-mysql [options] --serve
/// /run/keel/key-request.sock` serves requests (`id:001`, `ip:10.1.2.3`) on a unix
/// socket of mode 0600, one per connection. The password is read from
/// --password-file (or KEEL_KR_DB_PASSWORD_FILE) or taken from KEEL_KR_DB_PASSWORD,
/// never from the command line.
#[derive(Debug, Parser)]
#[command(name = "keel-keyprovider-mysql", version = super::VERSION)]
pub struct Cli {
    /// Database host.
    #[arg(long, env = ENV_HOST, default_value = "127.0.0.1")]
    pub host: String,
    /// Database TCP port.
    #[arg(long, env = ENV_PORT, default_value_t = 3306)]
    pub port: u16,
    /// The database's unix socket, instead of TCP to --host and --port.
    #[arg(long, env = ENV_SOCKET, value_name = "PATH")]
    pub socket: Option<PathBuf>,
    /// Database user.
    #[arg(long, env = ENV_USER, default_value = "keel")]
    pub user: String,
    /// A file holding the database password (surrounding whitespace is ignored).
    #[arg(long, env = ENV_PASSWORD_FILE, value_name = "PATH")]
    pub password_file: Option<PathBuf>,
    /// Database name.
    #[arg(long, env = ENV_NAME, default_value = "keel")]
    pub database: String,
    /// The table of agents: columns id, name, ip and agent_key.
    #[arg(long, env = ENV_TABLE, default_value = "agent", value_parser = table_name)]
    pub table: String,
    /// Serve on this unix socket instead of answering one lookup.
    #[arg(long, value_name = "SOCKET")]
    pub serve: Option<PathBuf>,
    /// Socket mode: worker threads, one database connection each.
    #[arg(long, default_value_t = DEFAULT_THREADS, value_parser = threads)]
    pub threads: usize,
    /// Exec mode: what to look the agent up by.
    pub by: Option<ByArg>,
    /// Exec mode: the agent ID (1 to 8 digits) or IP address.
    pub value: Option<String>,
}

/// What to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Answer one lookup on stdout.
    Exec {
        /// What the value is.
        by: By,
        /// The value, not yet checked.
        value: String,
    },
    /// Serve on a unix socket.
    Serve {
        /// The socket's path.
        socket: PathBuf,
        /// Worker threads.
        threads: usize,
    },
}

impl Cli {
    /// The database settings and the mode; the password comes from
    /// [`ENV_PASSWORD`] here, or later from the password file.
    pub fn into_parts(self) -> Result<(Settings, Mode), clap::Error> {
        let mode = match (self.serve, self.by, self.value) {
            (Some(socket), _, _) => Mode::Serve {
                socket,
                threads: self.threads,
            },
            (None, Some(by), Some(value)) => Mode::Exec { by: by.into(), value },
            (None, _, _) => {
                return Err(Cli::command().error(
                    ErrorKind::MissingRequiredArgument,
                    "give `id VALUE`, `ip VALUE` or --serve SOCKET",
                ));
            }
        };
        let password = std::env::var(ENV_PASSWORD).ok().map(Password::new);
        let settings = Settings {
            host: self.host,
            port: self.port,
            socket: self.socket,
            user: self.user,
            password_file: self.password_file,
            password,
            database: self.database,
            table: self.table,
        };
        Ok((settings, mode))
    }
}

/// `--table`: a plain identifier, since it is the one name put into the SQL.
fn table_name(s: &str) -> Result<String, String> {
    let mut chars = s.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || c == '_');
    if first_ok && rest_ok && s.len() <= MAX_TABLE_CHARS {
        Ok(s.to_owned())
    } else {
        Err(format!(
            "--table must be a plain identifier (a letter or `_`, then letters, digits or `_`, at most {MAX_TABLE_CHARS})"
        ))
    }
}

/// `--threads`: 1 to [`MAX_THREADS`].
fn threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_THREADS).contains(&n) => Ok(n),
        _ => Err(format!("--threads must be a number from 1 to {MAX_THREADS}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str]) -> Result<(Settings, Mode), clap::Error> {
        let argv = std::iter::once("keel-keyprovider-mysql").chain(args.iter().copied());
        Cli::try_parse_from(argv)?.into_parts()
    }

    #[test]
    fn exec_and_serve_modes() {
        let (s, mode) = parse(&["--host", "db.example", "--port=3307", "id", "001"]).unwrap();
        assert_eq!(
            mode,
            Mode::Exec {
                by: By::Id,
                value: "001".into()
            }
        );
        assert_eq!((s.host.as_str(), s.port), ("db.example", 3307));
        // Options may follow the lookup, as argparse allows.
        let (s, mode) = parse(&["ip", "10.1.2.3", "--table", "agents_2"]).unwrap();
        assert_eq!(
            mode,
            Mode::Exec {
                by: By::Ip,
                value: "10.1.2.3".into()
            }
        );
        assert_eq!(s.table, "agents_2");
        let (_, mode) = parse(&["--serve", "/run/kr.sock", "--threads", "3"]).unwrap();
        assert_eq!(
            mode,
            Mode::Serve {
                socket: "/run/kr.sock".into(),
                threads: 3
            }
        );
    }

    #[test]
    fn usage_errors_exit_2() {
        for args in [
            &[][..],
            &["id"],
            &["name", "web-1"],
            &["--table", "agent; DROP TABLE agent", "id", "1"],
            &["--table", "1agent", "id", "1"],
            &["--threads", "0", "--serve", "/s"],
            &["--threads", "257", "--serve", "/s"],
            &["--port", "70000", "id", "1"],
            &["--password", "x", "id", "1"],
        ] {
            let e = parse(args).unwrap_err();
            assert_eq!(e.exit_code(), 2, "{args:?}: {e}");
        }
        assert!(table_name(&"a".repeat(64)).is_ok());
        assert!(table_name(&"a".repeat(65)).is_err());
        assert!(table_name("`agent`").is_err());
    }
}
