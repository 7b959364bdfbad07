//! The database side: connection settings, the password (read when connecting, so
//! a rotated password file is picked up on the next connection), and the lookup,
//! a prepared `SELECT ... WHERE <column> = ? LIMIT 2` with the value bound.
//!
//! Connecting costs as few round trips as the protocol allows: the client is told
//! `max_allowed_packet` instead of asking the server, and it does not look for the
//! server's unix socket to reconnect through (the mysql crate's `prefer_socket`);
//! a unix socket is used only when `--socket` names one.

use std::fmt;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use mysql::prelude::Queryable;
use mysql::{Conn, Opts, OptsBuilder, Statement, Value};
use serde_json::Value as Json;

use super::answer::{Agent, Reply};
use crate::request::{By, Lookup};

/// How long connecting to the database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one read from or write to the database may take.
pub const IO_TIMEOUT: Duration = Duration::from_secs(10);
/// The largest password file read, in bytes.
pub const MAX_PASSWORD_FILE_BYTES: u64 = 4096;
/// The largest packet exchanged with the server (a row here is a few hundred
/// bytes); given so that connecting does not ask the server for it.
pub const MAX_PACKET_BYTES: usize = 1 << 20;
/// Rows fetched at most: two tell "one agent" from "more than one".
const ROW_LIMIT: usize = 2;

/// A database password; its `Debug` shows nothing of it, and it has no `Display`.
pub struct Password(String);

impl Password {
    /// Wraps a password.
    pub fn new(password: String) -> Self {
        Self(password)
    }
}

impl fmt::Debug for Password {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Password(<redacted>)")
    }
}

/// Where the database is and how to log in.
#[derive(Debug)]
pub struct Settings {
    /// Host name or address (unused with `socket`).
    pub host: String,
    /// TCP port (unused with `socket`).
    pub port: u16,
    /// The server's unix socket, if it is to be used instead of TCP.
    pub socket: Option<PathBuf>,
    /// User name.
    pub user: String,
    /// A file holding the password; takes precedence over `password`.
    pub password_file: Option<PathBuf>,
    /// The password from the environment.
    pub password: Option<Password>,
    /// Database name.
    pub database: String,
    /// Table of agents; a plain identifier (checked by [`super::cli`]).
    pub table: String,
}

impl Settings {
    /// The password: the file's contents, trimmed, or the one from the environment.
    fn password(&self) -> Result<Option<String>, DbError> {
        let Some(path) = &self.password_file else {
            return Ok(self.password.as_ref().map(|p| p.0.clone()));
        };
        read_password_file(path).map(Some)
    }

    /// The client options; reads the password.
    fn opts(&self) -> Result<Opts, DbError> {
        let password = self.password()?.filter(|p| !p.is_empty());
        let builder = OptsBuilder::new()
            .ip_or_hostname(Some(self.host.clone()))
            .tcp_port(self.port)
            .socket(self.socket.as_ref().map(|p| p.display().to_string()))
            .user(Some(self.user.clone()))
            .pass(password)
            .db_name(Some(self.database.clone()))
            .prefer_socket(false)
            .max_allowed_packet(Some(MAX_PACKET_BYTES))
            .tcp_connect_timeout(Some(CONNECT_TIMEOUT))
            .read_timeout(Some(IO_TIMEOUT))
            .write_timeout(Some(IO_TIMEOUT))
            .tcp_nodelay(true);
        Ok(builder.into())
    }

    /// `host:port` or the socket, in messages.
    pub fn server(&self) -> String {
        match &self.socket {
            Some(s) => s.display().to_string(),
            None => format!("{}:{}", self.host, self.port),
        }
    }
}

