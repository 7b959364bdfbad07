//! The HTTP API's JSON bodies, through the real router: a server state on a
//! temporary SQLite registry (with a CA, an admin token, one enrolled agent, one
//! package and one policy), and each input sent as the body of one of the calls
//! that take JSON. Whatever the body, the answer is never a 5xx, and every 4xx is
//! the JSON `{"error": "..."}` the API promises.
#![no_main]

use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};

use axum::Router;
use axum::body::Body;
use axum::extract::ConnectInfo;
use axum::http::{Method, Request, StatusCode, header};
use keel_server::config::{Overrides, ServerConfig};
use keel_server::state::ServerState;
use keel_server::store::{PackageRow, Role};
use libfuzzer_sys::fuzz_target;
use tower::ServiceExt;

const AGENT: &str = "fuzz-agent-1";
const PLUGIN: &str = "fuzz-plugin";

struct Server {
    rt: tokio::runtime::Runtime,
    router: Router,
    admin: String,
    _dir: tempfile::TempDir,
    _state: Arc<ServerState>,
}

/// (method, path) of every call whose body is JSON. `/enroll*` need no token.
const CALLS: &[(Method, &str)] = &[
    (Method::POST, "/api/v1/tasks"),
    (Method::POST, "/api/v1/policies"),
    (Method::PUT, "/api/v1/policies/base"),
    (Method::POST, "/api/v1/tokens"),
    (Method::PUT, "/api/v1/agents/fuzz-agent-1/tags"),
    (Method::POST, "/api/v1/agents/fuzz-agent-1/tasks"),
    (Method::PUT, "/api/v1/agents/fuzz-agent-1/plugins"),
    (Method::POST, "/api/v1/scans"),
    (Method::POST, "/enroll"),
    (Method::POST, "/enroll/key"),
];

fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| {
        // tmpfs where there is one: the registry's fsyncs cost nothing there.
        let shm = std::path::Path::new("/dev/shm");
        let dir = if shm.is_dir() {
            tempfile::tempdir_in(shm)
        } else {
            tempfile::tempdir()
        }
        .expect("a temporary directory");
        let toml = dir.path().join("server.toml");
        let data = dir.path().join("server");
        std::fs::write(
            &toml,
            format!(
                "data_dir = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\ntls = false\n",
                data.display().to_string()
            ),
        )
        .expect("write server.toml");
        let config = ServerConfig::load(Some(&toml), &Overrides::default()).expect("the fuzz server's configuration");
        keel_server::admin::ca_init(&config, &[]).expect("ca init");
        keel_server::admin::release_key(&config).expect("release key");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a tokio runtime");
        let (state, admin) = rt.block_on(async {
            let state = keel_server::serve::open_state(config)
                .await
                .expect("open the server state");
            state.reload_policies().await.expect("load policies");
            let admin = state
                .store
                .create_api_token(Role::Admin, None, "fuzz admin")
                .await
                .expect("an admin token");
            let now = keel_common_now();
            state
                .store
                .agent_enrolled(AGENT, "fuzz-host", now)
                .await
                .expect("an agent");
            for version in ["1.0.0", "2.0.0"] {
                state
                    .store
                    .package_add(&PackageRow {
                        name: PLUGIN.into(),
                        version: version.into(),
                        arch: "any".into(),
                        kind: "exec".into(),
                        sha256: "ab".repeat(32),
                        signature: "cd".repeat(64),
                        size: 1,
                        created_at: now,
                        created_by: "fuzz".into(),
                    })
                    .await
                    .expect("a package");
            }
            (state, admin.secret.expose().to_owned())
        });
        let router = keel_server::http::router(Arc::clone(&state));
        let server = Server {
            rt,
            router,
            admin,
            _dir: dir,
            _state: state,
        };
        let base = br#"{"name":"base","component":"fuzz-plugin","version":"1.0.0","target":{"tags":["web"]}}"#;
        let (status, body) = server.call(&Method::POST, "/api/v1/policies", base, true);
        assert_eq!(
            status,
            StatusCode::CREATED,
            "creating the base policy: {}",
            String::from_utf8_lossy(&body)
        );
        server
    })
}

fn keel_common_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl Server {
    fn call(&self, method: &Method, path: &str, body: &[u8], json: bool) -> (StatusCode, Vec<u8>) {
        let mut req = Request::builder()
            .method(method.clone())
            .uri(path)
            .header(header::AUTHORIZATION, format!("Bearer {}", self.admin));
        if json {
            req = req.header(header::CONTENT_TYPE, "application/json");
        }
        let mut req = req.body(Body::from(body.to_vec())).expect("a request");
        // What axum's `into_make_service_with_connect_info` adds for a real connection.
        req.extensions_mut()
            .insert(ConnectInfo(SocketAddr::from(([127, 0, 0, 1], 40000))));
        self.rt.block_on(async {
            let resp = self
                .router
                .clone()
                .oneshot(req)
                .await
                .expect("the router is infallible");
            let status = resp.status();
            let content_type = resp.headers().get(header::CONTENT_TYPE).cloned();
            let bytes = axum::body::to_bytes(resp.into_body(), 16 << 20)
                .await
                .expect("a response body");
            if status.is_client_error() || status.is_server_error() {
                assert!(
                    content_type.is_some_and(|v| v.as_bytes().starts_with(b"application/json")),
                    "{method} {path} answered {status} without a JSON body"
                );
                let v: serde_json::Value = serde_json::from_slice(&bytes).expect("an error body is JSON");
                assert!(v["error"].is_string(), "{method} {path} answered {status} with {v}");
            }
            (status, bytes.to_vec())
        })
    }
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, body)) = data.split_first() else {
        return;
    };
    let server = server();
    let (method, path) = &CALLS[usize::from(pick & 0x0f) % CALLS.len()];
    // Mostly JSON, sometimes without the Content-Type a JSON body needs.
    let json = pick & 0x30 != 0x30;
    let (status, answer) = server.call(method, path, body, json);
    assert!(
        !status.is_server_error(),
        "{method} {path} answered {status}: {}",
        String::from_utf8_lossy(&answer)
    );
});
