//! `keel-bench proxy [scans]`: the TLS inventory through an agent's proxy plugin.
//!
//! A real server scans a TLS target on 127.0.0.1 through a real agent's proxy
//! plugin: per scan a 6100 task down the agent's stream, the plugin's DNS and
//! allow-list check and connect, its mutual-TLS tunnel back to the server's
//! endpoint, and the server's probes of the target through it (a scan is six:
//! a handshake and five ClientHellos, each over its own job and tunnel). The
//! baseline, in the same run, is the same probes and the same recording made by
//! the same code over direct TCP connections to the target. Both run 8 at a
//! time (the server's `tunnel.scan_concurrency`), and one at a time for latency.
//!
//! Then a bulk transfer: 256 MiB from a service through the agent's proxy and a
//! mutual-TLS tunnel (to a stand-in for the tunnel endpoint, with the server's
//! certificate) against the same bytes over a direct TLS connection, each
//! tunnelled run right after a direct one; the ratio is the median of the
//! pairs', so that what else the machine does weighs on both sides alike.

use std::sync::Arc;
use std::time::{Duration, Instant};

use keel_tests::proxy::{ProxyHost, TlsTarget};
use keel_tests::{Server, ServerOptions};
use serde_json::json;

const CONCURRENCY: usize = 8;
const PER_REQUEST: usize = 64;

/// The trust anchors the server judges chains against, for the baseline to do
/// the same work.
fn trust() -> &'static keel_server::findings::Trust {
    static TRUST: std::sync::OnceLock<keel_server::findings::Trust> = std::sync::OnceLock::new();
    TRUST.get_or_init(|| keel_server::findings::Trust::load(true, None).expect("the system trust bundle"))
}

/// A scan's probes, each over its own direct connection, all at once, and the
/// row put together as the server does.
async fn direct(target: &str) {
    use keel_server::inventory::{self, Probe};
    let seen = futures::future::join_all(Probe::ALL.map(|probe| async move {
        let tcp = tokio::net::TcpStream::connect(target).await.expect("connect");
        let _ = tcp.set_nodelay(true);
        inventory::look(probe, tcp, target, Duration::from_secs(10)).await
    }))
    .await;
    inventory::assemble("bench", target, &seen, keel_common::time::now_ms(), trust()).expect("certificate");
}

