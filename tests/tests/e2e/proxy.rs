//! The proxy plugin and the TLS inventory end to end: a real server scans TLS
//! targets through a real agent's proxy plugin and the tunnel endpoint (mutual
//! TLS), and the host's allow list, applied after DNS resolution, refuses the rest.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use keel_tests::proxy::{OpensslTarget, ProxyHost, TlsTarget, closed_target, openssl};
use keel_tests::{Server, ServerOptions, eventually};
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
    // Each scan is six probes, each over its own connection. A probe that
    // ended while its connection still waited in the listen queue is counted
    // when the target accepts it, which may come after the scan's answer.
    eventually("twelve connections to the target", || async {
        (tls_seen.load(Ordering::SeqCst) == 12).then_some(())
    })
    .await;
    assert_eq!(tls_seen.load(Ordering::SeqCst), 12);
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

/// The serial openssl reads from a PEM certificate.
fn serial_of(dir: &std::path::Path, pem: &str) -> String {
    openssl(dir, &["x509", "-in", pem, "-noout", "-serial"])
        .trim()
        .trim_start_matches("serial=")
        .to_owned()
}

/// Makes a key of `alg` (`rsa:N` or an EC curve) and a certificate for `subj`,
/// self-signed, or signed by `ca` (its `.pem` and `.key`), with `ext` lines.
fn cert(dir: &std::path::Path, name: &str, alg: &str, subj: &str, ca: Option<&str>, digest: &str, ext: &str) {
    let key = format!("{name}.key");
    match alg.strip_prefix("rsa:") {
        Some(bits) => openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "RSA",
                "-pkeyopt",
                &format!("rsa_keygen_bits:{bits}"),
                "-out",
                &key,
            ],
        ),
        None => openssl(
            dir,
            &[
                "genpkey",
                "-algorithm",
                "EC",
                "-pkeyopt",
                &format!("ec_paramgen_curve:{alg}"),
                "-out",
                &key,
            ],
        ),
    };
    std::fs::write(dir.join(format!("{name}.ext")), ext).unwrap();
    let csr = format!("{name}.csr");
    openssl(dir, &["req", "-new", "-key", &key, "-subj", subj, "-out", &csr]);
    let (pem, extfile) = (format!("{name}.pem"), format!("{name}.ext"));
    let mut args = vec![
        "x509", "-req", "-in", &csr, "-out", &pem, "-days", "90", "-extfile", &extfile, digest,
    ];
    let (ca_pem, ca_key);
    match ca {
        Some(ca) => {
            (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
            args.extend(["-CA", &ca_pem, "-CAkey", &ca_key, "-CAcreateserial"]);
        }
        None => args.extend(["-signkey", &key]),
    }
    openssl(dir, &args);
}

