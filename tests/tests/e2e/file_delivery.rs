//! file-delivery end to end: keelctl as the keeper, a real server relaying, a real
//! agent running the packaged-style plugin, files on disk and the local file
//! server, with every refusal tried.

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use keel_plugin_file_delivery::envelope::{FileSpec, Keeper as Sealer};
use keel_tests::filedelivery::{FileHost, Keeper};
use keel_tests::{Api, Server, ServerOptions, eventually};
use serde_json::{Value, json};

const AGENT: &str = "fd-1";
/// How app/db.pass is pushed.
const DB: &[&str] = &["--mode", "0640", "--reader", "nobody"];
const SECRET: &[u8] = b"postgres://app:V3ry-S3cret-Passw0rd@db/app\n";

struct Host {
    server: Server,
    host: FileHost,
    api: Api,
    keeper: Keeper,
    files: PathBuf,
    /// The file server's address.
    file_server: String,
}

impl Host {
    fn keelctl(&self, args: &[&str]) -> Output {
        self.keeper.keelctl(args)
    }

    fn keeper_key(&self) -> PathBuf {
        self.keeper.key()
    }

    /// `keelctl files push` of `name=path` to the agent, `--json`: its rows and exit code.
    fn push(&self, extra: &[&str], files: &[String]) -> (Option<i32>, Vec<Value>) {
        self.keeper.push(&["--agent", AGENT], extra, files)
    }

    /// The host key as `file-delivery host-key` prints it on the host.
    fn host_key(&self) -> String {
        self.host.host_key()
    }

    /// Sends a raw 6200/6202 task through the API and waits for its result.
    async fn task(&self, data_type: i32, data: &str) -> Value {
        let (status, created) = self
            .api
            .post(
                &format!("/api/v1/agents/{AGENT}/tasks"),
                &json!({"data_type": data_type, "object_name": "file-delivery", "data": data}),
            )
            .await;
        assert_eq!(status, 202, "{created}");
        let token = created["token"].as_str().unwrap().to_owned();
        eventually("the task's result", || async {
            let (_, t) = self.api.get(&format!("/api/v1/tasks/{token}")).await;
            (t["status"] != "sent").then_some(t)
        })
        .await
    }
}

fn source(dir: &Path, name: &str, content: &[u8]) -> String {
    let path = dir.join(name);
    std::fs::write(&path, content).unwrap();
    path.display().to_string()
}

async fn host() -> Host {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let keeper = Keeper::new(&server);
    let host = FileHost::start(&server, AGENT, &keeper.public, "listen = \"127.0.0.1:0\"", &[]).await;
    let api = server.api();
    let log_dir = host.agent.dir.path().join("state/plugins/file-delivery");
    let file_server = eventually("the plugin's file server to listen", || async {
        let path = keel_tests::files_under(&log_dir)
            .into_iter()
            .find(|p| p.file_name().is_some_and(|n| n == "file-delivery.log"))?;
        let log = std::fs::read_to_string(path).ok()?;
        let at = log.find("file_server=")? + "file_server=".len();
        let addr: String = log[at..].chars().take_while(|c| !c.is_whitespace()).collect();
        addr.contains(':').then_some(addr)
    })
    .await;
    Host {
        files: host.files.clone(),
        server,
        host,
        api,
        keeper,
        file_server,
    }
}

