//! Enrollment: tokens, CA pinning, CSR checks, and what lands on disk.

use std::os::unix::fs::PermissionsExt;

use keel_tests::{Agent, Api, Server, ServerOptions};
use serde_json::json;

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn enrolled_agent_comes_online_with_host_facts() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "host-a");
    let pki = agent.state_dir().join("pki");
    let mode = std::fs::metadata(pki.join("agent.key")).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "agent.key must be private");
    agent.start();

    let api = server.api();
    let a = api.online("host-a").await;
    for field in [
        "kernel_version",
        "arch",
        "platform",
        "boot_time",
        "total_mem",
        "load_1",
        "mem_usage",
        "cpu_usage",
        "rss",
        "nfd",
        "threads",
        "start_time",
    ] {
        let v = a["heartbeat"][field].as_str().unwrap_or_default();
        assert!(!v.is_empty(), "heartbeat field {field} is empty: {a}");
    }
    assert_eq!(a["product"], "keel-agent");
    assert!(!a["hostname"].as_str().unwrap().is_empty());
    assert!(a["version"].as_str().is_some_and(|v| !v.is_empty()));
    assert!(a["plugins"].is_array() && a["tags"].is_array());
    let listed = api.agents().await;
    assert!(listed.iter().any(|x| x["id"] == "host-a" && x["online"] == true));

    // The heartbeat reached the sink, decoded.
    let lines = server.sink_lines();
    let hb = lines
        .iter()
        .find(|l| l["data_type"] == 1000 && l["agent_id"] == "host-a")
        .expect("heartbeat in the sink");
    assert!(hb["fields"]["kernel_version"].is_string() && hb["server_time"].is_i64() && hb["timestamp"].is_i64());

    // The private key never left the host: it is nowhere under the server's directory.
    let key = std::fs::read_to_string(pki.join("agent.key")).unwrap();
    let body: String = key.lines().filter(|l| !l.starts_with("-----")).collect();
    for entry in keel_tests::files_under(server.dir.path()) {
        let bytes = std::fs::read(&entry).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&bytes).contains(&body),
            "agent key found in {}",
            entry.display()
        );
    }
}

#[tokio::test]
async fn refused_enrollments_register_nothing() {
    let server = Server::start(ServerOptions::default()).await;
    let fp = server.fingerprint();
    let api = server.api();

    // An expired token.
    let expired = server.enrollment_token(5, "1ms");
    let a = Agent::new(&server, "expired-1", "");
    let out = a.enroll(&server, &expired, Some(&fp));
    assert!(!out.status.success());
    assert!(stderr(&out).contains("has expired"), "{}", stderr(&out));

    // A token used beyond its uses.
    let once = server.enrollment_token(1, "10m");
    assert!(
        Agent::new(&server, "first-1", "")
            .enroll(&server, &once, Some(&fp))
            .status
            .success()
    );
    let out = Agent::new(&server, "second-1", "").enroll(&server, &once, Some(&fp));
    assert!(stderr(&out).contains("no uses left"), "{}", stderr(&out));

    // An unknown token.
    let out = Agent::new(&server, "unknown-1", "").enroll(&server, "keel_e_not-a-token", Some(&fp));
    assert!(stderr(&out).contains("unknown enrollment token"), "{}", stderr(&out));

    // A wrong CA fingerprint: refused before the token is sent, so it stays usable.
    let token = server.enrollment_token(1, "10m");
    let wrong = "00".repeat(32);
    let out = Agent::new(&server, "pinned-1", "").enroll(&server, &token, Some(&wrong));
    assert!(stderr(&out).contains("CA fingerprint mismatch"), "{}", stderr(&out));
    // No fingerprint at all: refused, and the fingerprint to check is printed.
    let out = Agent::new(&server, "pinned-1", "").enroll(&server, &token, None);
    assert!(stderr(&out).contains(&fp), "{}", stderr(&out));
    assert!(
        Agent::new(&server, "pinned-1", "")
            .enroll(&server, &token, Some(&fp))
            .status
            .success()
    );

    for id in ["expired-1", "second-1", "unknown-1"] {
        assert!(api.agent(id).await.is_none(), "{id} must not be registered");
    }
    let log = server.log();
    assert!(
        log.contains("enrollment refused") && log.contains("has expired") && log.contains("no uses left"),
        "{log}"
    );
}

