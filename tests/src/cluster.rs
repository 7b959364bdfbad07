//! Several `keel-server` instances on one PostgreSQL schema and one NATS, sharing
//! their gRPC and tunnel ports (SO_REUSEPORT), each with an HTTP port of its own.
//! Each cluster gets its own schema, NATS cluster name, JetStream stream and
//! subjects, so runs never collide.

use std::time::Duration;

use futures::StreamExt;
use serde_json::Value;

use crate::{Server, ServerOptions, eventually};

/// The NATS (with JetStream) the cluster tests use: `KEEL_TEST_NATS`, or the local
/// service.
pub fn nats_url() -> String {
    std::env::var("KEEL_TEST_NATS")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "nats://127.0.0.1:4222".into())
}

/// How a cluster is set up.
#[derive(Debug, Clone)]
pub struct ClusterOptions {
    /// Instances to start.
    pub instances: usize,
    /// The NATS the instances route through and sink to.
    pub nats_url: String,
    /// Records go to JetStream (else each instance's file sink).
    pub nats_sink: bool,
    /// Extra TOML for every instance (sections other than the generated ones).
    pub extra_toml: String,
    /// The instances share the tunnel port too (else each has its own).
    pub shared_tunnel: bool,
}

impl Default for ClusterOptions {
    fn default() -> Self {
        Self {
            instances: 3,
            nats_url: nats_url(),
            nats_sink: true,
            extra_toml: String::new(),
            shared_tunnel: true,
        }
    }
}

/// A running cluster.
#[derive(Debug)]
pub struct Cluster {
    /// The instances, `i1`, `i2`, … in order.
    pub servers: Vec<Server>,
    /// The registry's URL (a schema of its own).
    pub database_url: String,
    /// The NATS cluster name (subjects `keel.<name>.…`).
    pub name: String,
    /// The JetStream stream of the records.
    pub stream: String,
    /// Records of data type N are on `<subject_prefix>.N`.
    pub subject_prefix: String,
    opts: ClusterOptions,
}

impl Cluster {
    /// Starts `opts.instances` instances and waits until each sees all of them live.
    pub async fn start(opts: ClusterOptions) -> Cluster {
        let database_url = crate::postgres_schema().await;
        let tag = uuid_like();
        let mut cluster = Cluster {
            servers: Vec::new(),
            database_url,
            name: format!("t{tag}"),
            stream: format!("KEEL_T{tag}"),
            subject_prefix: format!("keel.t{tag}.records"),
            opts,
        };
        for _ in 0..cluster.opts.instances {
            cluster.add().await;
        }
        let n = cluster.servers.len();
        for s in &cluster.servers {
            eventually("every instance live in discovery", || async {
                let (_, d) = crate::Api::new(&s.base_url(), "").get("/discovery").await;
                (d["instances"].as_array().map(Vec::len) == Some(n)).then_some(())
            })
            .await;
        }
        cluster
    }

    /// The TOML an instance runs with.
    pub fn instance_toml(&self, instance: &str) -> String {
        let mut t = format!(
            "[cluster]\ninstance = {instance:?}\nname = {:?}\nnats_url = {:?}\nlease = \"3s\"\nrenew = \"1s\"\n",
            self.name, self.opts.nats_url
        );
        if self.opts.nats_sink {
            t.push_str(&format!(
                "[sink]\nkind = \"nats\"\nurl = {:?}\nstream = {:?}\nsubject_prefix = {:?}\nack_timeout = \"2s\"\n",
                self.opts.nats_url, self.stream, self.subject_prefix
            ));
        }
        t.push_str(&self.opts.extra_toml);
        t
    }

    /// Starts one more instance; returns its index.
    pub async fn add(&mut self) -> usize {
        let index = self.servers.len();
        let instance = format!("i{}", index + 1);
        let first = self.servers.first();
        let opts = ServerOptions {
            extra_toml: self.instance_toml(&instance),
            database_url: Some(self.database_url.clone()),
            pki_dir: first.map(Server::pki_dir),
            admin_token: first.map(|s| s.admin_token.clone()),
            ports: first.map_or((0, 0), |s| {
                (s.grpc.port(), if self.opts.shared_tunnel { s.tunnel.port() } else { 0 })
            }),
            reuse_port: true,
            release_key: first.is_none(),
            ..ServerOptions::default()
        };
        let server = Server::start(opts).await;
        self.servers.push(server);
        index
    }