/// Runs the benchmark.
pub async fn run(scans: usize) {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let target = TlsTarget::start("bench.internal").await;
    let addr = format!("127.0.0.1:{}", target.port);
    let _host = ProxyHost::start(&server, "bench-proxy", &[format!("127.0.0.1/32:{}", target.port)]).await;
    let api = server.api();

    // Warm both paths.
    direct(&addr).await;
    let (status, body) = api
        .post("/api/v1/scans", &json!({"agent": "bench-proxy", "targets": [addr]}))
        .await;
    assert_eq!((status, body[0]["status"].as_str()), (200, Some("ok")), "{body}");

    // One at a time.
    let n1 = (scans / 10).max(20);
    let start = Instant::now();
    for _ in 0..n1 {
        direct(&addr).await;
    }
    let direct_one = start.elapsed() / n1 as u32;
    let start = Instant::now();
    for _ in 0..n1 {
        let (_, body) = api
            .post("/api/v1/scans", &json!({"agent": "bench-proxy", "targets": [addr]}))
            .await;
        assert_eq!(body[0]["status"], "ok", "{body}");
    }
    let proxy_one = start.elapsed() / n1 as u32;

    // Eight at a time.
    let start = Instant::now();
    let sem = Arc::new(tokio::sync::Semaphore::new(CONCURRENCY));
    let mut handles = Vec::new();
    for _ in 0..scans {
        let permit = Arc::clone(&sem).acquire_owned().await.expect("semaphore");
        let addr = addr.clone();
        handles.push(tokio::spawn(async move {
            direct(&addr).await;
            drop(permit);
        }));
    }
    for h in handles {
        h.await.expect("direct scan");
    }
    let direct_rate = scans as f64 / start.elapsed().as_secs_f64();
    let start = Instant::now();
    let mut left = scans;
    while left > 0 {
        let n = left.min(PER_REQUEST);
        let targets = vec![addr.clone(); n];
        let (status, body) = api
            .post("/api/v1/scans", &json!({"agent": "bench-proxy", "targets": targets}))
            .await;
        assert_eq!(status, 200, "{body}");
        let ok = body
            .as_array()
            .expect("results")
            .iter()
            .filter(|r| r["status"] == "ok")
            .count();
        assert_eq!(ok, n, "every scan succeeds: {body}");
        left -= n;
    }
    let proxy_rate = scans as f64 / start.elapsed().as_secs_f64();
    assert!(target.seen.load(std::sync::atomic::Ordering::SeqCst) >= 2 * scans);

    println!("TLS inventory: {scans} scans of one target on 127.0.0.1");
    println!(
        "  one at a time: through the proxy {:7.2} ms/scan, direct {:7.2} ms ({:.2}x)",
        proxy_one.as_secs_f64() * 1e3,
        direct_one.as_secs_f64() * 1e3,
        proxy_one.as_secs_f64() / direct_one.as_secs_f64()
    );
    println!(
        "  {CONCURRENCY} at a time:    through the proxy {proxy_rate:7.0} scans/s, direct {direct_rate:7.0} scans/s ({:.2}x)",
        proxy_rate / direct_rate
    );
    let (tunneled, direct_bulk, bulk_ratio) = bulk(&server).await;
    println!(
        "  bulk transfer of {} MiB, median of {BULK_RUNS} pairs: through the proxy and its TLS tunnel {tunneled:7.0} MiB/s, a direct TLS connection {direct_bulk:7.0} MiB/s ({bulk_ratio:.2}x)",
        BULK_BYTES >> 20,
    );
    println!(
        "proxy scans_per_s={proxy_rate:.0} direct_per_s={direct_rate:.0} ratio={:.2} latency_ms={:.2} bulk_mib_s={tunneled:.0} bulk_ratio={:.2}",
        proxy_rate / direct_rate,
        proxy_one.as_secs_f64() * 1e3,
        bulk_ratio
    );
}

/// Bytes of one bulk transfer, and how many transfers each way.
const BULK_BYTES: u64 = 256 << 20;
const BULK_RUNS: usize = 15;

/// A service on 127.0.0.1 that sends [`BULK_BYTES`] and closes: over TLS after
/// the handshake, or over plain TCP.
async fn bulk_target(tls: bool) -> u16 {
    let acceptor = keel_tests::proxy::self_signed_acceptor("bulk.internal");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let _ = tcp.set_nodelay(true);
                if tls {
                    if let Ok(tls) = acceptor.accept(tcp).await {
                        send_bulk(tls).await;
                    }
                } else {
                    send_bulk(tcp).await;
                }
            });
        }
    });
    port
}

async fn send_bulk<W: tokio::io::AsyncWrite + Unpin>(mut w: W) {
    use tokio::io::AsyncWriteExt;
    let chunk = vec![7u8; 64 << 10];
    let mut left = BULK_BYTES;
    while left > 0 {
        let n = left.min(chunk.len() as u64) as usize;
        if w.write_all(&chunk[..n]).await.is_err() {
            return;
        }
        left -= n as u64;
    }
    let _ = w.shutdown().await;
}

/// Reads all of a bulk transfer from `r`: MiB/s from `start`.
async fn drain<R: tokio::io::AsyncRead + Unpin>(mut r: R, start: Instant) -> f64 {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 256 << 10];
    let mut total = 0u64;
    loop {
        match r.read(&mut buf).await {
            Ok(0) => break,
            Ok(n) => total += n as u64,
            Err(e) => panic!("bulk read after {total} bytes: {e}"),
        }
    }
    assert_eq!(total, BULK_BYTES, "the whole transfer");
    total as f64 / (1 << 20) as f64 / start.elapsed().as_secs_f64()
}