/// A raw HTTP/1.0 GET to the file server as `uid`; status line and body. Raw,
/// so that the path reaches the server exactly as written.
fn get_as(addr: &str, path: &str, uid: Option<u32>) -> (u16, String) {
    let (host, port) = addr.rsplit_once(':').unwrap();
    let script =
        format!("exec 3<>/dev/tcp/{host}/{port}; printf 'GET {path} HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n' >&3; cat <&3");
    let mut cmd = Command::new("bash");
    cmd.args(["-c", &script]);
    if let Some(uid) = uid {
        std::os::unix::process::CommandExt::uid(&mut cmd, uid);
        std::os::unix::process::CommandExt::gid(&mut cmd, uid);
    }
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let status = text.split_whitespace().nth(1).and_then(|s| s.parse().ok()).unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

fn action(rows: &[Value], name: &str) -> (String, String) {
    let r = rows
        .iter()
        .find(|r| r["name"] == name)
        .unwrap_or_else(|| panic!("{name} in {rows:?}"));
    (
        r["action"].as_str().unwrap().to_owned(),
        r["detail"].as_str().unwrap().to_owned(),
    )
}

#[tokio::test]
async fn files_are_sealed_to_the_host_sent_when_changed_and_served_to_their_readers() {
    let h = host().await;
    let src = tempfile::tempdir().unwrap();
    let db = source(src.path(), "db", SECRET);
    let other = source(src.path(), "other", b"for root only\n");
    let files = [format!("app/db.pass={db}"), format!("app/root-only={other}")];

    // A host key nobody pinned is refused, naming what to check.
    let (code, rows) = h.push(&["--reader", "nobody"], &files);
    assert_eq!(code, Some(2), "{rows:?}");
    let (act, detail) = action(&rows, "-");
    assert_eq!(act, "failed");
    assert!(
        detail.contains("not pinned") && detail.contains("nothing was sent"),
        "{detail}"
    );
    assert!(!h.files.join("app").exists());

    // Pinned with the key the host itself prints: sent, written, mode as asked.
    let host_key = h.host_key();
    let (code, rows) = h.push(
        &["--accept-host-key", &host_key, "--mode", "0640", "--reader", "nobody"],
        &files[..1],
    );
    assert_eq!(code, Some(0), "{rows:?}");
    assert_eq!(action(&rows, "app/db.pass").0, "sent");
    let written = h.files.join("app/db.pass");
    assert_eq!(std::fs::read(&written).unwrap(), SECRET);
    assert_eq!(std::fs::metadata(&written).unwrap().mode() & 0o7777, 0o640);
    // The same again: not even sent.
    let (code, rows) = h.push(DB, &files[..1]);
    assert_eq!(code, Some(0), "{rows:?}");
    assert_eq!(action(&rows, "app/db.pass").0, "unchanged");
    let (code, rows) = h.push(&[], &files[1..]);
    assert_eq!(code, Some(0), "{rows:?}");
    assert_eq!(action(&rows, "app/root-only").0, "sent", "{rows:?}");
    // Other readers are a change of the delivery: sent, and the host keeps the
    // bytes, which did not change.
    let (_, rows) = h.push(&["--mode", "0640"], &files[..1]);
    let (act, detail) = action(&rows, "app/db.pass");
    assert_eq!((act.as_str(), detail.contains("unchanged")), ("sent", true), "{detail}");
    let (_, rows) = h.push(DB, &files[..1]);
    assert_eq!(action(&rows, "app/db.pass").0, "sent");

    // Changed content is sent and replaces the file.
    let db2 = source(src.path(), "db", b"rotated\n");
    let (_, rows) = h.push(DB, &[format!("app/db.pass={db2}")]);
    assert_eq!(action(&rows, "app/db.pass").0, "sent");
    assert_eq!(std::fs::read(&written).unwrap(), b"rotated\n");

    // Changed or deleted on the host: the inventory says so and a push repairs it.
    std::fs::write(&written, b"edited by hand").unwrap();
    let out = h.keelctl(&["files", "list", "--json", "--agent", AGENT]);
    let list: Value = serde_json::from_slice(&out.stdout).unwrap();
    let states: Vec<(&str, &str)> = list
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["name"].as_str().unwrap(), f["state"].as_str().unwrap()))
        .collect();
    assert_eq!(states, [("app/db.pass", "modified"), ("app/root-only", "ok")]);
    let (_, rows) = h.push(DB, &[format!("app/db.pass={db2}")]);
    assert_eq!(action(&rows, "app/db.pass").0, "sent");
    assert_eq!(std::fs::read(&written).unwrap(), b"rotated\n");

    // The local file server: to root and the named readers only, and nothing outside.
    let fs = h.file_server.as_str();
    assert_eq!(get_as(fs, "/v1/files/app/db.pass", None), (200, "rotated\n".into()));
    assert_eq!(
        get_as(fs, "/v1/files/app/db.pass", Some(65534)),
        (200, "rotated\n".into())
    );
    let (status, body) = get_as(fs, "/v1/files/app/root-only", Some(65534));
    assert_eq!(status, 403, "{body}");
    assert!(body.contains("uid 65534 is not a reader of app/root-only"), "{body}");
    let (status, body) = get_as(fs, "/v1/files", Some(65534));
    assert_eq!(status, 200);
    let listed: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        1,
        "only what nobody may read: {listed}"
    );
    for path in [
        "/v1/files/../../../../etc/passwd",
        "/v1/files/%2e%2e/%2e%2e/etc/passwd",
        "/v1/files/app%2f..%2f..%2fstate%2fhost.key",
        "/v1/files//etc/passwd",
        "/v1/files/app/.db.pass.tmp",
    ] {
        let (status, body) = get_as(fs, path, None);
        assert!(status == 400 || status == 404, "{path}: {status} {body}");
        assert!(!body.contains("root:") && !body.contains("rotated"), "{path}: {body}");
    }
    assert_eq!(get_as(fs, "/v1/files/app/missing", None).0, 404);

    // The server relayed all of it and can read none of it.
    let secret = String::from_utf8_lossy(SECRET);
    let secret = secret.trim();
    for path in keel_tests::files_under(&h.server.data_dir()) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !contains(&bytes, secret.as_bytes()) && !contains(&bytes, b"rotated"),
            "{} holds a delivered secret",
            path.display()
        );
    }
    assert!(!h.server.log().contains(secret) && !h.host.agent.log().contains(secret));

    // Removal, signed like a delivery.
    let key = h.keeper_key();
    let out = h.keelctl(&[
        "files",
        "remove",
        "--json",
        "--agent",
        AGENT,
        "--keeper-key",
        key.to_str().unwrap(),
        "app/root-only",
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(!h.files.join("app/root-only").exists());
}

#[tokio::test]
async fn the_host_refuses_strangers_replays_and_swapped_keys() {
    let h = host().await;
    let host_key = h.host_key();
    let src = tempfile::tempdir().unwrap();
    let v1 = source(src.path(), "v1", b"first\n");
    let (code, rows) = h.push(&["--accept-host-key", &host_key], &[format!("tls.key={v1}")]);
    assert_eq!(code, Some(0), "{rows:?}");

    // A delivery signed by a key the host does not list.
    let stranger = Sealer::from_seed(&[9; 32]);
    let spec = FileSpec {
        name: "tls.key".into(),
        mode: "0600".into(),
        readers: vec![],
    };
    let forged = stranger.seal(&host_key, &spec, b"evil\n", u64::MAX / 2).unwrap();
    let t = h.task(6200, &serde_json::to_string(&forged).unwrap()).await;
    assert_eq!(t["status"], "failed");
    assert!(
        t["result"]["msg"]
            .as_str()
            .unwrap()
            .contains("not among this host's keeper_keys"),
        "{t}"
    );

    // The real keeper's older delivery, replayed by whoever relays.
    let seed: [u8; 32] = hex::decode(std::fs::read_to_string(h.keeper_key()).unwrap().trim())
        .unwrap()
        .try_into()
        .unwrap();
    let keeper = Sealer::from_seed(&seed);
    let old = keeper.seal(&host_key, &spec, b"old\n", 1).unwrap();
    let t = h.task(6200, &serde_json::to_string(&old).unwrap()).await;
    assert!(
        t["result"]["msg"].as_str().unwrap().contains("version 1 is older than"),
        "{t}"
    );
    // A delivery re-addressed to this host by editing the envelope.
    let elsewhere = keeper.seal(&"ab".repeat(32), &spec, b"x\n", u64::MAX / 2).unwrap();
    let mut moved = serde_json::to_value(&elsewhere).unwrap();
    moved["host_key"] = json!(host_key);
    let t = h.task(6200, &moved.to_string()).await;
    assert!(
        t["result"]["msg"]
            .as_str()
            .unwrap()
            .contains("signature does not verify"),
        "{t}"
    );
    // A removal sent as a delivery, and garbage.
    let rm = keeper.removal(&host_key, "tls.key", u64::MAX / 2).unwrap();
    let t = h.task(6200, &serde_json::to_string(&rm).unwrap()).await;
    assert!(
        t["result"]["msg"]
            .as_str()
            .unwrap()
            .contains("a remove envelope was sent as task 6200"),
        "{t}"
    );
    let t = h.task(6200, "{\"v\":1,\"name\":\"../../etc/cron.d/x\"}").await;
    assert!(
        t["result"]["msg"]
            .as_str()
            .unwrap()
            .starts_with("not a file-delivery envelope"),
        "{t}"
    );
    assert_eq!(
        std::fs::read(h.files.join("tls.key")).unwrap(),
        b"first\n",
        "nothing accepted was lost"
    );

    // A host key that changed (as a server inventing one would make it) stops the keeper.
    let pins = h.keeper.pins();
    std::fs::write(&pins, json!({AGENT: "cd".repeat(32)}).to_string()).unwrap();
    let v2 = source(src.path(), "v2", b"second\n");
    let (code, rows) = h.push(&[], &[format!("tls.key={v2}")]);
    assert_eq!(code, Some(2));
    assert!(action(&rows, "-").1.contains("the host key changed"), "{rows:?}");
    assert_eq!(std::fs::read(h.files.join("tls.key")).unwrap(), b"first\n");
}

fn contains(hay: &[u8], needle: &[u8]) -> bool {
    hay.windows(needle.len()).any(|w| w == needle)
}

/// The rows of `agent` in a push report, by file name: (action, detail).
fn rows_of(rows: &[Value], agent: &str) -> std::collections::BTreeMap<String, (String, String)> {
    rows.iter()
        .filter(|r| r["agent"] == agent)
        .map(|r| {
            (
                r["name"].as_str().unwrap().to_owned(),
                (
                    r["action"].as_str().unwrap().to_owned(),
                    r["detail"].as_str().unwrap().to_owned(),
                ),
            )
        })
        .collect()
}

/// Bytes that do not compress, so the large file really is large on the wire.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            (x >> 24) as u8
        })
        .collect()
}

