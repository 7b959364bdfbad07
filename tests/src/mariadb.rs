//! A throwaway MariaDB database of agent keys, for the key-request tests and
//! benchmark: [`KeyDb`] creates a database of its own with an `agent` table, and
//! runs a shipped provider against it, by exec or as a socket server: the Python
//! one (`plugins/key-request/providers/mysql_provider.py`) or the Rust one
//! (`keel-keyprovider-mysql`), as [`Provider`] says.
//!
//! MariaDB is at `127.0.0.1:3306` (user root, no password), or where
//! `KEEL_TEST_MARIADB` (`host:port`) says. The `mariadb` command-line client does
//! the SQL; the Python provider needs python3 with PyMySQL (`.ci/run` installs
//! it), the Rust one a build of the workspace's binaries.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// Where MariaDB is, as `host:port`, if not the default.
pub const MARIADB_ENV: &str = "KEEL_TEST_MARIADB";
/// Where MariaDB is by default.
pub const DEFAULT_MARIADB: &str = "127.0.0.1:3306";
/// Rows per `INSERT` statement.
const INSERT_BATCH: usize = 1000;
/// Worker threads of a socket provider started by [`KeyDb::serve`].
pub const PROVIDER_THREADS: usize = 8;
/// How long a socket provider may take to start listening.
const PROVIDER_START: Duration = Duration::from_secs(30);
/// The Rust provider's binary, built with the workspace.
pub const RUST_PROVIDER_BIN: &str = "keel-keyprovider-mysql";
/// The Rust provider's log filter.
const LOG_ENV: &str = "KEEL_LOG";

/// Which MySQL/MariaDB provider to run; both take the same options.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Provider {
    /// `providers/mysql_provider.py`, run by [`python()`].
    Python,
    /// `keel-keyprovider-mysql`, found by [`crate::bin`].
    Rust,
}

impl Provider {
    /// Both, Python first.
    pub const ALL: [Provider; 2] = [Provider::Python, Provider::Rust];

    /// `Python` or `Rust`, for messages.
    pub fn name(self) -> &'static str {
        match self {
            Provider::Python => "Python",
            Provider::Rust => "Rust",
        }
    }

    /// The program and the arguments before the options: the interpreter and the
    /// script, or the binary.
    pub fn command(self) -> Vec<String> {
        match self {
            Provider::Python => vec![python().to_owned(), provider_script().display().to_string()],
            Provider::Rust => vec![rust_provider().display().to_string()],
        }
    }
}

/// The Rust provider's binary, beside the running executable (see [`crate::bin`]).
pub fn rust_provider() -> PathBuf {
    crate::bin(RUST_PROVIDER_BIN)
}

/// One row of the `agent` table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentRow {
    /// `id`, e.g. `001`.
    pub id: String,
    /// `name`.
    pub name: String,
    /// `ip`: an address, a network or `any`.
    pub ip: String,
    /// `agent_key`.
    pub key: String,
}

impl AgentRow {
    /// A row.
    pub fn new(id: &str, name: &str, ip: &str, key: &str) -> Self {
        Self {
            id: id.into(),
            name: name.into(),
            ip: ip.into(),
            key: key.into(),
        }
    }
}

fn server() -> (String, String) {
    let addr = std::env::var(MARIADB_ENV).unwrap_or_else(|_| DEFAULT_MARIADB.to_owned());
    let (host, port) = addr.rsplit_once(':').unwrap_or((addr.as_str(), "3306"));
    (host.to_owned(), port.to_owned())
}