/// Reads all a TLS service sends over `stream`: MiB/s from `start`.
async fn read_all<S>(stream: S, start: Instant) -> f64
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(keel_common::tls::AnyCertificate::new()))
        .with_no_client_auth();
    let name = rustls::pki_types::ServerName::try_from("bulk.internal").expect("name");
    let tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, stream)
        .await
        .expect("TLS to the bulk target");
    drain(tls, start).await
}

/// A stand-in for the server's tunnel endpoint, with the server's own
/// certificate: takes each tunnel's preface, answers OK, and hands the stream on.
async fn endpoint(
    server: &Server,
) -> (
    u16,
    tokio::sync::mpsc::Receiver<impl tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>,
) {
    use rustls::pki_types::pem::PemObject;
    use tokio::io::{AsyncBufReadExt, AsyncWriteExt};
    let pki = server.pki_dir();
    let chain = rustls::pki_types::CertificateDer::pem_file_iter(pki.join(keel_server::pki::SERVER_CERT))
        .expect("server.pem")
        .collect::<Result<Vec<_>, _>>()
        .expect("server certificates");
    let key =
        rustls::pki_types::PrivateKeyDer::from_pem_file(pki.join(keel_server::pki::SERVER_KEY)).expect("server.key");
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .expect("endpoint config");
    config.alpn_protocols = vec![keel_server::tunnel::ALPN.to_vec()];
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("address").port();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let _ = tcp.set_nodelay(true);
            let Ok(tls) = acceptor.accept(tcp).await else { continue };
            let mut reader = tokio::io::BufReader::new(tls);
            let mut preface = String::new();
            if reader.read_line(&mut preface).await.is_err() || !preface.starts_with("KEEL-TUNNEL/1 ") {
                continue;
            }
            if reader.get_mut().write_all(b"OK\n").await.is_err() {
                continue;
            }
            let _ = tx.send(reader).await;
        }
    });
    (port, rx)
}

/// A bulk transfer through an agent's proxy and its mutual-TLS tunnel, from a
/// plain TCP service, against a direct TLS connection to a TLS service sending
/// the same bytes: one TLS layer each, so what differs is the tunnel's path (the
/// plugin's relay, two more hops, and the job's task and handshake, which are
/// timed too). [`BULK_RUNS`] pairs, a direct run then a tunnelled one: the
/// median MiB/s of each, and the median of the pairs' ratios.
pub async fn bulk(server: &Server) -> (f64, f64, f64) {
    let (plain, tls) = (bulk_target(false).await, bulk_target(true).await);
    let (tunnel_port, mut tunnels) = endpoint(server).await;
    let _host = ProxyHost::start_with(
        server,
        "bench-bulk",
        &[format!("127.0.0.1/32:{plain}")],
        tunnel_port,
        "max_job_bytes = 1073741824\nmax_job_seconds = 600",
    )
    .await;
    let api = server.api();
    let (mut directs, mut tunnels_mib, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
    for run in 0..BULK_RUNS {
        let start = Instant::now();
        let tcp = tokio::net::TcpStream::connect(("127.0.0.1", tls))
            .await
            .expect("connect");
        let _ = tcp.set_nodelay(true);
        let direct = read_all(tcp, start).await;

        let start = Instant::now();
        let job =
            json!({"job": format!("bulk-{run}"), "target": format!("127.0.0.1:{plain}"), "token": "ab".repeat(32)})
                .to_string();
        let (status, body) = api
            .post(
                "/api/v1/agents/bench-bulk/tasks",
                &json!({"data_type": keel_proto::data_type::PROXY_JOB, "object_name": "proxy", "data": job}),
            )
            .await;
        assert_eq!(status, 202, "{body}");
        let stream = tunnels.recv().await.expect("a tunnel");
        let tunneled = drain(stream, start).await;
        directs.push(direct);
        tunnels_mib.push(tunneled);
        ratios.push(tunneled / direct);
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    (median(&mut tunnels_mib), median(&mut directs), median(&mut ratios))
}