/// Real `openssl s_server` targets, each with what an auditor should find: an
/// RSA-1024 leaf signed with SHA-1 that speaks only TLS 1.0; an ECDSA P-384
/// chain with an intermediate and a stapled OCSP response, judged against a
/// private CA bundle; a server that takes an anonymous suite.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_audit_sees_old_protocols_weak_keys_and_staples() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let ca = "basicConstraints=critical,CA:TRUE\nkeyUsage=critical,keyCertSign,cRLSign\n";
    let leaf = |san: &str| format!("basicConstraints=CA:FALSE\nsubjectAltName={san}\n");
    // The old one: a 2048-bit CA, a 1024-bit leaf signed with SHA-1.
    cert(d, "oldca", "rsa:2048", "/CN=Old CA", None, "-sha256", ca);
    cert(
        d,
        "old",
        "rsa:1024",
        "/CN=old.test",
        Some("oldca"),
        "-sha1",
        &leaf("DNS:old.test,IP:127.0.0.1"),
    );
    // The modern one: root, intermediate, leaf on P-384, and an OCSP response
    // for the leaf from the intermediate.
    cert(d, "root", "P-384", "/CN=Staple Root", None, "-sha384", ca);
    cert(
        d,
        "inter",
        "P-384",
        "/CN=Staple Intermediate",
        Some("root"),
        "-sha384",
        ca,
    );
    cert(
        d,
        "new",
        "P-384",
        "/CN=new.test",
        Some("inter"),
        "-sha384",
        &leaf("DNS:new.test,IP:127.0.0.1"),
    );
    let serial = serial_of(d, "new.pem");
    std::fs::write(
        d.join("index.txt"),
        format!("V\t491231235959Z\t\t{serial}\tunknown\t/CN=new.test\n"),
    )
    .unwrap();
    openssl(
        d,
        &[
            "ocsp",
            "-issuer",
            "inter.pem",
            "-cert",
            "new.pem",
            "-no_nonce",
            "-reqout",
            "req.der",
        ],
    );
    openssl(
        d,
        &[
            "ocsp",
            "-index",
            "index.txt",
            "-rsigner",
            "inter.pem",
            "-rkey",
            "inter.key",
            "-CA",
            "inter.pem",
            "-reqin",
            "req.der",
            "-respout",
            "resp.der",
            "-ndays",
            "7",
        ],
    );

    let weak_protocols = OpensslTarget::start(
        d,
        &[
            "-cert",
            "old.pem",
            "-cert_chain",
            "oldca.pem",
            "-key",
            "old.key",
            "-tls1",
            "-cipher",
            "DEFAULT:@SECLEVEL=0",
        ],
    )
    .await;
    let stapled = OpensslTarget::start(
        d,
        &[
            "-cert",
            "new.pem",
            "-key",
            "new.key",
            "-cert_chain",
            "inter.pem",
            "-status_file",
            "resp.der",
            "-no_tls1",
            "-no_tls1_1",
        ],
    )
    .await;
    let anonymous = OpensslTarget::start(
        d,
        &[
            "-cert",
            "new.pem",
            "-key",
            "new.key",
            "-tls1_2",
            "-cipher",
            "ECDHE-ECDSA-AES128-GCM-SHA256:ADH-AES128-SHA:@SECLEVEL=0",
        ],
    )
    .await;
    let server = Server::start(ServerOptions {
        release_key: true,
        tunnel_toml: format!("inventory_ca_bundle = {:?}", d.join("root.pem").display().to_string()),
        ..ServerOptions::default()
    })
    .await;
    let ports = [weak_protocols.port, stapled.port, anonymous.port];
    let allow: Vec<String> = ports.iter().map(|p| format!("127.0.0.1/32:{p}")).collect();
    let _host = ProxyHost::start(&server, AGENT, &allow).await;
    let targets: Vec<String> = ports.iter().map(|p| format!("127.0.0.1:{p}")).collect();
    let (status, body) = server
        .api()
        .post("/api/v1/scans", &json!({"agent": AGENT, "targets": targets}))
        .await;
    assert_eq!(status, 200, "{body}");
    for r in body.as_array().unwrap() {
        assert_eq!(r["status"], "ok", "{r}");
    }
    let protocols = |c: &Value| -> Vec<String> {
        c["tls"]["protocols"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["accepted"] == true)
            .map(|p| p["version"].as_str().unwrap().to_owned())
            .collect()
    };
    let codes = |c: &Value| -> Vec<String> {
        c["findings"]
            .as_array()
            .unwrap()
            .iter()
            .map(|f| f["code"].as_str().unwrap().to_owned())
            .collect()
    };

    // TLS 1.0 only, RSA-1024, SHA-1: described, not failed.
    let old = &body[0]["certificate"];
    assert_eq!(protocols(old), ["TLSv1.0"], "{old}");
    assert_eq!(old["public_key"], "RSA 1024");
    assert_eq!(old["signature"], "sha1WithRSAEncryption");
    assert_eq!(old["serial"], serial_of(d, "old.pem"));
    assert_eq!(old["chain"][1]["subject"], "CN=Old CA");
    let old_codes = codes(old);
    for want in [
        "weak_key",
        "weak_signature",
        "tls10_enabled",
        "no_current_protocol",
        "untrusted_root",
    ] {
        assert!(old_codes.iter().any(|c| c == want), "{want} in {old_codes:?}");
    }
    let tls10 = &old["tls"]["protocols"][1];
    assert!(tls10["suite"].as_str().unwrap().starts_with("TLS_"), "{tls10}");
    assert!(
        old["tls"]["protocols"][3]["refused"]
            .as_str()
            .unwrap()
            .contains("0x0301"),
        "a TLS 1.2 hello is answered with 1.0: {old}"
    );

    // TLS 1.2 and 1.3, P-384 chain with its intermediate, a good staple, and a
    // chain that verifies against the private bundle.
    let new = &body[1]["certificate"];
    assert_eq!(protocols(new), ["TLSv1.2", "TLSv1.3"], "{new}");
    assert_eq!(new["public_key"], "EC 384");
    assert_eq!(new["chain"][0]["curve"], "P-384");
    assert_eq!(new["chain"][1]["subject"], "CN=Staple Intermediate");
    assert_eq!(new["serial"], serial);
    assert_eq!(new["tls"]["ocsp"]["status"], "good", "{new}");
    let next = new["tls"]["ocsp"]["next_update"].as_i64().unwrap();
    let week = keel_common::time::now_ms() + 7 * 24 * 3600 * 1000;
    assert!((next - week).abs() < 3_600_000, "next update in 7 days: {next}");
    assert!(codes(new).is_empty(), "nothing to flag: {new}");
    assert!(new["tls"]["weak_suite"].is_null(), "{new}");

    // A server that takes an anonymous suite when offered only weak ones.
    let anon = &body[2]["certificate"];
    assert!(
        anon["tls"]["weak_suite"]
            .as_str()
            .unwrap()
            .starts_with("TLS_DH_anon_WITH_AES_128_CBC_SHA"),
        "{anon}"
    );
    let (_, found) = server
        .api()
        .get("/api/v1/certificates/findings?min_severity=critical")
        .await;
    assert!(
        found
            .as_array()
            .unwrap()
            .iter()
            .any(|f| f["target"] == targets[2] && f["code"] == "weak_cipher"),
        "{found}"
    );
}

