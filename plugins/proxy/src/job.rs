//! One audit job: resolve the target, keep only the addresses the allow list
//! names, connect to one, open a tunnel to the server's endpoint (mutual TLS with
//! the agent's certificate), say which job it is, and relay bytes both ways
//! within the time and byte limits.
//!
//! The allow list is applied to the very addresses that are connected to, after
//! resolution: a name that resolves (or is made to resolve) to an address outside
//! the list reaches nothing.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use rustls::pki_types::ServerName;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use crate::config::Config;

/// ALPN of the tunnel protocol.
pub const ALPN: &[u8] = b"keel-tunnel/1";
/// The longest answer line the endpoint may send.
const MAX_ANSWER: usize = 256;

/// A 6100 task's data.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Request {
    /// The server's job ID: 1-64 characters of `[A-Za-z0-9-]`.
    pub job: String,
    /// `host:port` to reach.
    pub target: String,
    /// The job's one-time token, 64 hex digits, shown to the endpoint.
    pub token: String,
}

impl Request {
    /// Parses and checks a task's data.
    pub fn parse(data: &str) -> Result<Request, String> {
        let r: Request = serde_json::from_str(data).map_err(|e| format!("not a proxy job: {e}"))?;
        if r.job.is_empty() || r.job.len() > 64 || !r.job.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-') {
            return Err(format!("job: {:?} is not 1-64 characters of [A-Za-z0-9-]", r.job));
        }
        if r.token.len() != 64 || !r.token.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("token: not 64 hex digits".into());
        }
        let port_ok = r
            .target
            .rsplit_once(':')
            .is_some_and(|(h, p)| !h.is_empty() && p.parse::<u16>().is_ok_and(|p| p > 0));
        if !port_ok || r.target.len() > 255 || r.target.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(format!("target: {:?} is not host:port", r.target));
        }
        Ok(r)
    }
}

/// What a finished job reports.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The address connected to.
    pub address: SocketAddr,
    /// Bytes from the server to the target.
    pub sent: u64,
    /// Bytes from the target to the server.
    pub received: u64,
    /// How long the tunnel was open.
    pub elapsed: Duration,
    /// Why it ended, when not by both sides closing.
    pub cut: Option<String>,
}

/// The TLS client for the tunnel endpoint: trusts only the Keel CA, shows the
/// agent's certificate.
pub fn tls_config(config: &Config) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let read = |p: &std::path::Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let pinned = keel_common::tls::pinned_client(&read(&config.ca_file)?)
        .map_err(|e| format!("{}: {e}", config.ca_file.display()))?;
    let chain = CertificateDer::pem_slice_iter(&read(&config.cert_file)?)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{}: {e}", config.cert_file.display()))?;
    let key = PrivateKeyDer::from_pem_slice(&read(&config.key_file)?)
        .map_err(|e| format!("{}: not a private key: {e}", config.key_file.display()))?;
    let mut tls = pinned
        .with_client_auth_cert(chain, key)
        .map_err(|e| format!("{}: {e}", config.cert_file.display()))?;
    tls.alpn_protocols = vec![ALPN.to_vec()];
    Ok(Arc::new(tls))
}

/// The allowed addresses of `target`, or why there are none.
pub async fn resolve(config: &Config, target: &str) -> Result<Vec<SocketAddr>, String> {
    let addrs: Vec<SocketAddr> = tokio::time::timeout(config.connect_timeout, tokio::net::lookup_host(target))
        .await
        .map_err(|_| format!("resolving {target} timed out"))?
        .map_err(|e| format!("cannot resolve {target}: {e}"))?
        .collect();
    let (allowed, refused): (Vec<_>, Vec<_>) = addrs
        .into_iter()
        .partition(|a| config.allow.iter().any(|r| r.allows(*a)));
    if allowed.is_empty() {
        let list: Vec<String> = refused.iter().map(ToString::to_string).collect();
        return Err(format!(
            "refused: {target} resolves to {}, and none is in the allow list of {}",
            list.join(", "),
            config.path.display()
        ));
    }
    if !refused.is_empty() {
        tracing::info!(%target, ?refused, "addresses outside the allow list skipped");
    }
    Ok(allowed)
}

/// Runs one job to its end.
pub async fn run(config: &Config, tls: Arc<rustls::ClientConfig>, req: &Request) -> Result<Outcome, String> {
    let allowed = resolve(config, &req.target).await?;
    let mut last = String::new();
    let mut target = None;
    for addr in allowed {
        match tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr)).await {
            Ok(Ok(s)) => {
                target = Some((s, addr));
                break;
            }
            Ok(Err(e)) => last = format!("{addr}: {e}"),
            Err(_) => last = format!("{addr}: connect timed out"),
        }
    }
    let (target, address) = target.ok_or_else(|| format!("cannot connect to {}: {last}", req.target))?;
    let _ = target.set_nodelay(true);
    let tunnel = open_tunnel(config, tls, req).await?;
    let started = Instant::now();
    let (sent, received, cut) = relay(tunnel, target, config.max_job_time, config.max_job_bytes).await;
    Ok(Outcome {
        address,
        sent,
        received,
        elapsed: started.elapsed(),
        cut,
    })
}

