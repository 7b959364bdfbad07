//! The shared end-to-end harness: real `keel-server` and `keel-agent` processes,
//! listening on 127.0.0.1 with ports the kernel picks, each in its own temporary
//! directory. Tests wait on conditions with [`eventually`], never on fixed sleeps.
//!
//! The binaries are the workspace's own debug builds; `./build.sh test` builds
//! them before running the tests.
// A harness reports failure by panicking, with a message saying what failed.
#![allow(clippy::expect_used, clippy::unwrap_used)]

pub mod cluster;
pub mod filedelivery;
pub mod mariadb;
pub mod metrics;
pub mod netns;
pub mod proxy;

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::{Duration, Instant};

use keel_proto::grpc::transfer_client::TransferClient;
use keel_proto::grpc::{Command as GrpcCommand, PackagedData};
use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tempfile::TempDir;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

/// A port free on 127.0.0.1 now, for a process that must be told its port
/// before it starts.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// How long [`eventually`] waits by default.
pub const DEADLINE: Duration = Duration::from_secs(30);

/// Path of a workspace binary of the same build as the running executable: next to
/// it (a binary such as `keel-bench`) or one level up (a test in `deps/`).
pub fn bin(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe.parent().expect("executable directory");
    let candidates = [dir.join(name), dir.parent().map(|p| p.join(name)).unwrap_or_default()];
    let found = candidates.iter().find(|p| p.is_file()).cloned();
    found.unwrap_or_else(|| {
        panic!(
            "{name} is missing next to {}: build the binaries first (`cargo build --bins`, or ./build.sh test)",
            exe.display()
        )
    })
}

/// Every file below `dir`, at any depth (none when it cannot be read).
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            out.extend(files_under(&path));
        } else {
            out.push(path);
        }
    }
    out
}