/// A scheduled audit scans on its own, every scan goes into the history, and a
/// certificate that changed at the target is marked there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scheduled_audits_keep_history_and_see_a_certificate_change() {
    let pki = tempfile::tempdir().unwrap();
    let d = pki.path();
    let leaf = "basicConstraints=CA:FALSE\nsubjectAltName=DNS:sched.test,IP:127.0.0.1\n";
    cert(d, "first", "P-256", "/CN=sched.test", None, "-sha256", leaf);
    cert(d, "second", "P-256", "/CN=sched.test", None, "-sha256", leaf);
    let target = OpensslTarget::start(d, &["-cert", "first.pem", "-key", "first.key"]).await;
    let port = target.port;
    let server = Server::start(ServerOptions {
        release_key: true,
        tunnel_toml: "min_audit_interval = \"1s\"".into(),
        ..ServerOptions::default()
    })
    .await;
    let host = ProxyHost::start(&server, AGENT, &[format!("127.0.0.1/32:{port}")]).await;
    let api = server.api();
    let addr = format!("127.0.0.1:{port}");

    // Bad schedules are refused, naming what is wrong.
    for (req, want) in [
        (
            json!({"agent": AGENT, "targets": [addr], "every": "10ms"}),
            "outside 1s",
        ),
        (
            json!({"agent": AGENT, "targets": [addr], "every": "often"}),
            "is not a duration",
        ),
        (json!({"agent": AGENT, "targets": [addr], "every": "40days"}), "outside"),
        (
            json!({"agent": AGENT, "targets": ["no-port"], "every": "1s"}),
            "is not host:port",
        ),
        (
            json!({"agent": "nobody", "targets": [addr], "every": "1s"}),
            "no agent nobody",
        ),
    ] {
        let (status, body) = api.post("/api/v1/scans/schedules", &req).await;
        assert!(status == 400 || status == 404, "{req}: {status} {body}");
        assert!(body["error"].as_str().unwrap().contains(want), "{req}: {body}");
    }
    let (status, _) = api.send_delete("/api/v1/scans/schedules/no-such").await;
    assert_eq!(status, 404);

    let keelctl = |args: &[&str]| {
        std::process::Command::new(keel_tests::bin("keelctl"))
            .env("KEEL_SERVER", server.base_url())
            .env("KEEL_TOKEN", &server.admin_token)
            .env("HOME", host.conf.path())
            .args(args)
            .output()
            .unwrap()
    };
    let out = keelctl(&["certs", "schedule", "--agent", AGENT, "--every", "1s", &addr]);
    assert!(out.status.success(), "{out:?}");
    let id = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let history = |api: keel_tests::Api| {
        let q = format!("/api/v1/certificates/history?target={addr}");
        async move { api.get(&q).await.1 }
    };
    // It runs on its own, again and again.
    let first_fp = eventually("two scheduled scans", || async {
        let h = history(server.api()).await;
        let list = h.as_array()?;
        (list.len() >= 2).then(|| list[0]["fingerprint"].as_str().unwrap().to_owned())
    })
    .await;
    assert!(!first_fp.is_empty());
    let (_, listed) = api.get("/api/v1/scans/schedules").await;
    assert_eq!(listed[0]["id"], id.as_str(), "{listed}");
    assert!(listed[0]["last_run"].as_i64().unwrap() > 0, "{listed}");
    assert_eq!(listed[0]["last_ok"], 1, "{listed}");

    // The service gets another certificate: the history marks the change.
    drop(target);
    let _target = OpensslTarget::start_on(d, port, &["-cert", "second.pem", "-key", "second.key"]).await;
    let changed = eventually("a scan that sees the new certificate", || async {
        let h = history(server.api()).await;
        h.as_array()?.iter().find(|e| e["changed"] == true).cloned()
    })
    .await;
    assert_ne!(changed["fingerprint"], first_fp.as_str(), "{changed}");
    assert!(codes_of(&changed).contains(&"self_signed".to_owned()), "{changed}");
    let out = keelctl(&["certs", "history", "--target", &addr]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("changed"), "{out:?}");
    let out = keelctl(&["certs", "schedules"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains(&id), "{out:?}");

    // Unscheduled: no more runs; the history stays.
    let out = keelctl(&["certs", "unschedule", &id]);
    assert!(out.status.success(), "{out:?}");
    let (_, listed) = api.get("/api/v1/scans/schedules").await;
    assert_eq!(listed, json!([]));
    let kept = history(server.api()).await.as_array().unwrap().len();
    assert!(kept >= 3);
    let (status, body) = api.get("/api/v1/certificates/history?limit=0").await;
    assert_eq!(status, 400, "{body}");
}