/// Connects to the endpoint, completes mutual TLS and the job's preface.
async fn open_tunnel(
    config: &Config,
    tls: Arc<rustls::ClientConfig>,
    req: &Request,
) -> Result<BufReader<tokio_rustls::client::TlsStream<TcpStream>>, String> {
    let host = config
        .tunnel
        .rsplit_once(':')
        .map(|(h, _)| h.trim_start_matches('[').trim_end_matches(']'))
        .unwrap_or_default();
    let name = ServerName::try_from(host.to_owned()).map_err(|e| format!("tunnel: {host:?}: {e}"))?;
    let limit = config.connect_timeout;
    let tcp = tokio::time::timeout(limit, TcpStream::connect(&config.tunnel))
        .await
        .map_err(|_| format!("tunnel endpoint {}: connect timed out", config.tunnel))?
        .map_err(|e| format!("tunnel endpoint {}: {e}", config.tunnel))?;
    let _ = tcp.set_nodelay(true);
    let mut stream = tokio::time::timeout(limit, tokio_rustls::TlsConnector::from(tls).connect(name, tcp))
        .await
        .map_err(|_| format!("tunnel endpoint {}: TLS handshake timed out", config.tunnel))?
        .map_err(|e| format!("tunnel endpoint {}: TLS: {e}", config.tunnel))?;
    let preface = format!("KEEL-TUNNEL/1 {} {}\n", req.job, req.token);
    stream
        .write_all(preface.as_bytes())
        .await
        .map_err(|e| format!("tunnel endpoint: {e}"))?;
    stream.flush().await.map_err(|e| format!("tunnel endpoint: {e}"))?;
    let mut reader = BufReader::new(stream);
    let mut answer = Vec::new();
    tokio::time::timeout(
        limit,
        (&mut reader).take(MAX_ANSWER as u64).read_until(b'\n', &mut answer),
    )
    .await
    .map_err(|_| "tunnel endpoint: no answer to the preface".to_owned())?
    .map_err(|e| format!("tunnel endpoint: {e}"))?;
    let answer = String::from_utf8_lossy(&answer);
    match answer.trim_end() {
        // The reader is kept: it may hold the first bytes that follow the answer.
        "OK" => Ok(reader),
        other => Err(format!(
            "tunnel endpoint refused the job: {}",
            other.strip_prefix("ERR ").unwrap_or(other)
        )),
    }
}

/// Each direction's buffer: a read of this much becomes a few TLS records written
/// at once, so a bulk transfer costs few system calls.
const RELAY_BUFFER: usize = 64 << 10;

/// Copies both ways until both sides close, `max_time` passes or `max_bytes` have
/// passed. Returns the bytes each way and why it was cut, if it was.
async fn relay<A, B>(a: A, b: B, max_time: Duration, max_bytes: u64) -> (u64, u64, Option<String>)
where
    A: AsyncRead + AsyncWrite + Unpin,
    B: AsyncRead + AsyncWrite + Unpin,
{
    let (mut ar, mut aw) = tokio::io::split(a);
    let (mut br, mut bw) = tokio::io::split(b);
    let total = AtomicU64::new(0);
    let (up, down) = (AtomicU64::new(0), AtomicU64::new(0));
    let both = async {
        tokio::try_join!(
            pump(&mut ar, &mut bw, &up, &total, max_bytes),
            pump(&mut br, &mut aw, &down, &total, max_bytes)
        )
    };
    let cut = match tokio::time::timeout(max_time, both).await {
        Ok(Ok(_)) => None,
        Ok(Err(e)) => Some(e),
        Err(_) => Some(format!("the job's time limit ({max_time:?}) ran out")),
    };
    (up.load(Ordering::Relaxed), down.load(Ordering::Relaxed), cut)
}

