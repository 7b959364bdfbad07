//! The HTTP API: tokens, roles and bad input.

use keel_tests::{Agent, Api, Server, ServerOptions};
use serde_json::json;

#[tokio::test]
async fn every_api_call_needs_a_token_with_the_right_role() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "roles-1");
    agent.start();
    server.api().online("roles-1").await;
    let base = server.base_url();
    let task = json!({"data_type": 1051, "data": "{\"idc\":\"x\"}"});

    let (status, body) = Api::new(&base, "").get("/api/v1/agents").await;
    assert_eq!(status, 401, "{body}");
    assert!(body["error"].as_str().unwrap().contains("missing bearer token"));
    let (status, _) = Api::new(&base, "keel_a_wrong").get("/api/v1/agents").await;
    assert_eq!(status, 401);
    let (status, _) = Api::new(&base, "").get("/healthz").await;
    assert_eq!(status, 200, "/healthz needs no token");

    let viewer = Api::new(&base, &server.cli(&["token", "create", "--role", "viewer"]));
    assert_eq!(viewer.get("/api/v1/agents").await.0, 200);
    assert_eq!(viewer.get("/api/v1/agents/roles-1").await.0, 200);
    let (status, body) = viewer.post("/api/v1/agents/roles-1/tasks", &task).await;
    assert_eq!(status, 403, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("needs the operator role"),
        "{body}"
    );
    assert_eq!(viewer.post("/api/v1/agents/roles-1/revoke", &json!({})).await.0, 403);

    let operator = Api::new(&base, &server.cli(&["token", "create", "--role", "operator"]));
    assert_eq!(operator.post("/api/v1/agents/roles-1/tasks", &task).await.0, 202);
    assert_eq!(operator.post("/api/v1/agents/roles-1/revoke", &json!({})).await.0, 403);

    // A revoked token stops working.
    let listed = server.cli(&["token", "list"]);
    let viewer_id = listed
        .lines()
        .find(|l| l.contains(" viewer "))
        .and_then(|l| l.split_whitespace().next())
        .unwrap();
    server.cli(&["token", "revoke", viewer_id]);
    assert_eq!(viewer.get("/api/v1/agents").await.0, 401);
}

#[tokio::test]
async fn bad_task_requests_get_precise_errors() {
    let server = Server::start(ServerOptions::default()).await;
    let mut agent = Agent::enrolled(&server, "bad-1");
    let api = server.api();

    let (status, body) = api
        .post("/api/v1/agents/nobody/tasks", &json!({"data_type": 1051}))
        .await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(body["error"], "no agent nobody");
    let (status, body) = api
        .post("/api/v1/agents/bad-1/tasks", &json!({"data_type": 1051}))
        .await;
    assert_eq!(status, 409, "an offline agent: {body}");
    assert_eq!(body["error"], "agent bad-1 is offline");

    agent.start();
    api.online("bad-1").await;
    let (status, body) = api.post_raw("/api/v1/agents/bad-1/tasks", "{\"data_type\": ").await;
    assert_eq!(status, 400);
    assert!(
        body["error"].as_str().unwrap().starts_with("invalid request body"),
        "{body}"
    );
    let (status, body) = api
        .post("/api/v1/agents/bad-1/tasks", &json!({"data_type": "1051"}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("data_type"), "{body}");
    let (status, body) = api
        .post("/api/v1/agents/bad-1/tasks", &json!({"data_type": 1, "colour": 2}))
        .await;
    assert_eq!(status, 400);
    assert!(body["error"].as_str().unwrap().contains("colour"), "{body}");
    let (status, body) = api.get("/api/v1/tasks/no-such-token").await;
    assert_eq!(status, 404, "{body}");
}

#[tokio::test]
async fn every_error_is_json_that_names_what_was_wrong() {
    let server = Server::start(ServerOptions::default()).await;
    let api = server.api();
    let error = |body: &serde_json::Value| body["error"].as_str().map(str::to_owned).unwrap_or_default();

    let (status, body) = api.get("/api/v1/agents/%FF%FE").await;
    assert_eq!(status, 400, "a path ID that is not UTF-8: {body}");
    assert!(error(&body).contains("UTF-8"), "{body}");
    let (status, body) = api.get("/api/v1/no-such-thing").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error(&body), "not found: GET /api/v1/no-such-thing");
    let (status, body) = Api::new(&server.base_url(), "").get("/no-such-page").await;
    assert_eq!(status, 404, "{body}");
    assert_eq!(error(&body), "not found: GET /no-such-page");
    let (status, body) = api.post("/healthz", &json!({})).await;
    assert_eq!(status, 405, "{body}");
    assert_eq!(error(&body), "method not allowed: POST /healthz");
    // What handlers answer themselves is left as it was.
    let (status, body) = api.get("/api/v1/tasks/no-such-token").await;
    assert_eq!(status, 404, "{body}");
    assert!(error(&body).contains("no-such-token"), "{body}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_list_comes_in_pages_with_a_count_and_a_cursor() {
    let server = Server::start(ServerOptions::default()).await;
    let inflight = std::sync::Arc::new(keel_tests::InFlight::default());
    let mut sims = Vec::new();
    for id in ["page-a", "page-b", "page-c"] {
        let sim = keel_tests::SimAgent::start(&server, id, keel_tests::SimBehavior::default(), inflight.clone()).await;
        sims.push(sim);
    }
    let api = server.api();
    keel_tests::eventually("three agents online", || async {
        let (_, total, _, _) = api.get_page("/api/v1/agents?online=true").await;
        (total == Some(3)).then_some(())
    })
    .await;
    let (status, total, next, page) = api.get_page("/api/v1/agents?online=true&limit=2").await;
    assert_eq!(status, 200, "{page}");
    let ids: Vec<&str> = page
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        (ids, total, next.as_deref()),
        (vec!["page-a", "page-b"], Some(3), Some("page-b"))
    );
    let link = api
        .client()
        .get(format!("{}/api/v1/agents?online=true&limit=2", server.base_url()))
        .bearer_auth(&server.admin_token)
        .send()
        .await
        .unwrap()
        .headers()
        .get("link")
        .map(|v| v.to_str().unwrap().to_owned());
    assert_eq!(
        link.as_deref(),
        Some("</api/v1/agents?online=true&limit=2&cursor=page-b>; rel=\"next\"")
    );
    let (_, total, next, page) = api.get_page("/api/v1/agents?online=true&limit=2&cursor=page-b").await;
    assert_eq!(page.as_array().unwrap().len(), 1, "{page}");
    assert_eq!(page[0]["id"], "page-c");
    assert_eq!((total, next), (Some(3), None), "the last page has no cursor");
    let (_, total, _, page) = api.get_page("/api/v1/agents?hostname=RAW-CLIENT&limit=1").await;
    assert_eq!(
        (total, page.as_array().unwrap().len()),
        (Some(3), 1),
        "host names match ignoring case"
    );
    for (query, want) in [
        ("limit=0", "limit must be 1 to 1000, not 0"),
        ("limit=1001", "limit must be 1 to 1000, not 1001"),
        ("limit=many", "invalid query"),
        ("page=2", "unknown field"),
    ] {
        let (status, body) = api.get(&format!("/api/v1/agents?{query}")).await;
        assert_eq!(status, 400, "{query}: {body}");
        assert!(body["error"].as_str().unwrap().contains(want), "{query}: {body}");
    }
}
