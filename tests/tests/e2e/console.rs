//! The web console in a real headless Chromium, driven over WebDriver
//! (chromedriver): sign in, see agents, components, policies and tasks, start
//! an upgrade of a plugin that rolls out to a real agent, and every page (an
//! agent's, certificates, files, audit) with what real hosts put there, each
//! saved as a screenshot under `target/console-screenshots/`.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fantoccini::{Client, ClientBuilder, Locator};
use keel_tests::{Agent, Server, ServerOptions, eventually, eventually_within};
use serde_json::{Value, json};

const AGENT: &str = "console-1";

/// chromedriver and a headless Chromium with a profile of its own.
struct Browser {
    driver: Child,
    client: Client,
    _profile: tempfile::TempDir,
}

impl Browser {
    async fn start() -> Browser {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let driver = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("chromedriver (Debian's chromium-driver; .ci/run installs it)");
        let url = format!("http://127.0.0.1:{port}");
        let status = format!("{url}/status");
        eventually("chromedriver to answer", || async {
            let r = reqwest::get(&status).await.ok()?;
            r.status().is_success().then_some(())
        })
        .await;
        let profile = tempfile::tempdir().unwrap();
        let caps = json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                         "--disable-background-networking", "--disable-component-update", "--disable-sync",
                         "--disable-dev-shm-usage", format!("--user-data-dir={}", profile.path().display())]
            }
        });
        let caps = caps.as_object().unwrap().clone().into_iter().collect();
        let connector = hyper_util::client::legacy::connect::HttpConnector::new();
        let client = ClientBuilder::new(connector)
            .capabilities(caps)
            .connect(&url)
            .await
            .expect("a WebDriver session with Chromium");
        client.set_window_size(1400, 1000).await.expect("a window size");
        Browser {
            driver,
            client,
            _profile: profile,
        }
    }

    /// The text of the first element matching `css`, once there is one.
    async fn text(&self, css: &str) -> String {
        let el = self
            .client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"));
        el.text().await.unwrap()
    }

    /// Waits until the text of `css` satisfies `ok`; returns it.
    async fn text_until(&self, css: &str, what: &str, ok: impl Fn(&str) -> bool) -> String {
        eventually_within(Duration::from_secs(60), what, || async {
            let el = self.client.find(Locator::Css(css)).await.ok()?;
            let t = el.text().await.ok()?;
            ok(&t).then_some(t)
        })
        .await
    }

    async fn click(&self, css: &str) {
        self.client
            .wait()
            .at_most(Duration::from_secs(20))
            .for_element(Locator::Css(css))
            .await
            .unwrap_or_else(|e| panic!("{css}: {e}"))
            .click()
            .await
            .unwrap();
    }

    async fn type_into(&self, css: &str, text: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.clear().await.unwrap();
        el.send_keys(text).await.unwrap();
    }

    async fn select(&self, css: &str, value: &str) {
        let el = self.client.find(Locator::Css(css)).await.unwrap();
        el.select_by_value(value).await.unwrap();
    }

    async fn stop(mut self) {
        let _ = self.client.clone().close().await;
        let _ = self.driver.kill();
        let _ = self.driver.wait();
    }
}

async fn upload(server: &Server, name: &str, version: &str) {
    // Each version its own bytes: the store is content-addressed.
    let mut bytes = keel_tests::test_plugin();
    bytes.extend_from_slice(format!("\0{name} {version}").as_bytes());
    let (status, body) = server.upload(name, version, "exec", bytes).await;
    assert_eq!(status, 201, "{body}");
}