fn codes_of(event: &Value) -> Vec<String> {
    event["findings"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c.as_str().unwrap().to_owned())
        .collect()
}

/// Discovery sweeps only what the host's allow list permits, scans what
/// answered, and schedules the TLS services it found.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_finds_tls_services_inside_the_allow_list_only() {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let tls = TlsTarget::start("found.internal.test").await;
    let (plain, _) = closed_target().await;
    // Listening, but on a port the list does not name.
    let (_outside, outside_seen) = closed_target().await;
    let nothing = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let allow: Vec<String> = [tls.port, plain, nothing]
        .iter()
        .map(|p| format!("127.0.0.1/32:{p}"))
        .collect();
    let host = ProxyHost::start(&server, AGENT, &allow).await;
    let api = server.api();

    for (req, want) in [
        (json!({"agent": AGENT, "ports": [0]}), "ports:"),
        (json!({"agent": AGENT, "every": "1ms"}), "every:"),
        (json!({"agent": "nobody"}), "no agent nobody"),
        (json!({"agent": AGENT, "x": 1}), "unknown field"),
    ] {
        let (status, body) = api.post("/api/v1/scans/discover", &req).await;
        assert!(status == 400 || status == 404, "{req}: {status} {body}");
        assert!(body["error"].as_str().unwrap().contains(want), "{req}: {body}");
    }

    let (status, found) = api
        .post("/api/v1/scans/discover", &json!({"agent": AGENT, "every": "1h"}))
        .await;
    assert_eq!(status, 200, "{found}");
    assert_eq!(found["tried"], 3, "{found}");
    let scans: Vec<(String, String)> = results(&found["scans"]).into_iter().map(|(t, s, _)| (t, s)).collect();
    let tls_target = format!("127.0.0.1:{}", tls.port);
    let mut want = vec![
        (tls_target.clone(), "ok".to_owned()),
        (format!("127.0.0.1:{plain}"), "failed".to_owned()),
    ];
    want.sort();
    let mut got = scans.clone();
    got.sort();
    assert_eq!(
        got, want,
        "the closed port is not open, the plain one is not TLS: {found}"
    );
    assert_eq!(
        outside_seen.load(Ordering::SeqCst),
        0,
        "nothing outside the list is tried"
    );
    let (_, schedules) = api.get("/api/v1/scans/schedules").await;
    assert_eq!(schedules[0]["id"], found["schedules"][0], "{schedules}");
    assert_eq!(schedules[0]["targets"], json!([tls_target]), "{schedules}");

    let out = std::process::Command::new(keel_tests::bin("keelctl"))
        .env("KEEL_SERVER", server.base_url())
        .env("KEEL_TOKEN", &server.admin_token)
        .env("HOME", host.conf.path())
        .args(["certs", "discover", "--agent", AGENT])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{out:?}");
    assert!(
        text.contains(&tls_target) && text.contains("3 endpoints tried"),
        "{text}"
    );
}
