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
    println!(
        "proxy scans_per_s={proxy_rate:.0} direct_per_s={direct_rate:.0} ratio={:.2} latency_ms={:.2}",
        proxy_rate / direct_rate,
        proxy_one.as_secs_f64() * 1e3
    );
}