    /// The instance ID of server `index`.
    pub fn instance(index: usize) -> String {
        format!("i{}", index + 1)
    }

    /// Which server holds the agent's stream, by the API's `instance`, asked of
    /// the first server still running.
    pub async fn holder(&self, agent_id: &str) -> Option<usize> {
        let alive = self.servers.iter().find(|s| s.pid().is_some())?;
        let a = alive.api().agent(agent_id).await?;
        if a["online"] != true {
            return None;
        }
        let i = a["instance"].as_str()?;
        (0..self.servers.len()).find(|k| Cluster::instance(*k) == i)
    }

    /// The records of `data_type` in JetStream, in stream order.
    pub async fn jetstream_records(&self, data_type: i32) -> Vec<Value> {
        jetstream_records(
            &self.opts.nats_url,
            &self.stream,
            &format!("{}.{data_type}", self.subject_prefix),
        )
        .await
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The servers first, then their JetStream stream (best effort, on a
        // thread of its own: this may run inside the test's runtime).
        self.servers.clear();
        if !self.opts.nats_sink {
            return;
        }
        let (url, stream) = (self.opts.nats_url.clone(), self.stream.clone());
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() else {
                return;
            };
            rt.block_on(async {
                if let Ok(client) = async_nats::connect(url).await {
                    let _ = async_nats::jetstream::new(client).delete_stream(stream).await;
                }
            });
        })
        .join();
    }
}

/// Every message on `subject` of `stream`, decoded as JSON, in stream order.
pub async fn jetstream_records(url: &str, stream: &str, subject: &str) -> Vec<Value> {
    use async_nats::jetstream::consumer;
    let client = async_nats::connect(url).await.expect("connect to NATS");
    let js = async_nats::jetstream::new(client);
    let Ok(stream) = js.get_stream(stream).await else {
        return Vec::new();
    };
    let consumer = stream
        .create_consumer(consumer::pull::Config {
            filter_subject: subject.to_owned(),
            ack_policy: consumer::AckPolicy::None,
            deliver_policy: consumer::DeliverPolicy::All,
            inactive_threshold: Duration::from_secs(30),
            ..Default::default()
        })
        .await
        .expect("a consumer");
    let pending = consumer.cached_info().num_pending;
    let mut out = Vec::new();
    while (out.len() as u64) < pending {
        let mut batch = consumer
            .fetch()
            .max_messages(1000)
            .expires(Duration::from_secs(1))
            .messages()
            .await
            .expect("fetch");
        let before = out.len();
        while let Some(Ok(m)) = batch.next().await {
            out.push(serde_json::from_slice(&m.payload).unwrap_or(Value::Null));
        }
        if out.len() == before {
            break;
        }
    }
    out
}

/// A `nats-server` with JetStream of a test's own, on a free loopback port with
/// its own store directory, that the test may stop and start again.
#[derive(Debug)]
pub struct OwnNats {
    port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl OwnNats {
    /// Starts it and waits until it accepts connections.
    pub fn start() -> OwnNats {
        let port = crate::free_port();
        let mut nats = OwnNats {
            port,
            dir: tempfile::tempdir().expect("tempdir"),
            child: None,
        };
        nats.start_again();
        nats
    }

    /// `nats://127.0.0.1:<port>`.
    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Starts it again on the same port and store.
    pub fn start_again(&mut self) {
        // Debian installs it in /usr/sbin, which a non-root PATH may lack.
        let exe = ["/usr/sbin/nats-server", "/usr/bin/nats-server"]
            .into_iter()
            .find(|p| std::path::Path::new(p).exists())
            .unwrap_or("nats-server");
        let child = std::process::Command::new(exe)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string(), "-js", "-sd"])
            .arg(self.dir.path())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("nats-server (install Debian's nats-server)");
        self.child = Some(child);
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(std::time::Instant::now() < deadline, "nats-server did not listen");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops it (SIGTERM, then waits).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            if let Ok(pid) = i32::try_from(child.id()) {
                let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
            }
            let _ = child.wait();
        }
    }
}

impl Drop for OwnNats {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn uuid_like() -> String {
    let mut b = [0u8; 6];
    getrandom::fill(&mut b).expect("random");
    hex::encode(b)
}