async fn pump<R, W>(r: &mut R, w: &mut W, count: &AtomicU64, total: &AtomicU64, max: u64) -> Result<(), String>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut buf = vec![0u8; RELAY_BUFFER];
    loop {
        let n = r.read(&mut buf).await.map_err(|e| e.to_string())?;
        if n == 0 {
            let _ = w.shutdown().await;
            return Ok(());
        }
        if total.fetch_add(n as u64, Ordering::Relaxed) + n as u64 > max {
            return Err(format!("the job's {max} bytes ran out"));
        }
        w.write_all(&buf[..n]).await.map_err(|e| e.to_string())?;
        count.fetch_add(n as u64, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use std::path::Path;

    use super::*;

    fn config(allow: &str) -> Config {
        crate::config::parse(
            Path::new("/etc/keel/proxy.toml"),
            &format!("allow = [{allow}]\ntunnel = \"127.0.0.1:1\"\nconnect_timeout_seconds = 2\n"),
        )
        .unwrap()
    }

    #[test]
    fn requests_are_checked_before_anything_runs() {
        let token = "ab".repeat(32);
        let ok = format!(r#"{{"job":"j-1","target":"db.internal:5432","token":"{token}"}}"#);
        Request::parse(&ok).unwrap();
        for (data, want) in [
            (format!(r#"{{"job":"","target":"a:1","token":"{token}"}}"#), "job: "),
            (format!(r#"{{"job":"j 1","target":"a:1","token":"{token}"}}"#), "job: "),
            (
                r#"{"job":"j","target":"a:1","token":"xyz"}"#.to_owned(),
                "token: not 64 hex",
            ),
            (
                format!(r#"{{"job":"j","target":"a","token":"{token}"}}"#),
                "target: \"a\" is not host:port",
            ),
            (
                format!(r#"{{"job":"j","target":"a:0","token":"{token}"}}"#),
                "is not host:port",
            ),
            (
                format!(r#"{{"job":"j","target":"a b:1","token":"{token}"}}"#),
                "is not host:port",
            ),
            (
                format!(r#"{{"job":"j","target":"a:1","token":"{token}","x":1}}"#),
                "unknown field",
            ),
        ] {
            let e = Request::parse(&data).unwrap_err();
            assert!(e.contains(want), "{data}: {e}");
        }
    }

    #[tokio::test]
    async fn the_allow_list_applies_to_resolved_addresses() {
        // localhost resolves to 127.0.0.1 (and maybe ::1): allowed only as listed.
        let c = config("\"127.0.0.2/32:443\"");
        let e = resolve(&c, "localhost:443").await.unwrap_err();
        assert!(e.starts_with("refused: localhost:443 resolves to 127.0.0.1"), "{e}");
        assert!(e.contains("/etc/keel/proxy.toml"), "{e}");
        let e = resolve(&c, "127.0.0.2:444").await.unwrap_err();
        assert!(e.contains("none is in the allow list"), "{e}");
        assert_eq!(resolve(&c, "127.0.0.2:443").await.unwrap(), [sa("127.0.0.2:443")]);
        let c = config("\"127.0.0.1:443\"");
        let got = resolve(&c, "localhost:443").await.unwrap();
        assert_eq!(got, [sa("127.0.0.1:443")], "only the listed address of the name");
        let c = config("");
        assert!(
            resolve(&c, "127.0.0.1:22").await.is_err(),
            "an empty list allows nothing"
        );
        assert!(
            resolve(&c, "no-such-host.invalid:443")
                .await
                .unwrap_err()
                .starts_with("cannot resolve")
        );
    }

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[tokio::test]
    async fn the_relay_stops_at_its_limits() {
        let (a, mut a_peer) = tokio::io::duplex(64 * 1024);
        let (b, mut b_peer) = tokio::io::duplex(64 * 1024);
        let running = tokio::spawn(relay(a, b, Duration::from_secs(5), 10));
        a_peer.write_all(b"0123456789ABCDEF").await.unwrap();
        let (_, _, cut) = running.await.unwrap();
        assert_eq!(cut.as_deref(), Some("the job's 10 bytes ran out"));
        let mut got = Vec::new();
        let _ = b_peer.read_to_end(&mut got).await;
        assert!(got.len() <= 10, "{got:?}");

        let (a, _a_peer) = tokio::io::duplex(1024);
        let (b, _b_peer) = tokio::io::duplex(1024);
        let (_, _, cut) = relay(a, b, Duration::from_millis(50), 1000).await;
        assert_eq!(cut.as_deref(), Some("the job's time limit (50ms) ran out"));

        let (a, mut a_peer) = tokio::io::duplex(1024);
        let (b, mut b_peer) = tokio::io::duplex(1024);
        let running = tokio::spawn(relay(a, b, Duration::from_secs(5), 1000));
        a_peer.write_all(b"ping").await.unwrap();
        a_peer.shutdown().await.unwrap();
        let mut got = [0u8; 4];
        b_peer.read_exact(&mut got).await.unwrap();
        b_peer.write_all(b"pong!").await.unwrap();
        b_peer.shutdown().await.unwrap();
        let mut back = Vec::new();
        a_peer.read_to_end(&mut back).await.unwrap();
        assert_eq!((&got, back.as_slice()), (b"ping", b"pong!".as_slice()));
        assert_eq!(running.await.unwrap(), (4, 5, None));
    }
}