#[tokio::test]
async fn one_push_by_tag_reaches_every_host_and_an_offline_one_when_it_returns() {
    let server = Server::start(ServerOptions::default()).await;
    let api = server.api();
    let keeper = Keeper::new(&server);
    let ids: Vec<String> = (0..10).map(|i| format!("fleet-{i}")).collect();
    let mut hosts = FileHost::start_all(&server, &ids, &keeper.public, &["web"]).await;
    let untagged = FileHost::start(&server, "fleet-db", &keeper.public, "", &["db"]).await;
    let src = tempfile::tempdir().unwrap();
    // Larger than a part: it travels in pieces.
    let big = noise(1 << 20, 7);
    let files = [
        format!("app/db.pass={}", source(src.path(), "db", SECRET)),
        format!("app/api.token={}", source(src.path(), "token", b"tok-1\n")),
        format!("tls/bundle.pem={}", source(src.path(), "big", &big)),
    ];

    // Bad input is refused before anything is sent.
    let key = keeper.key();
    let key = key.to_str().unwrap();
    let out = keeper.keelctl(&[
        "files",
        "push",
        "--tag",
        "web",
        "--agent",
        "fleet-0",
        "--keeper-key",
        key,
        &files[0],
    ]);
    assert_eq!(out.status.code(), Some(64), "a tag and agents together");
    assert!(String::from_utf8_lossy(&out.stderr).contains("'--tag <TAG>' cannot be used with '--agent <ID>'"));
    let out = keeper.keelctl(&["files", "push", "--keeper-key", key, &files[0]]);
    assert_eq!(out.status.code(), Some(64), "no target");
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("--agent, --tag or --all"),
        "{out:?}"
    );
    let huge = source(src.path(), "huge", &vec![0; (16 << 20) + 1]);
    let out = keeper.keelctl(&[
        "files",
        "push",
        "--tag",
        "web",
        "--keeper-key",
        key,
        &format!("huge={huge}"),
    ]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("at most 16777216 are delivered"),
        "{out:?}"
    );

    // Fresh: one push, every tagged host, each file written whole; the large one
    // came in pieces. The untagged host gets nothing.
    let (code, rows) = keeper.push(&["--tag", "web", "--trust-new-hosts"], &[], &files);
    assert_eq!(code, Some(0), "{rows:#?}");
    assert_eq!(rows.len(), 30, "{rows:#?}");
    for h in &hosts {
        let id = h.agent.id.as_str();
        let mine = rows_of(&rows, id);
        assert!(
            mine.values().all(|(a, d)| a == "sent" && d.contains("written")),
            "{id}: {mine:?}"
        );
        assert_eq!(std::fs::read(h.files.join("app/db.pass")).unwrap(), SECRET);
        assert_eq!(std::fs::read(h.files.join("tls/bundle.pem")).unwrap(), big, "{id}");
        assert_eq!(
            std::fs::read_dir(h.conf.path().join("state/uploads")).unwrap().count(),
            0,
            "no half upload left"
        );
    }
    assert!(!untagged.files.join("app").exists());

    // One host offline; one file changed: the online ones get only that file, the
    // offline one's share waits for it.
    let mut away = hosts.pop().unwrap();
    away.agent.stop_within(std::time::Duration::from_secs(10));
    eventually("fleet-9 offline", || async {
        let a = api.agent("fleet-9").await?;
        (a["online"] == false).then_some(())
    })
    .await;
    let files2 = [
        files[0].clone(),
        format!("app/api.token={}", source(src.path(), "token", b"tok-2\n")),
        files[2].clone(),
    ];
    let (code, rows) = keeper.push(&["--tag", "web"], &[], &files2);
    assert_eq!(code, Some(0), "an offline host is no failure: {rows:#?}");
    for h in &hosts {
        let mine = rows_of(&rows, &h.agent.id);
        assert_eq!(mine["app/api.token"].0, "sent", "{mine:?}");
        assert_eq!(mine["app/db.pass"].0, "unchanged", "{mine:?}");
        assert_eq!(mine["tls/bundle.pem"].0, "unchanged", "{mine:?}");
        assert_eq!(std::fs::read(h.files.join("app/api.token")).unwrap(), b"tok-2\n");
    }
    let mine = rows_of(&rows, "fleet-9");
    assert!(
        mine.values()
            .all(|(a, d)| a == "queued" && d.contains("when the agent reconnects")),
        "{mine:?}"
    );
    assert_eq!(std::fs::read(away.files.join("app/api.token")).unwrap(), b"tok-1\n");

    // files status: the offline host is behind, nobody else.
    let status = |args: &[&str]| {
        let mut all = vec!["files", "status", "--json"];
        all.extend_from_slice(args);
        let out = keeper.keelctl(&all);
        assert!(out.status.success(), "{out:?}");
        serde_json::from_slice::<Value>(&out.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    };
    let behind = status(&["--behind"]);
    assert!(
        !behind.is_empty() && behind.iter().all(|r| r["agent_id"] == "fleet-9"),
        "{behind:#?}"
    );
    assert!(behind.iter().any(|r| r["name"] == "app/api.token"));
    let token = status(&["--name", "app/api.token"]);
    assert_eq!(token.len(), 10, "one row per host that was pushed the file: {token:#?}");

    // Back online: it gets its share without anyone asking.
    away.agent.start();
    eventually("fleet-9 got its files", || async {
        (std::fs::read(away.files.join("app/api.token")).ok()? == b"tok-2\n").then_some(())
    })
    .await;
    assert_eq!(std::fs::read(away.files.join("tls/bundle.pem")).unwrap(), big);
    eventually("nobody behind", || async {
        status(&["--behind"]).is_empty().then_some(())
    })
    .await;

    // The API refuses bad pushes, naming what is wrong.
    let part = "x".repeat((512 << 10) + 1);
    let (code, body) = api
        .post(
            "/api/v1/files/pushes",
            &json!({"agents": [{"agent": "fleet-0", "parts": [part], "files": []}]}),
        )
        .await;
    assert_eq!(code, 400);
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("part 1 is 524289 bytes; a part is at most 524288"),
        "{body}"
    );
    let (code, body) = api
        .post(
            "/api/v1/files/pushes",
            &json!({"agents": [{"agent": "nobody", "parts": ["{}"], "files": []}]}),
        )
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("agents: no agent nobody")),
        "{body}"
    );
    let (code, body) = api
        .post(
            "/api/v1/files/inventories",
            &json!({"agents": ["fleet-0"], "tag": "web"}),
        )
        .await;
    assert_eq!(
        (code, body["error"].as_str()),
        (400, Some("give exactly one of agents, tag or all"))
    );
    // The server holds ciphertext only: the secret is nowhere in its data.
    let secret = String::from_utf8_lossy(SECRET);
    for path in keel_tests::files_under(&server.data_dir()) {
        let bytes = std::fs::read(&path).unwrap_or_default();
        assert!(
            !contains(&bytes, secret.trim().as_bytes()),
            "{} holds the secret",
            path.display()
        );
    }
}
