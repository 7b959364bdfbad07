//! The proxy plugin and the TLS inventory end to end: a real server scans TLS
//! targets through a real agent's proxy plugin and the tunnel endpoint (mutual
//! TLS), and the host's allow list, applied after DNS resolution, refuses the rest.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_tests::proxy::{ProxyHost, TlsTarget, closed_target};
use keel_tests::{Server, ServerOptions};
use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};

const AGENT: &str = "px-1";

fn results(v: &Value) -> Vec<(String, String, String)> {
    v.as_array()
        .unwrap_or_else(|| panic!("not a list: {v}"))
        .iter()
        .map(|r| {
            (
                r["target"].as_str().unwrap().to_owned(),
                r["status"].as_str().unwrap().to_owned(),
                r["error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect()
}

// keelctl runs as a blocking child process: the TLS target needs a thread of its own.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_inventory_reaches_only_what_the_host_allows() {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let target = TlsTarget::start("db.internal.test").await;
    let (tls_port, tls_seen) = (target.port, target.seen);
    let (closed_port, closed_seen) = closed_target().await;
    // The plugin as packaged, with an allow list of one address and port.
    let host = ProxyHost::start(&server, AGENT, &[format!("127.0.0.1/32:{tls_port}")]).await;
    let api = server.api();

    let targets = [
        format!("127.0.0.1:{tls_port}"),
        format!("localhost:{tls_port}"),
        format!("127.0.0.1:{closed_port}"),
        format!("localhost:{closed_port}"),
        format!("127.0.0.2:{tls_port}"),
    ];
    let (status, body) = api
        .post("/api/v1/scans", &json!({"agent": AGENT, "targets": targets}))
        .await;
    assert_eq!(status, 200, "{body}");
    let got = results(&body);
    assert_eq!(got[0].1, "ok", "{got:?}");
    assert_eq!(
        got[1].1, "ok",
        "a name is fine when it resolves to an allowed address: {got:?}"
    );
    for (target, status, error) in &got[2..] {
        assert_eq!(status, "failed", "{target}");
        assert!(error.contains("none is in the allow list"), "{target}: {error}");
    }
    assert!(
        got[3].2.contains("localhost:") && got[3].2.contains("resolves to 127.0.0.1"),
        "{got:?}"
    );
    assert_eq!(
        closed_seen.load(Ordering::SeqCst),
        0,
        "a refused target is never connected to"
    );
    assert_eq!(tls_seen.load(Ordering::SeqCst), 2);
    let cert = &body[0]["certificate"];
    assert_eq!(cert["subject"], "CN=db.internal.test", "{cert}");
    assert_eq!(cert["names"], json!(["db.internal.test", "127.0.0.1"]));
    assert_eq!(cert["self_signed"], true);
    assert_eq!(cert["public_key"], "EC 256");
    assert_eq!(
        cert["chain"][0]["sans"],
        json!(["DNS:db.internal.test", "IP Address:127.0.0.1"])
    );
    assert_eq!(cert["chain"][0]["curve"], "P-256");

    // The inventory, soonest expiry first, and filtered.
    let (_, list) = api.get("/api/v1/certificates").await;
    let listed: Vec<&str> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["target"].as_str().unwrap())
        .collect();
    assert_eq!(listed.len(), 2, "{list}");
    assert!(listed.contains(&targets[0].as_str()) && listed.contains(&targets[1].as_str()));
    let (_, none) = api.get("/api/v1/certificates?expiring_within_days=0").await;
    assert_eq!(none, json!([]), "nothing has expired");
    let (status, body) = api.get("/api/v1/certificates?expiring_within_days=x").await;
    assert_eq!(status, 400, "{body}");

    // What an auditor flags: a self-signed leaf that no trust anchor names and,
    // scanned by a name it does not carry, a hostname mismatch.
    let (_, found) = api.get("/api/v1/certificates/findings").await;
    let codes = |found: &Value, t: &str| -> Vec<String> {
        found
            .as_array()
            .unwrap()
            .iter()
            .filter(|f| f["target"] == t)
            .map(|f| f["code"].as_str().unwrap().to_owned())
            .collect()
    };
    assert_eq!(codes(&found, &targets[0]), ["untrusted_root", "self_signed"], "{found}");
    assert_eq!(
        codes(&found, &targets[1]),
        ["hostname_mismatch", "untrusted_root", "self_signed"],
        "{found}"
    );
    let (_, high) = api.get("/api/v1/certificates/findings?min_severity=high").await;
    assert_eq!(codes(&high, &targets[0]), ["untrusted_root"], "{high}");
    let (status, body) = api.get("/api/v1/certificates/findings?min_severity=dire").await;
    assert_eq!(status, 400, "{body}");

    // Bad requests are refused before anything is sent.
    for (req, want) in [
        (json!({"agent": AGENT, "targets": []}), "give 1-64 targets"),
        (json!({"agent": AGENT, "targets": ["no-port"]}), "is not host:port"),
        (json!({"agent": "nobody", "targets": ["a:1"]}), "no agent nobody"),
        (json!({"agent": AGENT, "targets": ["a:1"], "x": 1}), "unknown field"),
    ] {
        let (status, body) = api.post("/api/v1/scans", &req).await;
        assert!(status == 400 || status == 404, "{req}: {status} {body}");
        assert!(body["error"].as_str().unwrap().contains(want), "{req}: {body}");
    }

    // keelctl: the same inventory, and a scan's refusal as exit code 2.
    let keelctl = |args: &[&str]| {
        std::process::Command::new(keel_tests::bin("keelctl"))
            .env("KEEL_SERVER", server.base_url())
            .env("KEEL_TOKEN", &server.admin_token)
            .env("HOME", host.conf.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = keelctl(&["certs", "list", "--json"]);
    let via_ctl: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(via_ctl, list);
    let out = keelctl(&["certs", "findings"]);
    assert_eq!(out.status.code(), Some(2), "high findings: {out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("hostname_mismatch"),
        "{out:?}"
    );
    let out = keelctl(&["certs", "scan", "--agent", AGENT, &targets[2]]);
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("none is in the allow list"),
        "{out:?}"
    );
    let out = keelctl(&["certs", "scan", "--agent", AGENT, &targets[0]]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("CN=db.internal.test"),
        "{out:?}"
    );

    // The tunnel endpoint: an agent's certificate with no job waiting is told so;
    // no certificate gets no TLS session at all.
    let pair = keel_tests::agent_pair(&host.agent);
    let answer = tunnel_preface(&server, Some(&pair), "KEEL-TUNNEL/1 no-such-job 00\n").await;
    assert_eq!(
        answer.as_deref(),
        Some("ERR no job no-such-job is waiting"),
        "{answer:?}"
    );
    assert_eq!(tunnel_preface(&server, None, "KEEL-TUNNEL/1 x y\n").await, None);
    assert!(server.log().contains("tunnel refused"), "refusals are logged");
}

/// Connects to the tunnel endpoint (with `identity`, or none), sends `preface`,
/// and returns the answer line; `None` when the handshake or the read fails.
async fn tunnel_preface(server: &Server, identity: Option<&keel_tests::Pair>, preface: &str) -> Option<String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(CertificateDer::from_pem_slice(server.ca_pem().as_bytes()).unwrap())
        .unwrap();
    let builder = rustls::ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let mut config = match identity {
        Some(p) => builder
            .with_client_auth_cert(
                vec![CertificateDer::from_pem_slice(p.cert.as_bytes()).unwrap()],
                PrivateKeyDer::from_pem_slice(p.key.as_bytes()).unwrap(),
            )
            .unwrap(),
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"keel-tunnel/1".to_vec()];
    let tcp = tokio::net::TcpStream::connect(server.tunnel).await.ok()?;
    let name = ServerName::try_from("127.0.0.1").unwrap();
    let mut tls = tokio_rustls::TlsConnector::from(Arc::new(config))
        .connect(name, tcp)
        .await
        .ok()?;
    tls.write_all(preface.as_bytes()).await.ok()?;
    let mut line = String::new();
    let n = BufReader::new(tls).read_line(&mut line).await.ok()?;
    (n > 0).then(|| line.trim_end().to_owned())
}