/// Polls `check` every 50 ms until it returns `Some`, or panics naming `what`
/// after `deadline`.
pub async fn eventually_within<T, F, Fut>(deadline: Duration, what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(
            start.elapsed() < deadline,
            "timed out after {deadline:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// [`eventually_within`] with the default deadline.
pub async fn eventually<T, F, Fut>(what: &str, check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    eventually_within(DEADLINE, what, check).await
}

fn toml_path(p: &Path) -> String {
    format!("{:?}", p.display().to_string())
}

/// Sends `sig` to `child`.
pub fn signal(child: &Child, sig: nix::sys::signal::Signal) {
    if let Ok(pid) = i32::try_from(child.id()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
    }
}

/// Waits for `child` to exit, at most `limit`: its status, or `None` if it still runs.
pub fn wait_bounded(child: &mut Child, limit: Duration) -> Option<ExitStatus> {
    let start = Instant::now();
    loop {
        if let Ok(Some(status)) = child.try_wait() {
            return Some(status);
        }
        if start.elapsed() > limit {
            return None;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn output_ok(out: Output, what: &str) -> String {
    assert!(
        out.status.success(),
        "{what} failed with {}: {}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Options for a test server.
#[derive(Debug, Clone, Default)]
pub struct ServerOptions {
    /// Extra TOML appended to the generated `server.toml` (sections allowed).
    pub extra_toml: String,
    /// Serve HTTPS on the HTTP port instead of plain HTTP.
    pub https: bool,
    /// Create a release key (agents then pin it).
    pub release_key: bool,
    /// The registry's URL. Unset: [`test_database`].
    pub database_url: Option<String>,
    /// Share this CA directory (another server's) instead of making a CA.
    pub pki_dir: Option<PathBuf>,
    /// Use this admin token (made by a server sharing the registry) instead of
    /// making one.
    pub admin_token: Option<String>,
    /// The gRPC and tunnel ports; 0 lets the kernel pick.
    pub ports: (u16, u16),
    /// Share the gRPC, HTTP and tunnel ports with other processes (SO_REUSEPORT).
    pub reuse_port: bool,
    /// The address gRPC listens on; unset: 127.0.0.1.
    pub grpc_host: Option<String>,
    /// Extra lines of the `[tunnel]` section.
    pub tunnel_toml: String,
    /// Extra lines of the `[http]` section.
    pub http_toml: String,
}

/// The registry URL a test server uses when none is given: a fresh PostgreSQL
/// schema with `KEEL_TEST_STORE=postgres`, else `None` (SQLite).
pub async fn test_database() -> Option<String> {
    if !keel_server::store::tests_on_postgres() {
        return None;
    }
    Some(postgres_schema().await)
}

/// A fresh schema in the tests' PostgreSQL (`KEEL_TEST_POSTGRES`), as a URL.
pub async fn postgres_schema() -> String {
    let base = keel_server::store::test_postgres();
    keel_server::store::fresh_schema(&base)
        .await
        .unwrap_or_else(|e| panic!("a schema in {base} (KEEL_TEST_POSTGRES): {e}"))
}

/// A running `keel-server serve`.
#[derive(Debug)]
pub struct Server {
    /// Everything the server owns lives here.
    pub dir: TempDir,
    /// Its `server.toml`.
    pub config: PathBuf,
    /// Bound gRPC address.
    pub grpc: SocketAddr,
    /// Bound HTTP address (plain, loopback).
    pub http: SocketAddr,
    /// Bound proxy tunnel endpoint.
    pub tunnel: SocketAddr,
    /// An admin API token.
    pub admin_token: String,
    /// The release public key agents pin, if the server has one.
    pub release_public: Option<String>,
    https: bool,
    pki_dir: Option<PathBuf>,
    child: Option<Child>,
}

impl Server {
    /// Initialises a CA and an admin token, then starts serving.
    pub async fn start(opts: ServerOptions) -> Server {
        keel_common::tls::install_crypto_provider();
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("server.toml");
        let database_url = match &opts.database_url {
            Some(u) => Some(u.clone()),
            None => test_database().await,
        };
        let mut sections = String::new();
        if let Some(url) = &database_url {
            // Few connections each: many test servers share one PostgreSQL.
            sections.push_str(&format!("[database]\nurl = {url:?}\nmax_connections = 6\n"));
        }
        if let Some(pki) = &opts.pki_dir {
            sections.push_str(&format!("[pki]\ndir = {}\n", toml_path(pki)));
        }
        let (grpc_port, tunnel_port) = opts.ports;
        let reuse = opts.reuse_port;
        let grpc_host = opts.grpc_host.as_deref().unwrap_or("127.0.0.1");
        let text = format!(
            "data_dir = {}\n{}\n{sections}[grpc]\nlisten = \"{grpc_host}:{grpc_port}\"\nreuse_port = {reuse}\n\
             [tunnel]\nlisten = \"127.0.0.1:{tunnel_port}\"\nreuse_port = {reuse}\n{}\n\
             [http]\nlisten = \"127.0.0.1:0\"\ntls = {}\n{}\n",
            toml_path(&dir.path().join("data")),
            opts.extra_toml,
            opts.tunnel_toml,
            opts.https,
            opts.http_toml
        );
        std::fs::write(&config, text).expect("write server.toml");
        let mut server = Server {
            dir,
            config,
            grpc: SocketAddr::from(([127, 0, 0, 1], 0)),
            http: SocketAddr::from(([127, 0, 0, 1], 0)),
            tunnel: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_token: String::new(),
            release_public: None,
            https: opts.https,
            pki_dir: opts.pki_dir.clone(),
            child: None,
        };
        if opts.pki_dir.is_none() {
            server.cli(&["ca", "init"]);
            if opts.release_key {
                server.release_public = Some(server.cli(&["ca", "release-key"]));
            }
        }
        server.admin_token = match &opts.admin_token {
            Some(t) => t.clone(),
            None => server.cli(&["token", "create", "--admin"]),
        };
        server.spawn(None).await;
        server
    }

    /// Runs `keel-server --config … <args>` and returns its stdout; panics on failure.
    pub fn cli(&self, args: &[&str]) -> String {
        output_ok(self.cli_output(args), &format!("keel-server {}", args.join(" ")))
    }

    /// Runs `keel-server --config … <args>`.
    pub fn cli_output(&self, args: &[&str]) -> Output {
        Command::new(bin("keel-server"))
            .arg("--config")
            .arg(&self.config)
            .args(args)
            .env_remove("KEEL_LOG")
            .output()
            .expect("run keel-server")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("server.stderr")
    }

    async fn spawn(&mut self, addrs: Option<(SocketAddr, SocketAddr)>) {
        let ready = self.dir.path().join("ready.json");
        let _ = std::fs::remove_file(&ready);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let mut cmd = Command::new(bin("keel-server"));
        cmd.arg("--config")
            .arg(&self.config)
            .arg("serve")
            .arg("--ready-file")
            .arg(&ready);
        if let Some((grpc, http)) = addrs {
            cmd.arg("--grpc-listen")
                .arg(grpc.to_string())
                .arg("--http-listen")
                .arg(http.to_string());
        }
        let child = cmd
            .env("KEEL_LOG", "info,keel_server=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel-server");
        self.child = Some(child);
        let bound: Value = eventually("keel-server to listen", || async {
            let text = std::fs::read_to_string(&ready).ok()?;
            serde_json::from_str(&text).ok()
        })
        .await;
        self.grpc = bound["grpc"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("grpc address");
        self.http = bound["http"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("http address");
        self.tunnel = bound["tunnel"]
            .as_str()
            .and_then(|s| s.parse().ok())
            .expect("tunnel address");
    }

    /// SIGKILLs the server.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERMs the server and waits for it to exit.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = wait_bounded(&mut child, Duration::from_secs(15));
        if status.is_none() {
            let _ = child.kill();
        }
        status
    }

    /// Starts the server again on the same addresses.
    pub async fn restart(&mut self) {
        self.kill();
        self.spawn(Some((self.grpc, self.http))).await;
    }

    /// The process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The data directory.
    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// The PKI directory.
    pub fn pki_dir(&self) -> PathBuf {
        self.pki_dir.clone().unwrap_or_else(|| self.data_dir().join("pki"))
    }

    /// The CA certificate.
    pub fn ca_pem(&self) -> String {
        std::fs::read_to_string(self.pki_dir().join("ca.pem")).expect("ca.pem")
    }

    /// The CA fingerprint agents pin.
    pub fn fingerprint(&self) -> String {
        self.cli(&["ca", "fingerprint"])
    }

    /// A new enrollment token.
    pub fn enrollment_token(&self, uses: u32, ttl: &str) -> String {
        self.cli(&["token", "create", "--uses", &uses.to_string(), "--ttl", ttl])
    }

    /// `http://127.0.0.1:port`, or `https://…` for an HTTPS server.
    pub fn base_url(&self) -> String {
        let scheme = if self.https { "https" } else { "http" };
        format!("{scheme}://{}", self.http)
    }

    /// An API client with `token`, trusting only this server's CA.
    pub fn api_with(&self, token: &str) -> Api {
        let mut roots = rustls::RootCertStore::empty();
        for cert in rustls::pki_types::CertificateDer::pem_slice_iter(self.ca_pem().as_bytes()) {
            roots.add(cert.expect("CA PEM")).expect("CA certificate");
        }
        let tls = rustls::ClientConfig::builder()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .build()
            .expect("HTTP client");
        Api {
            client,
            base: self.base_url(),
            token: token.to_owned(),
        }
    }

    /// An API client with the admin token.
    pub fn api(&self) -> Api {
        self.api_with(&self.admin_token)
    }

    /// Uploads a package through the API.
    pub async fn upload(&self, name: &str, version: &str, kind: &str, bytes: Vec<u8>) -> (u16, Value) {
        let url = format!("{}/api/v1/components/{name}/versions", self.base_url());
        let req = self
            .api()
            .client
            .post(url)
            .query(&[("version", version), ("type", kind)])
            .body(bytes);
        self.api().send(req).await
    }

    /// Replaces an agent's desired plugin set through the API.
    pub async fn put_plugins(&self, agent: &str, set: &Value) -> (u16, Value) {
        let url = format!("{}/api/v1/agents/{agent}/plugins", self.base_url());
        let api = self.api();
        let req = api.client.put(url).json(set);
        api.send(req).await
    }

    /// All record lines the file sink wrote.
    pub fn sink_lines(&self) -> Vec<Value> {
        let dir = self.data_dir().join("records");
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .map(|d| d.filter_map(|e| e.ok().map(|e| e.path())).collect())
            .unwrap_or_default();
        files.sort();
        files
            .iter()
            .flat_map(|f| {
                std::fs::read_to_string(f)
                    .unwrap_or_default()
                    .lines()
                    .map(str::to_owned)
                    .collect::<Vec<_>>()
            })
            .filter_map(|l| serde_json::from_str(&l).ok())
            .collect()
    }
}

/// The last `n` lines of a log, for failure reports.
fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- keel-server log (last 40 lines) ----\n{}", tail(&self.log(), 40));
        }
    }
}

/// A JSON API client.
#[derive(Debug, Clone)]
pub struct Api {
    client: reqwest::Client,
    base: String,
    token: String,
}

impl Api {
    /// A client for `base` with a bearer `token` (empty: none).
    pub fn new(base: &str, token: &str) -> Self {
        keel_common::tls::install_crypto_provider();
        Self {
            client: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let (status, _, text) = self.send_raw(req).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends `req` (with the token, if any) and returns the status, the content
    /// type and the body as text.
    pub async fn send_raw(&self, req: reqwest::RequestBuilder) -> (u16, String, String) {
        let req = if self.token.is_empty() {
            req
        } else {
            req.bearer_auth(&self.token)
        };
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, kind, resp.text().await.unwrap_or_default())
    }

    /// The underlying client, to build unusual requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a request built with [`Api::client`], with the token.
    pub async fn send_request(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        self.send(req).await
    }

    /// PUT `path` without a body.
    pub async fn put(&self, path: &str) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base))).await
    }

    /// PUT JSON `body` to `path`.
    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE `path`.
    pub async fn send_delete(&self, path: &str) -> (u16, Value) {
        self.send(self.client.delete(format!("{}{path}", self.base))).await
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.base))).await
    }

    /// POST JSON `body` to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POST raw text as JSON to `path`.
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        self.send(req.body(body.to_owned())).await
    }

    /// GET `path`: the status, the `X-Total-Count` and `X-Next-Cursor` headers,
    /// and the body.
    pub async fn get_page(&self, path: &str) -> (u16, Option<i64>, Option<String>, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("HTTP request");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let total = header("x-total-count").and_then(|t| t.parse().ok());
        let next = header("x-next-cursor");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            total,
            next,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Every agent, page after page.
    pub async fn agents(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut path = "/api/v1/agents?limit=1000".to_owned();
        loop {
            let (status, _, next, body) = self.get_page(&path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            out.extend(body.as_array().cloned().unwrap_or_default());
            match next {
                Some(cursor) => path = format!("/api/v1/agents?limit=1000&cursor={cursor}"),
                None => return out,
            }
        }
    }

    /// One agent, if registered.
    pub async fn agent(&self, id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/v1/agents/{id}")).await;
        (status == 200).then_some(body)
    }

    /// Waits up to `deadline` for task `id` to reach state `want`, and returns it.
    pub async fn task_in_state(&self, id: &str, want: &str, deadline: Duration) -> Value {
        eventually_within(deadline, &format!("task {id} to be {want}"), || async {
            let (_, t) = self.get(&format!("/api/v1/tasks/{id}")).await;
            (t["state"] == want).then_some(t)
        })
        .await
    }

    /// Waits until the agent is online with a heartbeat, and returns it.
    pub async fn online(&self, id: &str) -> Value {
        eventually(&format!("agent {id} online with a heartbeat"), || async {
            self.agent(id)
                .await
                .filter(|a| a["online"] == true && !a["last_heartbeat"].is_null())
        })
        .await
    }
}

/// A `keel-agent` with its own state directory.
#[derive(Debug)]
pub struct Agent {
    /// State, logs and configuration.
    pub dir: TempDir,
    /// Its `agent.toml`.
    pub config: PathBuf,
    /// Its ID.
    pub id: String,
    /// The `keel-agent` executable it runs: the workspace build unless replaced.
    pub exe: PathBuf,
    child: Option<Child>,
}

impl Agent {
    /// An agent configured for `server` with an explicit ID. `extra` is TOML
    /// appended at the end (it may open sections other than the ones written here).
    pub fn new(server: &Server, id: &str, extra: &str) -> Agent {
        Agent::with(server, id, "", extra)
    }

    /// Like [`Agent::new`], with `plugins` added to the `[plugins]` section.
    pub fn with(server: &Server, id: &str, plugins: &str, extra: &str) -> Agent {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("agent.toml");
        let key = server.release_public.as_deref().unwrap_or_default();
        let text = format!(
            "[agent]\nid = {id:?}\nstate_dir = {}\nlog_dir = {}\nheartbeat_interval = \"2s\"\nshutdown_grace = \"5s\"\n\
             [server]\nprivate = [\"{}\"]\nbackoff_min = \"200ms\"\nbackoff_max = \"1s\"\n\
             [plugins]\nrelease_public_key = {key:?}\nplugin_stop_grace = \"1s\"\nstop_grace = \"2s\"\nrestart_backoff_min = \"200ms\"\nrestart_backoff_max = \"2s\"\n{plugins}\n{extra}\n",
            toml_path(&dir.path().join("state")),
            toml_path(&dir.path().join("log")),
            server.grpc
        );
        std::fs::write(&config, text).expect("write agent.toml");
        Agent {
            dir,
            config,
            id: id.to_owned(),
            exe: bin("keel-agent"),
            child: None,
        }
    }

    /// An enrolled agent, not yet running.
    pub fn enrolled(server: &Server, id: &str) -> Agent {
        Agent::enrolled_with(server, id, "")
    }

    /// An enrolled agent with extra `[plugins]` settings, not yet running.
    pub fn enrolled_with(server: &Server, id: &str, plugins: &str) -> Agent {
        let agent = Agent::with(server, id, plugins, "");
        let out = agent.enroll(server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
        assert_eq!(output_ok(out, "keel-agent enroll"), id);
        agent
    }

    /// `keel-agent --config … <args>`.
    pub fn cmd(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(&self.exe);
        cmd.arg("--config").arg(&self.config).args(args).env_remove("KEEL_LOG");
        cmd
    }

    /// Runs `keel-agent enroll` against `server`.
    pub fn enroll(&self, server: &Server, token: &str, fingerprint: Option<&str>) -> Output {
        let mut cmd = self.cmd(&["enroll", "--server", &server.base_url()]);
        if let Some(fp) = fingerprint {
            cmd.arg("--ca-fingerprint").arg(fp);
        }
        cmd.env("KEEL_ENROLL_TOKEN", token)
            .output()
            .expect("run keel-agent enroll")
    }

    /// Runs `keel-agent enroll --key-file` against `server` with `key` in a 0600
    /// file; the lookup ID is the configured agent ID (none: by address).
    pub fn enroll_by_key(&self, server: &Server, key: &str) -> Output {
        let path = self.dir.path().join("agent.key");
        keel_common::fsutil::write_private(&path, format!("{key}\n").as_bytes()).expect("write the key file");
        self.cmd(&[
            "enroll",
            "--server",
            &server.base_url(),
            "--ca-fingerprint",
            &server.fingerprint(),
        ])
        .arg("--key-file")
        .arg(&path)
        .output()
        .expect("run keel-agent enroll")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("agent.stderr")
    }

    /// Starts `keel-agent run`.
    pub fn start(&mut self) {
        let cmd = self.cmd(&["run"]);
        self.spawn(cmd);
    }

    /// Runs the agent inside network namespace `ns` (see [`netns::NetNs`]).
    pub fn start_in(&mut self, ns: &netns::NetNs) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &ns.name])
            .arg(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("KEEL_LOG");
        self.spawn(cmd);
    }

    /// Starts `keel-agent run` holding `fd` open without close-on-exec, as a
    /// careless parent process would leave it.
    pub fn start_with_inherited_fd(&mut self, fd: u32) {
        let mut cmd = Command::new("sh");
        cmd.arg("-c")
            .arg(format!("exec {fd}</dev/null; exec \"$0\" \"$@\""))
            .arg(&self.exe)
            .arg("--config")
            .arg(&self.config)
            .arg("run")
            .env_remove("KEEL_LOG");
        self.spawn(cmd);
    }

    fn spawn(&mut self, mut cmd: Command) {
        assert!(self.child.is_none(), "agent already running");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .expect("log file");
        let child = cmd
            .env("KEEL_LOG", "info,keel_agent=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("spawn keel-agent");
        self.child = Some(child);
    }

    /// The process ID while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// SIGKILLs the agent (its plugins live on until they find their pipes gone).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM, and the exit status if it stopped within `limit`.
    pub fn stop_within(&mut self, limit: Duration) -> Option<ExitStatus> {
        let mut child = self.child.take()?;
        signal(&child, nix::sys::signal::Signal::SIGTERM);
        let status = wait_bounded(&mut child, limit);
        if status.is_none() {
            let _ = child.kill();
            let _ = child.wait();
        }
        status
    }

    /// Everything the agent logged to stderr so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The state directory.
    pub fn state_dir(&self) -> PathBuf {
        self.dir.path().join("state")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if std::thread::panicking() {
            eprintln!(
                "---- keel-agent {} log (last 40 lines) ----\n{}",
                self.id,
                tail(&self.log(), 40)
            );
        }
    }
}

/// A certificate and key in PEM.
#[derive(Debug, Clone)]
pub struct Pair {
    /// Certificate.
    pub cert: String,
    /// Private key.
    pub key: String,
}

fn client_params(
    agent_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> rcgen::CertificateParams {
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, agent_id);
    params.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.not_before = not_before;
    params.not_after = not_after;
    params
}

/// A client certificate for `agent_id` signed by the server's real CA key, with
/// the given validity: for certificates the server would never issue.
pub fn ca_signed(
    server: &Server,
    agent_id: &str,
    not_before: time::OffsetDateTime,
    not_after: time::OffsetDateTime,
) -> Pair {
    let ca_key = rcgen::KeyPair::from_pem(&std::fs::read_to_string(server.pki_dir().join("ca.key")).expect("ca.key"))
        .expect("CA key");
    let issuer = rcgen::Issuer::from_ca_cert_pem(&server.ca_pem(), ca_key).expect("CA issuer");
    let key = rcgen::KeyPair::generate().expect("key");
    let cert = client_params(agent_id, not_before, not_after)
        .signed_by(&key, &issuer)
        .expect("sign");
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// A client certificate for `agent_id` from a CA the server does not know.
pub fn foreign_signed(agent_id: &str) -> Pair {
    let ca_key = rcgen::KeyPair::generate().expect("key");
    let mut ca = rcgen::CertificateParams::default();
    ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    ca.distinguished_name.push(rcgen::DnType::CommonName, "Keel CA");
    let issuer = rcgen::Issuer::new(ca, ca_key);
    let key = rcgen::KeyPair::generate().expect("key");
    let now = time::OffsetDateTime::now_utc();
    let cert = client_params(agent_id, now - time::Duration::hours(1), now + time::Duration::days(1))
        .signed_by(&key, &issuer)
        .expect("sign");
    Pair {
        cert: cert.pem(),
        key: key.serialize_pem(),
    }
}

/// The identity an enrolled agent stored.
pub fn agent_pair(agent: &Agent) -> Pair {
    let pki = agent.state_dir().join("pki");
    Pair {
        cert: std::fs::read_to_string(pki.join("agent.pem")).expect("agent.pem"),
        key: std::fs::read_to_string(pki.join("agent.key")).expect("agent.key"),
    }
}

/// A raw mTLS gRPC channel to `server`, with `identity` as the client (or none).
pub async fn raw_channel(server: &Server, identity: Option<&Pair>) -> Result<Channel, tonic::transport::Error> {
    let mut tls = ClientTlsConfig::new().ca_certificate(Certificate::from_pem(server.ca_pem()));
    if let Some(p) = identity {
        tls = tls.identity(Identity::from_pem(&p.cert, &p.key));
    }
    Endpoint::from_shared(format!("https://{}", server.grpc))
        .expect("endpoint")
        .tls_config(tls)?
        .connect_timeout(Duration::from_secs(5))
        .connect()
        .await
}

/// An open Transfer stream: send `PackagedData`, read `Command`s.
#[derive(Debug)]
pub struct RawStream {
    /// Outbound half.
    pub tx: mpsc::Sender<PackagedData>,
    /// Inbound half.
    pub rx: tonic::Streaming<GrpcCommand>,
}

/// Opens a Transfer stream as `identity`, or returns why it failed.
pub async fn raw_stream(server: &Server, identity: Option<&Pair>) -> Result<RawStream, String> {
    let channel = raw_channel(server, identity)
        .await
        .map_err(|e| format!("connect: {e:?}"))?;
    let (tx, rx) = mpsc::channel(16);
    let response = TransferClient::new(channel)
        .transfer(ReceiverStream::new(rx))
        .await
        .map_err(|s| format!("transfer: {s:?}"))?;
    Ok(RawStream {
        tx,
        rx: response.into_inner(),
    })
}

/// A minimal valid batch for `agent_id`.
pub fn batch(agent_id: &str, seq: u64, epoch: u64, records: Vec<keel_proto::grpc::EncodedRecord>) -> PackagedData {
    PackagedData {
        records,
        agent_id: agent_id.to_owned(),
        hostname: "raw-client".into(),
        version: "test".into(),
        product: "keel-agent".into(),
        seq,
        epoch,
        ..Default::default()
    }
}

/// Tries to open a stream as `identity` and send one batch for `agent_id`; returns
/// how it was refused. Panics if the server accepts it.
pub async fn stream_refusal(server: &Server, identity: Option<&Pair>, agent_id: &str) -> String {
    let mut s = match raw_stream(server, identity).await {
        Err(e) => return e,
        Ok(s) => s,
    };
    // With TLS 1.3 the server checks the client certificate after the client
    // considers the handshake done, so the refusal may surface here instead.
    if s.tx.send(batch(agent_id, 1, 1, Vec::new())).await.is_err() {
        return "send failed".into();
    }
    match tokio::time::timeout(Duration::from_secs(10), s.rx.message()).await {
        Ok(Err(status)) => format!("{status:?}"),
        Ok(Ok(None)) => "stream closed".into(),
        Ok(Ok(Some(cmd))) => panic!("the server accepted the stream and answered {cmd:?}"),
        Err(_) => panic!("the server neither refused nor answered the stream"),
    }
}

/// The body of `POST /enroll/key` for `id`: a fresh CSR and the proof of `key`
/// over `nonce` and that CSR, as `keel-agent enroll --key-file` sends it.
pub fn key_enroll_body(nonce: &str, id: &str, key: &str, hostname: &str) -> Value {
    use sha2::Digest;
    let key_pair = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params = rcgen::CertificateParams::default();
    let mut dn = rcgen::DistinguishedName::new();
    dn.push(rcgen::DnType::CommonName, id);
    params.distinguished_name = dn;
    let csr = params.serialize_request(&key_pair).expect("CSR");
    let csr_sha256 = sha2::Sha256::digest(csr.der());
    let proof = keel_proto::keyproof::prove(key, &hex::decode(nonce).expect("hex nonce"), &csr_sha256);
    serde_json::json!({"nonce": nonce, "id": id, "hostname": hostname, "csr": csr.pem().expect("PEM"), "proof": proof})
}

/// The bytes of the test plugin executable, to upload as an `exec` package.
pub fn test_plugin() -> Vec<u8> {
    std::fs::read(bin("keel-test-plugin")).expect("keel-test-plugin binary")
}

/// The sink's records of one data_type.
pub fn sink_records(server: &Server, data_type: i64) -> Vec<Value> {
    server
        .sink_lines()
        .into_iter()
        .filter(|l| l["data_type"].as_i64() == Some(data_type))
        .collect()
}

/// How a [`SimAgent`] answers.
#[derive(Debug, Clone, Default)]
pub struct SimBehavior {
    /// Answer a configuration naming any of these plugins with a failure.
    pub fail_plugins: Vec<String>,
    /// Wait this long before answering a configuration or task.
    pub answer_after: Duration,
    /// Download each configured package from its first URL and check its sha256
    /// before answering, as a real agent does.
    pub download: bool,
}

/// What a [`SimAgent`] saw.
#[derive(Debug, Default)]
pub struct SimLog {
    /// Each configuration received: (name, version) pairs.
    pub configs: Vec<Vec<(String, String)>>,
    /// Each task received: (data_type, object_name, token).
    pub tasks: Vec<(i32, String, String)>,
}

/// Configurations being worked on by all simulated agents right now, and the most
/// there ever were at once: how many agents a rollout had in flight.
#[derive(Debug, Default)]
pub struct InFlight {
    now: std::sync::atomic::AtomicUsize,
    /// The highest `now` seen.
    pub max: std::sync::atomic::AtomicUsize,
}

/// An agent simulated in-process over a real mTLS stream, with a certificate from
/// the server's CA: it registers with a heartbeat, and answers configurations and
/// tasks with 5100 results. For tests and benchmarks that need many agents.
#[derive(Debug)]
pub struct SimAgent {
    /// Agent ID.
    pub id: String,
    /// What it received.
    pub log: std::sync::Arc<std::sync::Mutex<SimLog>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for SimAgent {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn payload(fields: &[(&str, &str)]) -> bytes::Bytes {
    keel_proto::payload::encode(fields.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())))
}

fn record(data_type: i32, fields: &[(&str, &str)]) -> keel_proto::grpc::EncodedRecord {
    keel_proto::grpc::EncodedRecord {
        data_type,
        timestamp: 1_700_000_000,
        data: payload(fields),
        ..Default::default()
    }
}

impl SimAgent {
    /// Connects, registers with a heartbeat and starts answering.
    pub async fn start(
        server: &Server,
        id: &str,
        behavior: SimBehavior,
        inflight: std::sync::Arc<InFlight>,
    ) -> SimAgent {
        let now = time::OffsetDateTime::now_utc();
        let pair = ca_signed(
            server,
            id,
            now - time::Duration::hours(1),
            now + time::Duration::days(1),
        );
        let mut stream = raw_stream(server, Some(&pair)).await.expect("sim agent stream");
        let heartbeat = record(
            keel_proto::data_type::AGENT_HEARTBEAT,
            &[
                ("arch", "x86_64"),
                ("platform", "debian"),
                ("platform_family", "debian"),
                ("package_type", "deb"),
            ],
        );
        let epoch = 7;
        stream
            .tx
            .send(batch(id, 1, epoch, vec![heartbeat]))
            .await
            .expect("sim heartbeat");
        let log = std::sync::Arc::new(std::sync::Mutex::new(SimLog::default()));
        let agent_id = id.to_owned();
        let shared = std::sync::Arc::clone(&log);
        let task = tokio::spawn(async move {
            let mut seq = 1;
            while let Ok(Some(cmd)) = stream.rx.message().await {
                let working = cmd.task.is_some() || (cmd.ack.is_none() && cmd.renewal.is_none());
                if working {
                    let n = inflight.now.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                    inflight.max.fetch_max(n, std::sync::atomic::Ordering::SeqCst);
                }
                let answer = if let Some(t) = cmd.task {
                    shared
                        .lock()
                        .unwrap()
                        .tasks
                        .push((t.data_type, t.object_name.clone(), t.token.clone()));
                    Some((t.token, true, "done by a simulated agent".to_owned()))
                } else if cmd.ack.is_none() && cmd.renewal.is_none() {
                    let entries: Vec<(String, String)> = cmd
                        .configs
                        .iter()
                        .map(|c| (c.name.clone(), c.version.clone()))
                        .collect();
                    let mut failure = entries
                        .iter()
                        .find(|(n, _)| behavior.fail_plugins.contains(n))
                        .map(|(n, _)| format!("plugin {n} does not keep running (simulated)"));
                    if behavior.download && failure.is_none() {
                        for c in &cmd.configs {
                            if let Err(e) = sim_download(c).await {
                                failure = Some(format!("cannot download {}: {e}", c.name));
                                break;
                            }
                        }
                    }
                    shared.lock().unwrap().configs.push(entries);
                    let ok = failure.is_none();
                    let msg = failure.unwrap_or_else(|| "configuration applied (simulated)".to_owned());
                    Some((cmd.config_token, ok, msg)).filter(|(t, _, _)| !t.is_empty())
                } else {
                    None
                };
                if answer.is_some() {
                    tokio::time::sleep(behavior.answer_after).await;
                }
                if working {
                    inflight.now.fetch_sub(1, std::sync::atomic::Ordering::SeqCst);
                }
                let Some((token, ok, msg)) = answer else { continue };
                seq += 1;
                let status = if ok { "succeeded" } else { "failed" };
                let result = record(
                    keel_proto::data_type::TASK_RESULT,
                    &[("token", &token), ("status", status), ("msg", &msg)],
                );
                if stream
                    .tx
                    .send(batch(&agent_id, seq, epoch, vec![result]))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        SimAgent {
            id: id.to_owned(),
            log,
            task,
        }
    }
}

/// Fetches a configured package and checks its sha256.
async fn sim_download(c: &keel_proto::grpc::Config) -> Result<(), String> {
    use sha2::Digest;
    static CLIENT: std::sync::OnceLock<reqwest::Client> = std::sync::OnceLock::new();
    let client = CLIENT.get_or_init(reqwest::Client::new);
    let url = c.download_urls.first().ok_or("no download URL")?;
    let response = client.get(url).send().await.map_err(|e| e.to_string())?;
    if !response.status().is_success() {
        return Err(format!("{url}: {}", response.status()));
    }
    let body = response.bytes().await.map_err(|e| e.to_string())?;
    let digest = hex::encode(sha2::Sha256::digest(&body));
    if digest != c.sha256 {
        return Err(format!("{url}: sha256 {digest}, expected {}", c.sha256));
    }
    Ok(())
}

/// The directory of the deb and rpm packages `./build.sh test` builds (versions
/// 1.0.0 and 1.0.1), or `None` (with a note on stderr) when it is not set.
pub fn packages() -> Option<PathBuf> {
    match std::env::var_os("KEEL_TEST_PACKAGES") {
        Some(dir) => Some(PathBuf::from(dir)),
        None => {
            eprintln!("SKIPPED: KEEL_TEST_PACKAGES is not set (./build.sh test builds the packages and sets it)");
            None
        }
    }
}

/// The path of a deb in `dir`.
pub fn deb(dir: &Path, name: &str, version: &str) -> PathBuf {
    dir.join(format!("{name}_{version}_amd64.deb"))
}

/// Runs a command that must succeed; returns its stdout.
pub fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// An empty root for dpkg: its database and the account files useradd edits.
pub fn throwaway_root() -> TempDir {
    let root = tempfile::tempdir().expect("tempdir");
    let r = root.path();
    std::fs::create_dir_all(r.join("var/lib/dpkg/info")).expect("dpkg dir");
    std::fs::create_dir_all(r.join("var/lib/dpkg/updates")).expect("dpkg dir");
    std::fs::create_dir_all(r.join("var/lib/dpkg/alternatives")).expect("alternatives dir");
    std::fs::create_dir_all(r.join("etc/alternatives")).expect("alternatives dir");
    std::fs::create_dir_all(r.join("etc")).expect("etc");
    for (f, text) in [
        ("var/lib/dpkg/status", ""),
        ("var/lib/dpkg/available", ""),
        ("etc/passwd", "root:x:0:0:root:/root:/bin/sh\n"),
        ("etc/group", "root:x:0:\n"),
        ("etc/shadow", "root:*:19000:0:99999:7:::\n"),
        ("etc/gshadow", "root:*::\n"),
    ] {
        std::fs::write(r.join(f), text).expect("root file");
    }
    root
}

/// The dpkg command line for `root`: maintainer scripts run outside it with
/// `DPKG_ROOT` set, as on a machine without systemd; its dependencies (libc6,
/// passwd) are not in the empty root.
pub fn dpkg_command(root: &Path) -> Vec<String> {
    vec![
        "dpkg".into(),
        format!("--root={}", root.display()),
        format!("--admindir={}", root.join("var/lib/dpkg").display()),
        "--force-script-chrootless".into(),
        "--force-depends".into(),
    ]
}

/// Runs dpkg on `root` with `args` and `pkgs`.
pub fn dpkg(root: &Path, args: &[&str], pkgs: &[PathBuf]) -> String {
    let base = dpkg_command(root);
    let mut cmd = Command::new(&base[0]);
    cmd.args(&base[1..]).args(args).args(pkgs);
    run(&mut cmd)
}

/// An agent process restarted whenever it exits, as systemd's `Restart=always`
/// would (for tests without systemd).
#[derive(Debug)]
pub struct Supervisor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How many times it (re)started the agent.
    pub starts: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Agent {
    /// Runs `keel-agent run` under a [`Supervisor`]. The executable is looked up
    /// afresh at every start, so an upgrade that replaces it takes effect.
    pub fn supervise(&self) -> Supervisor {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (exe, config, log) = (self.exe.clone(), self.config.clone(), self.log_path());
        let (flag, count) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&starts));
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log file");
                let child = Command::new(&exe)
                    .arg("--config")
                    .arg(&config)
                    .arg("run")
                    .env("KEEL_LOG", "info,keel_agent=debug")
                    .stdout(Stdio::null())
                    .stderr(out)
                    .spawn();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                loop {
                    if flag.load(std::sync::atomic::Ordering::SeqCst) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Supervisor {
            stop,
            thread: Some(thread),
            starts,
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
