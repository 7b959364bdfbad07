//! The proxy plugin's fixtures: an agent running the packaged-style plugin with
//! an allow list, TLS and TCP targets on 127.0.0.1 that count connections, and
//! `openssl s_server` targets.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use serde_json::json;
use tempfile::TempDir;
use tokio::io::AsyncWriteExt;
use tokio::net::TcpListener;

use crate::{Agent, Server, bin, eventually};

/// An enrolled, running agent with the proxy plugin in its local set.
#[derive(Debug)]
pub struct ProxyHost {
    /// The agent.
    pub agent: Agent,
    /// Holds the plugin's configuration (and may hold other files of the test).
    pub conf: TempDir,
    _plugins: TempDir,
}

impl ProxyHost {
    /// Starts agent `id` of `server` with the proxy allowed to reach `allow`, and
    /// waits until the plugin runs.
    pub async fn start(server: &Server, id: &str, allow: &[String]) -> ProxyHost {
        Self::start_with(server, id, allow, server.tunnel.port(), "").await
    }

    /// [`ProxyHost::start`] with the tunnel endpoint at `tunnel_port` on
    /// 127.0.0.1 and `extra` lines in the plugin's configuration.
    pub async fn start_with(server: &Server, id: &str, allow: &[String], tunnel_port: u16, extra: &str) -> ProxyHost {
        let plugins = tempfile::tempdir().expect("tempdir");
        std::fs::set_permissions(plugins.path(), std::fs::Permissions::from_mode(0o755)).expect("chmod");
        std::fs::copy(bin("proxy"), plugins.path().join("proxy")).expect("copy the proxy plugin");
        let conf = tempfile::tempdir().expect("tempdir");
        let config = conf.path().join("proxy.toml");
        let detail = json!({ "config": config }).to_string();
        let local = format!(
            "local_dir = {:?}\n[plugins.local.proxy]\ndetail = '{detail}'\n",
            plugins.path().display().to_string()
        );
        let mut agent = Agent::enrolled_with(server, id, &local);
        let pki = agent.state_dir().join("pki");
        let text = format!(
            "allow = {}\ntunnel = \"127.0.0.1:{}\"\nca_file = {:?}\ncert_file = {:?}\nkey_file = {:?}\n{extra}\n",
            serde_json::to_string(allow).expect("allow list"),
            tunnel_port,
            pki.join("ca.pem").display().to_string(),
            pki.join("agent.pem").display().to_string(),
            pki.join("agent.key").display().to_string(),
        );
        std::fs::write(&config, text).expect("write proxy.toml");
        std::fs::set_permissions(&config, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        agent.start();
        let api = server.api();
        api.online(id).await;
        eventually("the proxy plugin running", || async {
            let a = api.agent(id).await?;
            a["plugins"]
                .as_array()?
                .iter()
                .any(|p| p["name"] == "proxy" && p["state"] == "running")
                .then_some(())
        })
        .await;
        ProxyHost {
            agent,
            conf,
            _plugins: plugins,
        }
    }
}

/// A TLS service on 127.0.0.1 with a self-signed certificate for `name` (and
/// 127.0.0.1) that completes handshakes and closes; counts connections.
#[derive(Debug, Clone)]
pub struct TlsTarget {
    /// Its port.
    pub port: u16,
    /// Connections accepted.
    pub seen: Arc<AtomicUsize>,
}

impl TlsTarget {
    /// Starts one on the current runtime.
    pub async fn start(name: &str) -> TlsTarget {
        let acceptor = self_signed_acceptor(name);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let port = listener.local_addr().expect("address").port();
        let seen = Arc::new(AtomicUsize::new(0));
        let counter = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counter.fetch_add(1, Ordering::SeqCst);
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    if let Ok(mut tls) = acceptor.accept(tcp).await {
                        let _ = tls.shutdown().await;
                    }
                });
            }
        });
        TlsTarget { port, seen }
    }
}

/// A TLS acceptor with a self-signed ECDSA certificate for `name` and 127.0.0.1.
pub fn self_signed_acceptor(name: &str) -> tokio_rustls::TlsAcceptor {
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ECDSA_P256_SHA256).expect("key");
    let mut params =
        rcgen::CertificateParams::new(vec![name.to_owned(), "127.0.0.1".to_owned()]).expect("certificate params");
    params.distinguished_name.push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).expect("self-signed certificate");
    let der = rustls::pki_types::PrivateKeyDer::try_from(key.serialize_der()).expect("key DER");
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der().clone()], der)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TCP service nobody may reach; counts connections.
pub async fn closed_target() -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&count);
    tokio::spawn(async move {
        while listener.accept().await.is_ok() {
            seen.fetch_add(1, Ordering::SeqCst);
        }
    });
    (port, count)
}

/// Runs the openssl command line in `dir`; its stdout.
pub fn openssl(dir: &Path, args: &[&str]) -> String {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// `openssl s_server` on 127.0.0.1, run from `dir` with `args`; stopped when
/// dropped.
#[derive(Debug)]
pub struct OpensslTarget {
    /// Its port.
    pub port: u16,
    child: Child,
}

impl OpensslTarget {
    /// Starts one and waits until it accepts connections.
    pub async fn start(dir: &Path, args: &[&str]) -> OpensslTarget {
        let port = crate::free_port();
        Self::start_on(dir, port, args).await
    }

    /// Starts one on `port` (another's, stopped: the same service, changed).
    pub async fn start_on(dir: &Path, port: u16, args: &[&str]) -> OpensslTarget {
        let child = Command::new("openssl")
            .arg("s_server")
            .arg("-accept")
            .arg(format!("127.0.0.1:{port}"))
            .arg("-quiet")
            // Answers an HTTP request after the handshake rather than reading
            // stdin, whose end would stop the server.
            .arg("-www")
            .args(args)
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start openssl s_server");
        let target = OpensslTarget { port, child };
        eventually("openssl s_server accepting", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.ok().map(drop)
        })
        .await;
        target
    }
}

impl Drop for OpensslTarget {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
