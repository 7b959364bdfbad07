//! Enrollment by key against a real MariaDB key database: the shipped provider
//! script, the key-request plugin on a real agent, and hosts enrolling with
//! `keel-agent enroll --key-file`.

use std::path::Path;
use std::time::Duration;

use keel_tests::mariadb::{AgentRow, KeyDb, key_provider};
use keel_tests::{Agent, Api, Server, ServerOptions};
use serde_json::{Value, json};

const KEYS: [&str; 4] = [
    "k1-Sup3r-Secret-One",
    "k2-Sup3r-Secret-Two",
    "k4-Sup3r-Secret-Four",
    "k5-Sup3r-Secret-Five",
];

fn key_db() -> KeyDb {
    KeyDb::create(&[
        AgentRow::new("001", "web-1", "127.0.0.0/8", KEYS[0]),
        AgentRow::new("002", "web-2", "10.9.9.0/24", KEYS[1]),
        AgentRow::new("004", "ip-host", "127.0.0.1", KEYS[2]),
        // Another ID under the name of 001.
        AgentRow::new("005", "web-1", "any", KEYS[3]),
    ])
}

async fn key_server(extra: &str) -> Server {
    Server::start(ServerOptions {
        release_key: true,
        extra_toml: format!(
            "[key_enrollment]\nenabled = true\nproviders = [\"keys-1\"]\nprovider_timeout = \"20s\"\n{extra}"
        ),
        ..Default::default()
    })
    .await
}

/// Enrolls by key and returns (success, stdout, stderr).
fn enroll(server: &Server, id: &str, key: &str) -> (bool, String, String) {
    let host = Agent::new(server, id, "");
    let out = host.enroll_by_key(server, key);
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).trim().to_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn refused(server: &Server, id: &str, key: &str, want: &str) {
    let (ok, out, err) = enroll(server, id, key);
    assert!(!ok, "enrollment of {id:?} should be refused, it gave {out}");
    assert!(err.contains(want), "refusal of {id:?}: {err}");
    assert!(server.log().contains(want), "the server log names the reason {want:?}");
}

/// Enrolls by key by hand, as `keel-agent enroll --key-file` does, but with an
/// `X-Forwarded-For` header; returns the status and the answer.
async fn enroll_forwarded(server: &Server, id: &str, key: &str, forwarded_for: &str) -> (u16, Value) {
    let api = Api::new(&server.base_url(), "");
    let url = |path: &str| format!("{}{path}", server.base_url());
    let (status, challenge) = api.send_request(api.client().post(url("/enroll/challenge"))).await;
    assert_eq!(status, 200, "{challenge}");
    let nonce = challenge["nonce"].as_str().unwrap();
    let body = keel_tests::key_enroll_body(nonce, id, key, "behind-a-proxy");
    let req = api
        .client()
        .post(url("/enroll/key"))
        .header("X-Forwarded-For", forwarded_for)
        .json(&body);
    api.send_request(req).await
}

/// Every file below `dir`, as bytes.
fn files_under(dir: &Path, out: &mut Vec<(std::path::PathBuf, Vec<u8>)>) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            files_under(&p, out);
        } else if let Ok(bytes) = std::fs::read(&p) {
            out.push((p, bytes));
        }
    }
}