/// Runs `sql` with the `mariadb` client as root; returns its output (tab-separated
/// rows, no header). Panics, with MariaDB's message, if it fails.
pub fn mariadb(sql: &str) -> String {
    let (host, port) = server();
    let mut child = Command::new("mariadb")
        .args([
            "--protocol=tcp",
            "-h",
            &host,
            "-P",
            &port,
            "-u",
            "root",
            "--batch",
            "-N",
        ])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run the mariadb client (is it installed?)");
    child
        .stdin
        .take()
        .expect("mariadb stdin")
        .write_all(sql.as_bytes())
        .expect("send SQL to mariadb");
    let out = child.wait_with_output().expect("mariadb output");
    assert!(
        out.status.success(),
        "mariadb at {host}:{port} failed ({}): {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A SQL string literal.
fn literal(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\'' => out.push_str("\\'"),
            '\\' => out.push_str("\\\\"),
            '\0' => out.push_str("\\0"),
            c => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// The python3 that has PyMySQL, as an absolute path (no shim in between, so that
/// spawning it is as quick as it can be).
pub fn python() -> &'static str {
    static PYTHON: OnceLock<String> = OnceLock::new();
    PYTHON.get_or_init(|| {
        let out = Command::new("python3")
            .args(["-c", "import sys, pymysql; print(sys.executable)"])
            .output()
            .expect("run python3");
        assert!(
            out.status.success(),
            "python3 with PyMySQL is needed (python3 -m pip install PyMySQL==1.1.1; .ci/run does it): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    })
}

/// The shipped MySQL/MariaDB provider script.
pub fn provider_script() -> PathBuf {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../plugins/key-request/providers/mysql_provider.py");
    p.canonicalize().unwrap_or_else(|e| panic!("{}: {e}", p.display()))
}

/// A database of its own with an `agent(id, name, ip, agent_key)` table, indexed
/// (not uniquely) on `id` and `ip` as a real one would be; dropped on drop.
#[derive(Debug)]
pub struct KeyDb {
    name: String,
}

impl KeyDb {
    /// Creates the database and inserts `rows`.
    pub fn create(rows: &[AgentRow]) -> KeyDb {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        let name = format!(
            "keel_kr_{}_{}_{:08x}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            nanos
        );
        mariadb(&format!(
            "CREATE DATABASE `{name}`;\nCREATE TABLE `{name}`.agent (id varchar(8), name varchar(128), ip varchar(19), agent_key varchar(128), INDEX (id), INDEX (ip));\n"
        ));
        let db = KeyDb { name };
        db.insert(rows);
        db
    }

    /// The database's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Inserts more rows.
    pub fn insert(&self, rows: &[AgentRow]) {
        for batch in rows.chunks(INSERT_BATCH) {
            let values: Vec<String> = batch
                .iter()
                .map(|r| {
                    format!(
                        "({}, {}, {}, {})",
                        literal(&r.id),
                        literal(&r.name),
                        literal(&r.ip),
                        literal(&r.key)
                    )
                })
                .collect();
            mariadb(&format!(
                "INSERT INTO `{}`.agent (id, name, ip, agent_key) VALUES {};\n",
                self.name,
                values.join(",\n")
            ));
        }
    }

    /// Creates a MariaDB user with `password`, allowed to read this database.
    pub fn create_user(&self, password: &str) -> DbUser {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let name = format!("kr_{}_{}", std::process::id(), COUNTER.fetch_add(1, Ordering::Relaxed));
        mariadb(&format!(
            "CREATE USER '{name}'@'%' IDENTIFIED BY {};\nGRANT SELECT ON `{}`.* TO '{name}'@'%';\n",
            literal(password),
            self.name
        ));
        DbUser { name }
    }

    /// The provider's connection options for this database.
    pub fn provider_args(&self) -> Vec<String> {
        let (host, port) = server();
        [
            "--host",
            &host,
            "--port",
            &port,
            "--user",
            "root",
            "--database",
            &self.name,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect()
    }

    /// `exec_path` for the plugin: the Python provider in exec mode on this database.
    pub fn exec_path(&self) -> String {
        self.exec_path_for(Provider::Python)
    }

    /// `exec_path` for the plugin: `provider` in exec mode on this database.
    pub fn exec_path_for(&self, provider: Provider) -> String {
        let mut words = provider.command();
        words.extend(self.provider_args());
        words.join(" ")
    }

    /// Starts the Python provider in socket mode on `socket` with
    /// [`PROVIDER_THREADS`] threads; returns once it accepts connections.
    pub fn serve(&self, socket: &Path) -> ProviderServer {
        self.serve_with_threads(socket, PROVIDER_THREADS)
    }

    /// [`KeyDb::serve`] with `threads` worker threads.
    pub fn serve_with_threads(&self, socket: &Path, threads: usize) -> ProviderServer {
        self.serve_using(Provider::Python, socket, threads)
    }

    /// Starts `provider` in socket mode on `socket` with `threads` worker threads;
    /// returns once it accepts connections.
    pub fn serve_using(&self, provider: Provider, socket: &Path, threads: usize) -> ProviderServer {
        let command = provider.command();
        let mut child = Command::new(&command[0])
            .args(&command[1..])
            .args(self.provider_args())
            .arg("--threads")
            .arg(threads.to_string())
            .arg("--serve")
            .arg(socket)
            // The Rust provider logs to stderr: warnings only, unless asked.
            .env(LOG_ENV, std::env::var(LOG_ENV).unwrap_or_else(|_| "warn".to_owned()))
            .stdin(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("start the {} socket provider: {e}", provider.name()));
        let start = Instant::now();
        while UnixStream::connect(socket).is_err() {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "the {} socket provider exited with {status} before listening",
                    provider.name()
                );
            }
            if start.elapsed() > PROVIDER_START {
                let _ = child.kill();
                panic!(
                    "the {} socket provider did not listen on {} within {PROVIDER_START:?}",
                    provider.name(),
                    socket.display()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        ProviderServer {
            child,
            socket: socket.to_owned(),
        }
    }
}

impl Drop for KeyDb {
    fn drop(&mut self) {
        clean_up(&format!("DROP DATABASE IF EXISTS `{}`", self.name));
    }
}

/// Runs `sql` as root, ignoring any failure: for `Drop`, where [`mariadb`]'s panic
/// while panicking would abort the test run.
fn clean_up(sql: &str) {
    let (host, port) = server();
    let _ = Command::new("mariadb")
        .args(["--protocol=tcp", "-h", &host, "-P", &port, "-u", "root", "-e", sql])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
}

/// A MariaDB user made by [`KeyDb::create_user`]; dropped on drop.
#[derive(Debug)]
pub struct DbUser {
    name: String,
}

impl DbUser {
    /// The user's name.
    pub fn name(&self) -> &str {
        &self.name
    }
}

impl Drop for DbUser {
    fn drop(&mut self) {
        clean_up(&format!("DROP USER IF EXISTS '{}'@'%'", self.name));
    }
}

/// A socket provider; killed on drop.
#[derive(Debug)]
pub struct ProviderServer {
    child: Child,
    socket: PathBuf,
}

impl ProviderServer {
    /// Its process ID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Its socket.
    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends SIGTERM and waits for it to exit.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("a pid"));
        nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("SIGTERM the provider");
        self.child.wait().expect("wait for the provider")
    }
}

impl Drop for ProviderServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.socket);
    }
}

/// Starts agent `id` of `server` running key-request against `db`, installed the
/// way an operator would: upload, policy, sync-config (all through `api`).
pub async fn key_provider(server: &crate::Server, api: &crate::Api, id: &str, db: &KeyDb) -> crate::Agent {
    let mut agent = crate::Agent::enrolled(server, id);
    agent.start();
    api.online(id).await;
    let plugin = std::fs::read(crate::bin("key-request")).expect("the key-request binary");
    let (status, body) = server.upload("key-request", "1", "exec", plugin).await;
    assert!(status == 201 || status == 409, "upload: {status} {body}");
    let detail = serde_json::json!({"exec_path": db.exec_path(), "timeout": 10}).to_string();
    let policy = serde_json::json!({"name": format!("key-request-{id}"), "component": "key-request", "version": "1",
                        "detail": detail, "target": {"agents": [id]}});
    let (status, body) = api.post("/api/v1/policies", &policy).await;
    assert_eq!(status, 201, "{body}");
    let (_, task) = api
        .post(
            "/api/v1/tasks",
            &serde_json::json!({"kind": "sync-config", "target": {"agents": [id]}}),
        )
        .await;
    let id = task["id"].as_str().unwrap_or_else(|| panic!("a task: {task}"));
    api.task_in_state(id, "succeeded", Duration::from_secs(60)).await;
    agent
}