fn rsa_csr(agent_id: &str) -> String {
    use rsa::pkcs8::EncodePrivateKey;
    let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 2048).unwrap();
    let pem = key.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
    let pair = rcgen::KeyPair::from_pkcs8_pem_and_sign_algo(&pem, &rcgen::PKCS_RSA_SHA256).unwrap();
    let mut params = rcgen::CertificateParams::default();
    params.distinguished_name = rcgen::DistinguishedName::new();
    params.distinguished_name.push(rcgen::DnType::CommonName, agent_id);
    params.serialize_request(&pair).unwrap().pem().unwrap()
}

#[tokio::test]
async fn csr_with_a_disallowed_key_type_is_refused_without_spending_the_token() {
    let server = Server::start(ServerOptions::default()).await;
    let token = server.enrollment_token(1, "10m");
    let anon = Api::new(&server.base_url(), "");
    let body = json!({"token": token, "agent_id": "rsa-1", "hostname": "h", "csr": rsa_csr("rsa-1")});
    let (status, answer) = anon.post("/enroll", &body).await;
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"]
            .as_str()
            .unwrap()
            .contains("key type rsa is not allowed"),
        "{answer}"
    );
    assert!(server.api().agent("rsa-1").await.is_none());
    assert!(server.log().contains("key type rsa is not allowed"));

    // Malformed input gets a precise error too.
    let (status, answer) = anon.post_raw("/enroll", "{\"token\": 5").await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("invalid request body"),
        "{answer}"
    );
    let bad_id = json!({"token": token, "agent_id": "../etc", "csr": "x"});
    let (status, answer) = anon.post("/enroll", &bad_id).await;
    assert_eq!(status, 400);
    assert!(
        answer["error"].as_str().unwrap().contains("invalid agent_id"),
        "{answer}"
    );

    // The token was not spent on the refused requests.
    let agent = Agent::new(&server, "ec-1", "");
    let out = agent.enroll(&server, &token, Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", stderr(&out));
}

#[tokio::test]
async fn reenrolling_an_id_revokes_its_older_certificate() {
    let server = Server::start(ServerOptions::default()).await;
    let old = Agent::enrolled(&server, "again-1");
    let old_pair = keel_tests::agent_pair(&old);
    let _new = Agent::enrolled(&server, "again-1");
    keel_tests::stream_refusal(&server, Some(&old_pair), "again-1").await;
    // The refusal can reach the client before the server has written its log line.
    keel_tests::eventually("the server to log the revoked certificate", || async {
        server.log().contains("client certificate is revoked").then_some(())
    })
    .await;
    let log = server.log();
    assert!(log.contains("re-enrollment revoked earlier certificates"), "{log}");
}

#[tokio::test]
async fn https_enrollment_pins_the_ca_and_discovery_finds_the_stream() {
    let server = Server::start(ServerOptions {
        https: true,
        ..Default::default()
    })
    .await;
    let api = server.api();
    assert!(
        api.agents().await.is_empty(),
        "the API answers over HTTPS verified against the Keel CA"
    );

    // An agent that knows only the discovery URL.
    let mut agent = Agent::new(&server, "disc-1", "");
    let text = std::fs::read_to_string(&agent.config).unwrap();
    let private = format!("private = [\"{}\"]", server.grpc);
    let discovery = format!("discovery_url = \"{}/discovery\"", server.base_url());
    std::fs::write(&agent.config, text.replace(&private, &discovery)).unwrap();
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", stderr(&out));
    agent.start();
    api.online("disc-1").await;

    // Plain HTTP to the HTTPS listener gets nowhere.
    let plain = reqwest::Client::new()
        .get(format!("http://{}/healthz", server.http))
        .send()
        .await;
    assert!(plain.is_err(), "plain HTTP must not be served: {plain:?}");
}