async fn plugin_version(server: &Server, name: &str) -> Option<String> {
    let a = server.api().agent(AGENT).await?;
    a["plugins"]
        .as_array()?
        .iter()
        .find(|p| p["name"] == name && p["state"] == "running")
        .and_then(|p| p["version"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_signs_in_sees_the_fleet_and_rolls_out_an_upgrade() {
    let server = Server::start(ServerOptions {
        release_key: true,
        ..ServerOptions::default()
    })
    .await;
    let mut agent = Agent::enrolled(&server, AGENT);
    agent.start();
    let api = server.api();
    api.online(AGENT).await;
    upload(&server, "echo", "1").await;
    upload(&server, "echo", "2").await;
    let (status, body) = api
        .post(
            "/api/v1/policies",
            &json!({"name": "echo", "component": "echo", "version": "1", "target": {"agents": [AGENT]}}),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (_, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": {"agents": [AGENT]}}),
        )
        .await;
    api.task_in_state(task["id"].as_str().unwrap(), "succeeded", Duration::from_secs(60))
        .await;
    eventually("echo 1 running", || async {
        (plugin_version(&server, "echo").await.as_deref() == Some("1")).then_some(())
    })
    .await;
    // A result an agent controls, with markup in it.
    let (_, t) = api
        .post(
            &format!("/api/v1/agents/{AGENT}/tasks"),
            &json!({"data_type": 6100, "object_name": "echo", "data": "<img src=x onerror=\"window.pwned=1\">"}),
        )
        .await;
    let token = t["token"].as_str().unwrap().to_owned();

    let b = Browser::start().await;
    b.client.goto(&server.base_url()).await.unwrap();

    // A wrong token is refused, and nothing is shown.
    b.type_into("#token", "not-a-token").await;
    b.click("#login-form button").await;
    let error = b.text_until("#error", "the refusal", |t| !t.is_empty()).await;
    assert!(error.starts_with("401"), "{error}");
    assert!(b.client.find(Locator::Css("#agents-table tbody tr")).await.is_err());

    // Signed in: the agents.
    b.type_into("#token", &server.admin_token).await;
    b.click("#login-form button").await;
    let row = b
        .text_until("#agents-table tbody tr", "the agent's row", |t| t.contains(AGENT))
        .await;
    assert!(row.contains("online") && row.contains("echo 1 (running)"), "{row}");

    // Components and versions, policies.
    b.click("a[data-tab=components]").await;
    let components = b
        .text_until("#components-table tbody", "the components", |t| t.contains("echo"))
        .await;
    assert!(
        components.contains("echo 2") && components.contains("echo 1"),
        "{components}"
    );
    screenshot(&b, "components").await;
    b.click("a[data-tab=policies]").await;
    let policies = b
        .text_until("#policies-table tbody", "the policies", |t| t.contains("echo"))
        .await;
    assert!(policies.contains(&format!("agents {AGENT}")), "{policies}");
    screenshot(&b, "policies").await;

    // The plugin task's result is shown as text; its markup never runs.
    b.client
        .goto(&format!("{}/#tasks/{token}", server.base_url()))
        .await
        .unwrap();
    let result = b
        .text_until("#subtasks-table tbody", "the echoed result", |t| t.contains("onerror"))
        .await;
    assert!(result.contains("<img src=x onerror=\"window.pwned=1\">"), "{result}");
    let pwned = b
        .client
        .execute("return window.pwned === undefined;", vec![])
        .await
        .unwrap();
    assert_eq!(pwned, Value::Bool(true), "markup from an agent ran in the console");

    // Start an upgrade: echo 2 to this agent, through the existing policy.
    b.click("a[data-tab=upgrade]").await;
    b.text_until("#up-component", "the component list", |t| t.contains("echo"))
        .await;
    b.select("#up-component", "echo").await;
    b.select("#up-version", "2").await;
    b.select("#up-target-kind", "agents").await;
    b.type_into("#up-target", AGENT).await;
    b.type_into("#up-batch", "10").await;
    screenshot(&b, "upgrade").await;
    b.click("#upgrade-form button[type=submit]").await;
    let state = b
        .text_until("#task-state", "the rollout to succeed", |t| {
            t == "succeeded" || t == "failed"
        })
        .await;
    assert_eq!(state, "succeeded", "{}", b.text("#task-detail").await);
    assert!(b.text("#task-counts").await.starts_with("1 succeeded"));
    eventually("echo 2 running on the agent", || async {
        (plugin_version(&server, "echo").await.as_deref() == Some("2")).then_some(())
    })
    .await;
    let (_, p) = api.get("/api/v1/policies").await;
    assert_eq!(p[0]["version"], "2", "{p}");

    // Signing out forgets the token.
    b.click("#signout").await;
    let stored = b
        .client
        .execute("return sessionStorage.getItem('keel-token');", vec![])
        .await
        .unwrap();
    assert_eq!(stored, Value::Null);
    b.stop().await;
}

#[tokio::test]
async fn the_console_is_served_with_a_strict_policy() {
    let server = Server::start(ServerOptions::default()).await;
    let client = reqwest::Client::new();
    for (path, kind) in [
        ("/", "text/html"),
        ("/console/console.js", "text/javascript"),
        ("/console/console.css", "text/css"),
    ] {
        let r = client.get(format!("{}{path}", server.base_url())).send().await.unwrap();
        assert_eq!(r.status(), 200, "{path}");
        let h = r.headers();
        assert!(h["content-type"].to_str().unwrap().starts_with(kind), "{path}: {h:?}");
        let csp = h["content-security-policy"].to_str().unwrap();
        assert!(
            csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
            "{csp}"
        );
        assert!(!csp.contains("unsafe-inline"), "{csp}");
        assert_eq!(h["x-content-type-options"], "nosniff");
    }
    let page = client
        .get(server.base_url())
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        !page.contains("<script>") && !page.contains(" style="),
        "no inline script or style"
    );
    let r = client
        .get(format!("{}/console/../api/v1/agents", server.base_url()))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 401, "the API still wants a token");
}

#[tokio::test]
async fn the_agent_list_pages_through_the_fleet() {
    let server = Server::start(ServerOptions::default()).await;
    // 230 agents: three pages of 100, 100 and 30, in ID order.
    const N: usize = 230;
    let inflight = std::sync::Arc::new(keel_tests::InFlight::default());
    let mut sims = Vec::new();
    for i in 0..N {
        sims.push(
            keel_tests::SimAgent::start(
                &server,
                &format!("page-{i:03}"),
                keel_tests::SimBehavior::default(),
                std::sync::Arc::clone(&inflight),
            )
            .await,
        );
    }
    let b = Browser::start().await;
    b.client.goto(&server.base_url()).await.unwrap();
    b.type_into("#token", &server.admin_token).await;
    b.click("#login-form button").await;
    let first_row = |id: &'static str| move |t: &str| t.starts_with(id);
    b.text_until("#agents-table tbody tr", "the first page", first_row("page-000"))
        .await;
    assert_eq!(b.text("#agents-count").await, format!("({N})"));
    assert_eq!(b.text("#agents-range").await, format!("1\u{2013}100 of {N}"));
    let rows = b.client.find_all(Locator::Css("#agents-table tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 100);

    b.click("#agents-next").await;
    b.text_until("#agents-table tbody tr", "the second page", first_row("page-100"))
        .await;
    assert_eq!(b.text("#agents-range").await, format!("101\u{2013}200 of {N}"));

    b.click("#agents-next").await;
    b.text_until("#agents-table tbody tr", "the last page", first_row("page-200"))
        .await;
    assert_eq!(b.text("#agents-range").await, format!("201\u{2013}230 of {N}"));
    let rows = b.client.find_all(Locator::Css("#agents-table tbody tr")).await.unwrap();
    assert_eq!(rows.len(), 30);
    let next = b.client.find(Locator::Id("agents-next")).await.unwrap();
    assert_eq!(
        next.attr("disabled").await.unwrap().as_deref(),
        Some("true"),
        "no page after the last"
    );

    b.click("#agents-first").await;
    b.text_until("#agents-table tbody tr", "the first page again", first_row("page-000"))
        .await;
    assert_eq!(b.text("#agents-range").await, format!("1\u{2013}100 of {N}"));
    b.stop().await;
    drop(sims);
}

/// Saves what the browser shows as `target/console-screenshots/<name>.png`, kept
/// by CI as an artifact.
async fn screenshot(b: &Browser, name: &str) {
    let png = b.client.screenshot().await.expect("a screenshot");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/console-screenshots");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join(format!("{name}.png")), png).unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_page_shows_what_the_fleet_holds() {
    use keel_tests::filedelivery::{FileHost, Keeper};
    use keel_tests::proxy::{ProxyHost, TlsTarget};

    let server = Server::start(ServerOptions::default()).await;
    let api = server.api();
    // A host with a secret file, and one whose proxy scanned a self-signed target.
    let keeper = Keeper::new(&server);
    let files = FileHost::start(&server, "console-files", &keeper.public, "", &["web"]).await;
    let secret = files.conf.path().join("db.conf");
    std::fs::write(&secret, "password = hunter2\n").unwrap();
    let (code, rows) = keeper.push(
        &["--agent", "console-files", "--trust-new-hosts"],
        &[],
        &[format!("db.conf={}", secret.display())],
    );
    assert_eq!(code, Some(0), "{rows:?}");
    let target = TlsTarget::start("console.internal.test").await;
    let _proxy = ProxyHost::start(&server, "console-proxy", &[format!("127.0.0.1/32:{}", target.port)]).await;
    let (status, body) = api
        .post(
            "/api/v1/scans",
            &json!({"agent": "console-proxy", "targets": [format!("127.0.0.1:{}", target.port)]}),
        )
        .await;
    assert_eq!(status, 200, "{body}");

    // A rollout to both, one agent per batch.
    let (status, task) = api
        .post(
            "/api/v1/tasks",
            &json!({"kind": "sync-config", "target": "all", "batch_size": 1, "failure_threshold": 0.5}),
        )
        .await;
    assert_eq!(status, 201, "{task}");
    let task_id = task["id"].as_str().unwrap().to_owned();
    api.task_in_state(&task_id, "succeeded", Duration::from_secs(60)).await;

    let b = Browser::start().await;
    b.client.goto(&server.base_url()).await.unwrap();
    b.type_into("#token", &server.admin_token).await;
    b.click("#login-form button").await;
    b.text_until("#agents-count", "both agents", |t| t == "(2)").await;

    // Search by tag narrows the list to the file host; its row opens its page.
    b.type_into("#af-q", "WEB").await;
    b.click("#agents-filter button").await;
    b.text_until("#agents-count", "the search", |t| t == "(1)").await;
    screenshot(&b, "agents").await;
    b.click("#agents-table tbody tr").await;
    let facts = b
        .text_until("#ag-facts", "the agent's facts", |t| t.contains("Kernel"))
        .await;
    let addresses = facts.lines().skip_while(|l| *l != "Addresses").nth(1);
    assert!(
        addresses.is_some_and(|a| a != "-" && !a.is_empty()),
        "the host's addresses: {facts}"
    );
    assert_eq!(b.text("#ag-id").await, "console-files");
    let plugins = b
        .text_until("#ag-plugins tbody", "its plugins", |t| t.contains("file-delivery"))
        .await;
    assert!(plugins.contains("running"), "{plugins}");
    let tasks = b
        .text_until("#ag-tasks tbody", "its tasks", |t| t.contains("file-delivery"))
        .await;
    assert!(tasks.contains("succeeded"), "{tasks}");
    assert!(b.text("#ag-sessions tbody").await.contains("open"));
    assert!(b.text("#ag-cert").await.starts_with("serial "));
    // The first heartbeat is a sample: each chart draws it.
    let drawn = b
        .client
        .execute(
            "return ['cpu','rss','records','spool'].map(k => document.querySelectorAll('#chart-' + k + ' svg circle').length);",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(drawn, json!([1, 1, 1, 1]), "one sample in each chart");
    // Tags are edited in place.
    b.type_into("#ag-tags", "web, edge").await;
    b.click("#ag-tags-form button").await;
    eventually("the tags saved", || async {
        let a = api.agent("console-files").await?;
        (a["tags"] == json!(["edge", "web"])).then_some(())
    })
    .await;
    screenshot(&b, "agent").await;

    // Certificates: the self-signed target, on the timeline, with its chain.
    b.click("a[data-tab=certificates]").await;
    b.text_until("#certs-count", "the inventory", |t| t == "(1)").await;
    let row = b.text("#certs-table tbody tr").await;
    assert!(
        row.contains("console-proxy") && row.contains("high: untrusted_root"),
        "{row}"
    );
    let dots = b
        .client
        .execute(
            "return document.querySelectorAll('#certs-timeline circle').length;",
            vec![],
        )
        .await
        .unwrap();
    assert_eq!(dots, json!(1));
    b.select("#cf-severity", "critical").await;
    b.click("#certs-filter button").await;
    b.text_until("#certs-count", "no critical findings", |t| t == "(0)")
        .await;
    b.select("#cf-severity", "").await;
    b.click("#certs-filter button").await;
    b.text_until("#certs-count", "the inventory again", |t| t == "(1)")
        .await;
    // The findings present are offered as a filter, together with the
    // severity: self-signed is a medium finding here.
    b.select("#cf-code", "self_signed").await;
    b.select("#cf-severity", "high").await;
    b.click("#certs-filter button").await;
    b.text_until("#certs-count", "no high self-signed finding", |t| t == "(0)")
        .await;
    b.select("#cf-severity", "medium").await;
    b.click("#certs-filter button").await;
    b.text_until("#certs-count", "the self-signed one", |t| t == "(1)")
        .await;
    let row = b.text("#certs-table tbody tr").await;
    assert!(row.contains("console-proxy"), "{row}");
    b.click("#certs-table tbody tr").await;
    let chain = b
        .text_until("#cd-chain tbody", "the chain", |t| t.contains("console.internal.test"))
        .await;
    assert!(chain.contains("CN=console.internal.test"), "{chain}");
    screenshot(&b, "certificates").await;

    // Files: the host holds version 1 of db.conf.
    b.click("a[data-tab=files]").await;
    let files_row = b
        .text_until("#files-table tbody", "the file status", |t| t.contains("db.conf"))
        .await;
    assert!(
        files_row.contains("console-files") && files_row.contains("current"),
        "{files_row}"
    );
    b.click("#ff-behind").await;
    b.click("#files-filter button").await;
    b.text_until("#files-count", "nobody behind", |t| t == "(0)").await;
    screenshot(&b, "files").await;

    // Audit: the tag changes, filtered by target.
    b.click("a[data-tab=audit]").await;
    b.text_until("#audit-table tbody", "the audit log", |t| t.contains("/tags"))
        .await;
    b.type_into("#au-target", "console-files/tags").await;
    b.click("#audit-filter button").await;
    // Set when the host started, and edited above.
    b.text_until("#audit-count", "two tag changes", |t| t == "(2)").await;
    assert!(b.text("#audit-table tbody").await.contains("PUT"));
    screenshot(&b, "audit").await;

    // The rollout: a batch per agent, each succeeded, and its threshold.
    b.client
        .goto(&format!("{}/#tasks/{task_id}", server.base_url()))
        .await
        .unwrap();
    b.text_until("#task-state", "the rollout", |t| t == "succeeded").await;
    let batches = b
        .client
        .find_all(Locator::Css("#batches-table tbody tr"))
        .await
        .unwrap();
    assert_eq!(batches.len(), 2);
    for (i, row) in batches.iter().enumerate() {
        assert_eq!(row.text().await.unwrap(), format!("{} 1 1 0 0 0 0", i + 1));
    }
    let threshold = b.text("#task-threshold").await;
    assert!(
        threshold.contains("Batches of 1") && threshold.contains("50 %"),
        "{threshold}"
    );
    screenshot(&b, "tasks").await;
    b.stop().await;
}