/// Reads and trims a password file of at most [`MAX_PASSWORD_FILE_BYTES`]. Errors
/// name the file, never quote it.
fn read_password_file(path: &Path) -> Result<String, DbError> {
    let problem = |what: String| DbError::PasswordFile {
        path: path.to_owned(),
        problem: what,
    };
    let file = std::fs::File::open(path).map_err(|e| problem(e.to_string()))?;
    let mut bytes = Vec::new();
    file.take(MAX_PASSWORD_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(|e| problem(e.to_string()))?;
    if bytes.len() as u64 > MAX_PASSWORD_FILE_BYTES {
        return Err(problem(format!("larger than {MAX_PASSWORD_FILE_BYTES} bytes")));
    }
    let text = String::from_utf8(bytes).map_err(|_| problem("not UTF-8 text".to_owned()))?;
    Ok(text.trim().to_owned())
}

/// What went wrong on the database side.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// The password file could not be used.
    #[error("cannot read the password file {}: {problem}", path.display())]
    PasswordFile {
        /// The file.
        path: PathBuf,
        /// Why (never its contents).
        problem: String,
    },
    /// The client or the server failed; the driver's messages name the server and
    /// the user, never the password.
    #[error("{}", describe(.0))]
    Sql(#[from] mysql::Error),
    /// A column holds something that cannot go into a reply.
    #[error("column `{column}` {problem}")]
    Column {
        /// The column.
        column: &'static str,
        /// What is wrong with it.
        problem: &'static str,
    },
}

impl DbError {
    /// Whether the connection is broken (so a new one may succeed), rather than the
    /// query or the data being wrong.
    pub fn is_connectivity(&self) -> bool {
        matches!(self, DbError::Sql(e) if e.is_connectivity_error())
    }
}

/// The driver's error without its `IoError { ... }` wrapping.
fn describe(e: &mysql::Error) -> String {
    match e {
        mysql::Error::IoError(e) => e.to_string(),
        mysql::Error::CodecError(e) => e.to_string(),
        mysql::Error::MySqlError(e) => e.to_string(),
        mysql::Error::DriverError(e) => e.to_string(),
        other => other.to_string(),
    }
}

/// The columns read, in order; also the reply's `data` fields but for `agent_key`.
const COLUMNS: [&str; 4] = ["id", "name", "ip", "agent_key"];

/// The query for `by`: the column is a fixed choice, never request text, and the
/// table a checked identifier; the value is the one `?`.
fn query(table: &str, by: By) -> String {
    let column = match by {
        By::Id => "id",
        By::Ip => "ip",
    };
    format!(
        "SELECT {} FROM `{table}` WHERE `{column}` = ? LIMIT {ROW_LIMIT}",
        COLUMNS.join(", ")
    )
}

/// One connection, with its prepared statements.
pub struct Database {
    conn: Conn,
    table: String,
    by_id: Option<Statement>,
    by_ip: Option<Statement>,
}

impl fmt::Debug for Database {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Database")
            .field("connection_id", &self.conn.connection_id())
            .field("table", &self.table)
            .finish_non_exhaustive()
    }
}

impl Database {
    /// Connects (reading the password now).
    pub fn connect(settings: &Settings) -> Result<Self, DbError> {
        let conn = Conn::new(settings.opts()?)?;
        Ok(Self {
            conn,
            table: settings.table.clone(),
            by_id: None,
            by_ip: None,
        })
    }

    /// Prepares both statements now rather than at their first use (socket mode).
    pub fn prepare(&mut self) -> Result<(), DbError> {
        self.statement(By::Id)?;
        self.statement(By::Ip)?;
        Ok(())
    }

    fn statement(&mut self, by: By) -> Result<Statement, DbError> {
        let slot = match by {
            By::Id => &mut self.by_id,
            By::Ip => &mut self.by_ip,
        };
        if let Some(stmt) = slot {
            return Ok(stmt.clone());
        }
        let stmt = self.conn.prep(query(&self.table, by))?;
        *slot = Some(stmt.clone());
        Ok(stmt)
    }