#[tokio::test]
async fn hosts_enroll_by_key_and_every_refusal_names_its_reason() {
    let db = key_db();
    let server = key_server("").await;
    let api = server.api();

    // Nobody to ask yet.
    refused(&server, "001", KEYS[0], "no key provider online (configured: keys-1)");

    let mut keys = key_provider(&server, &api, "keys-1", &db).await;

    // By ID: the database's ID and name, and a working stream.
    let mut host = Agent::new(&server, "001", "");
    let out = host.enroll_by_key(&server, KEYS[0]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "001");
    host.start();
    let a = api.online("001").await;
    assert_eq!(a["name"], "web-1");
    let id = host.cmd(&["id"]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&id.stdout).trim(), "001");

    // By source address: no ID given.
    let (ok, out, err) = enroll(&server, "", KEYS[2]);
    assert!(ok, "{err}");
    assert_eq!(out, "004");
    assert_eq!(api.agent("004").await.unwrap()["name"], "ip-host");

    // Refusals, each with its reason.
    refused(
        &server,
        "002",
        "not-the-key",
        "key proof for agent 002 does not match the key on record (HMAC mismatch)",
    );
    refused(
        &server,
        "002",
        KEYS[1],
        "source address 127.0.0.1 is outside 10.9.9.0/24 on record for agent 002",
    );
    // No trusted proxies: a host cannot claim an address by header.
    let (status, answer) = enroll_forwarded(&server, "002", KEYS[1], "10.9.9.7").await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("source address 127.0.0.1 is outside 10.9.9.0/24"),
        "{answer}"
    );
    refused(&server, "009", KEYS[0], "error 4: No agent key found");
    refused(&server, "001", KEYS[0], "agent 001 is already registered");
    refused(
        &server,
        "005",
        KEYS[3],
        "the name web-1 is already registered to agent 001",
    );
    assert!(
        api.agent("002").await.is_none() && api.agent("005").await.is_none(),
        "nothing registered"
    );

    // An injection attempt is refused before any lookup; a challenge is spent once.
    let anon = reqwest::Client::new();
    let url = format!("{}/enroll/key", server.base_url());
    let challenge = || async {
        let c: Value = anon
            .post(format!("{}/enroll/challenge", server.base_url()))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        c["nonce"].as_str().unwrap().to_owned()
    };
    let body = json!({"nonce": challenge().await, "id": "001' OR '1'='1", "csr": "x", "proof": "00".repeat(32)});
    let injected = anon.post(&url).json(&body).send().await.unwrap();
    assert_eq!(injected.status(), 400);
    assert!(injected.text().await.unwrap().contains("1-8 digits"));
    let body = json!({"nonce": challenge().await, "id": "001", "csr": "x", "proof": "00".repeat(32)});
    let first = anon.post(&url).json(&body).send().await.unwrap();
    assert_eq!(first.status(), 400, "a bad CSR, but the nonce is spent");
    let again = anon.post(&url).json(&body).send().await.unwrap();
    assert_eq!(again.status(), 401);
    assert!(
        again
            .text()
            .await
            .unwrap()
            .contains("unknown, used or expired challenge")
    );

    // The audit log has each attempt with its outcome.
    let (_, audit) = api.get("/api/v1/audit?target=/enroll/key/").await;
    let outcomes: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["outcome"].as_str().unwrap())
        .collect();
    assert!(outcomes.iter().filter(|o| **o == "ok").count() == 2, "{outcomes:?}");
    assert!(outcomes.iter().any(|o| o.contains("HMAC mismatch")), "{outcomes:?}");

    // Only configured providers are trusted: with keys-1 gone, another agent
    // running key-request is not asked.
    let rogue = key_provider(&server, &api, "rogue-1", &db).await;
    keys.stop_within(Duration::from_secs(10));
    keel_tests::eventually("keys-1 offline", || async {
        api.agent("keys-1").await.filter(|a| a["online"] == false)
    })
    .await;
    refused(&server, "002", KEYS[1], "no key provider online (configured: keys-1)");

    // The keys are nowhere on the server (logs, database, records), nor in what
    // the provider agents and their plugins wrote.
    let mut files = Vec::new();
    files_under(server.dir.path(), &mut files);
    files_under(&server.data_dir(), &mut files);
    files_under(keys.dir.path(), &mut files);
    files_under(rogue.dir.path(), &mut files);
    let plugin_log = keys.state_dir().join("plugins/key-request/key-request.log");
    assert!(
        files.iter().any(|(p, b)| *p == plugin_log && !b.is_empty()),
        "the plugin's output is among the files read"
    );
    for key in KEYS {
        for (path, bytes) in &files {
            assert!(
                !bytes.windows(key.len()).any(|w| w == key.as_bytes()),
                "{} holds a key",
                path.display()
            );
        }
    }
}

#[tokio::test]
async fn with_replace_a_host_takes_over_an_id_and_the_old_certificate_is_revoked() {
    let db = key_db();
    let server = key_server("replace = true\n").await;
    let api = server.api();
    let _keys = key_provider(&server, &api, "keys-1", &db).await;

    let mut first = Agent::new(&server, "001", "");
    assert!(first.enroll_by_key(&server, KEYS[0]).status.success());
    first.start();
    api.online("001").await;
    let old = keel_tests::agent_pair(&first);

    let (ok, out, err) = enroll(&server, "001", KEYS[0]);
    assert!(ok, "{err}");
    assert_eq!(out, "001");
    keel_tests::stream_refusal(&server, Some(&old), "001").await;
    // The same name under another ID replaces the agent of that name.
    let (ok, out, err) = enroll(&server, "005", KEYS[3]);
    assert!(ok, "{err}");
    assert_eq!(out, "005");
    assert!(
        api.agent("001").await.is_none(),
        "agent 001 made way for 005, which has its name"
    );
}

#[tokio::test]
async fn behind_a_trusted_proxy_the_forwarded_address_is_checked() {
    let db = key_db();
    let server = key_server("trusted_proxies = [\"127.0.0.1\"]\n").await;
    let api = server.api();
    let _keys = key_provider(&server, &api, "keys-1", &db).await;

    // The proxy saw 10.9.9.7, inside 002's network: enrolled.
    let (status, answer) = enroll_forwarded(&server, "002", KEYS[1], "10.9.9.7").await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["agent_id"], "002");
    let (_, audit) = api.get("/api/v1/audit").await;
    assert!(
        audit
            .to_string()
            .contains("enrollment by key from 10.9.9.7 (via proxy 127.0.0.1:"),
        "the audit log names both the source and the proxy: {audit}"
    );
    // What the client claimed itself counts for nothing against what the proxy saw.
    let (status, answer) = enroll_forwarded(&server, "001", KEYS[0], "127.0.0.1, 10.1.1.1").await;
    assert_eq!(status, 403, "{answer}");
    assert!(
        answer
            .to_string()
            .contains("source address 10.1.1.1 is outside 127.0.0.0/8"),
        "{answer}"
    );
    // A malformed header from the proxy is refused, naming the entry.
    let (status, answer) = enroll_forwarded(&server, "001", KEYS[0], "10.9.9.7, not-an-ip").await;
    assert_eq!(status, 400, "{answer}");
    assert!(answer.to_string().contains("not-an-ip"), "{answer}");
}
