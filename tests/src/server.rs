//! A `keel-server serve` of a test's own ([`Server`]), in a temporary directory
//! with its own CA, admin token and registry (SQLite, or a fresh PostgreSQL schema
//! with `KEEL_TEST_STORE=postgres`), and what it wrote to its sink.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use serde_json::Value;
use tempfile::TempDir;

use crate::{Api, bin, eventually, output_ok, signal, toml_path, wait_bounded};

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

    pub(crate) fn log_path(&self) -> PathBuf {
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
            .env("KEEL_LOG", crate::log_filter("info,keel_server=debug"))
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
pub(crate) fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A failed test's view of a process's log: every panic, warning and error in it
/// (the first 60), then its last 40 lines.
pub(crate) fn failure_report(log: &str) -> String {
    let alarms: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("panicked") || l.contains(" WARN ") || l.contains(" ERROR "))
        .take(60)
        .collect();
    format!(
        "panics, warnings and errors:\n{}\n-- last 40 lines --\n{}",
        alarms.join("\n"),
        tail(log, 40)
    )
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        if std::thread::panicking() {
            eprintln!("---- keel-server log ----\n{}", failure_report(&self.log()));
        }
    }
}

/// The sink's records of one data_type.
pub fn sink_records(server: &Server, data_type: i64) -> Vec<Value> {
    server
        .sink_lines()
        .into_iter()
        .filter(|l| l["data_type"].as_i64() == Some(data_type))
        .collect()
}