    /// Looks `lookup` up: the agent, not found (error 4) or more than one (error 5).
    pub fn lookup(&mut self, lookup: &Lookup) -> Result<Reply, DbError> {
        let stmt = self.statement(lookup.by)?;
        let mut rows = Vec::with_capacity(ROW_LIMIT);
        for row in self.conn.exec_iter(&stmt, (lookup.value.as_str(),))? {
            rows.push(row?);
        }
        let Some(row) = rows.pop() else {
            return Ok(Reply::not_found());
        };
        if !rows.is_empty() {
            return Ok(Reply::ambiguous());
        }
        let mut values = row.unwrap().into_iter();
        let mut next = |column: &'static str| -> Result<Json, DbError> {
            let value = values.next().ok_or(DbError::Column {
                column,
                problem: "is missing from the result",
            })?;
            json(column, value)
        };
        Ok(Reply::Found(Agent {
            id: next(COLUMNS[0])?,
            name: next(COLUMNS[1])?,
            ip: next(COLUMNS[2])?,
            key: next(COLUMNS[3])?,
        }))
    }
}

/// A column's value as the Python provider would give it: text as a string,
/// numbers as numbers, NULL as null.
fn json(column: &'static str, value: Value) -> Result<Json, DbError> {
    let problem = |problem| DbError::Column { column, problem };
    match value {
        Value::NULL => Ok(Json::Null),
        Value::Bytes(b) => String::from_utf8(b)
            .map(Json::String)
            .map_err(|_| problem("is not UTF-8 text")),
        Value::Int(i) => Ok(i.into()),
        Value::UInt(u) => Ok(u.into()),
        Value::Float(f) => serde_json::Number::from_f64(f64::from(f))
            .map(Json::Number)
            .ok_or_else(|| problem("is not a finite number")),
        Value::Double(d) => serde_json::Number::from_f64(d)
            .map(Json::Number)
            .ok_or_else(|| problem("is not a finite number")),
        Value::Date(..) | Value::Time(..) => Err(problem("is a date or time, not text")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_query_binds_the_value_and_names_a_fixed_column() {
        assert_eq!(
            query("agent", By::Id),
            "SELECT id, name, ip, agent_key FROM `agent` WHERE `id` = ? LIMIT 2"
        );
        assert_eq!(
            query("hosts_2", By::Ip),
            "SELECT id, name, ip, agent_key FROM `hosts_2` WHERE `ip` = ? LIMIT 2"
        );
    }

    #[test]
    fn values_become_json_like_pymysql_gives_them() {
        assert_eq!(json("id", Value::Bytes(b"001".to_vec())).unwrap(), "001");
        assert_eq!(json("id", Value::Int(7)).unwrap(), 7);
        assert_eq!(json("id", Value::NULL).unwrap(), Json::Null);
        let e = json("name", Value::Bytes(vec![0xff])).unwrap_err();
        assert_eq!(e.to_string(), "column `name` is not UTF-8 text");
        assert!(json("ip", Value::Date(2024, 1, 1, 0, 0, 0, 0)).is_err());
    }

    #[test]
    fn password_files_are_trimmed_limited_and_never_quoted() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pass");
        std::fs::write(&path, "  s3cret-pw\n").unwrap();
        assert_eq!(read_password_file(&path).unwrap(), "s3cret-pw");
        std::fs::write(&path, "s3cret-pw".repeat(1000)).unwrap();
        let e = read_password_file(&path).unwrap_err().to_string();
        assert!(e.ends_with("pass: larger than 4096 bytes"), "{e}");
        assert!(!e.contains("s3cret"));
        std::fs::write(&path, b"s3cret-pw\xff").unwrap();
        let e = read_password_file(&path).unwrap_err().to_string();
        assert!(e.ends_with("pass: not UTF-8 text") && !e.contains("s3cret"), "{e}");
        let e = read_password_file(&dir.path().join("none")).unwrap_err().to_string();
        assert!(e.contains("none: No such file"), "{e}");
    }

    #[test]
    fn debug_never_shows_the_password() {
        let settings = Settings {
            host: "db".into(),
            port: 3306,
            socket: None,
            user: "keel".into(),
            password_file: None,
            password: Some(Password::new("s3cret-pw".into())),
            database: "keel".into(),
            table: "agent".into(),
        };
        let shown = format!("{settings:?} {settings:#?}");
        assert!(!shown.contains("s3cret") && shown.contains("<redacted>"), "{shown}");
        assert_eq!(settings.password().unwrap().as_deref(), Some("s3cret-pw"));
    }
}
