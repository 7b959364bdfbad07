//! [`Api`]: a JSON client of a server's `/api/v1`.

use std::time::Duration;

use serde_json::Value;

use crate::{eventually, eventually_within};

/// A JSON API client.
#[derive(Debug, Clone)]
pub struct Api {
    pub(crate) client: reqwest::Client,
    pub(crate) base: String,
    pub(crate) token: String,
}

impl Api {
    /// A client for `base` with a bearer `token` (empty: none).
    pub fn new(base: &str, token: &str) -> Self {
        keel_common::tls::install_crypto_provider();
        Self {
            client: reqwest::Client::new(),
            base: base.to_owned(),
            token: token.to_owned(),
        }
    }

    pub(crate) async fn send(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        let (status, _, text) = self.send_raw(req).await;
        (status, serde_json::from_str(&text).unwrap_or(Value::String(text)))
    }

    /// Sends `req` (with the token, if any) and returns the status, the content
    /// type and the body as text.
    pub async fn send_raw(&self, req: reqwest::RequestBuilder) -> (u16, String, String) {
        let req = if self.token.is_empty() {
            req
        } else {
            req.bearer_auth(&self.token)
        };
        let resp = req.send().await.expect("HTTP request");
        let status = resp.status().as_u16();
        let kind = resp
            .headers()
            .get(reqwest::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        (status, kind, resp.text().await.unwrap_or_default())
    }

    /// The underlying client, to build unusual requests.
    pub fn client(&self) -> &reqwest::Client {
        &self.client
    }

    /// Sends a request built with [`Api::client`], with the token.
    pub async fn send_request(&self, req: reqwest::RequestBuilder) -> (u16, Value) {
        self.send(req).await
    }

    /// PUT `path` without a body.
    pub async fn put(&self, path: &str) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base))).await
    }

    /// PUT JSON `body` to `path`.
    pub async fn put_json(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.client.put(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// DELETE `path`.
    pub async fn send_delete(&self, path: &str) -> (u16, Value) {
        self.send(self.client.delete(format!("{}{path}", self.base))).await
    }

    /// GET `path`.
    pub async fn get(&self, path: &str) -> (u16, Value) {
        self.send(self.client.get(format!("{}{path}", self.base))).await
    }

    /// POST JSON `body` to `path`.
    pub async fn post(&self, path: &str, body: &Value) -> (u16, Value) {
        self.send(self.client.post(format!("{}{path}", self.base)).json(body))
            .await
    }

    /// POST raw text as JSON to `path`.
    pub async fn post_raw(&self, path: &str, body: &str) -> (u16, Value) {
        let req = self
            .client
            .post(format!("{}{path}", self.base))
            .header("content-type", "application/json");
        self.send(req.body(body.to_owned())).await
    }

    /// GET `path`: the status, the `X-Total-Count` and `X-Next-Cursor` headers,
    /// and the body.
    pub async fn get_page(&self, path: &str) -> (u16, Option<i64>, Option<String>, Value) {
        let resp = self
            .client
            .get(format!("{}{path}", self.base))
            .bearer_auth(&self.token)
            .send()
            .await
            .expect("HTTP request");
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let total = header("x-total-count").and_then(|t| t.parse().ok());
        let next = header("x-next-cursor");
        let status = resp.status().as_u16();
        let text = resp.text().await.unwrap_or_default();
        (
            status,
            total,
            next,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    /// Every agent, page after page.
    pub async fn agents(&self) -> Vec<Value> {
        let mut out = Vec::new();
        let mut path = "/api/v1/agents?limit=1000".to_owned();
        loop {
            let (status, _, next, body) = self.get_page(&path).await;
            assert_eq!(status, 200, "GET {path}: {body}");
            out.extend(body.as_array().cloned().unwrap_or_default());
            match next {
                Some(cursor) => path = format!("/api/v1/agents?limit=1000&cursor={cursor}"),
                None => return out,
            }
        }
    }

    /// One agent, if registered.
    pub async fn agent(&self, id: &str) -> Option<Value> {
        let (status, body) = self.get(&format!("/api/v1/agents/{id}")).await;
        (status == 200).then_some(body)
    }

    /// Waits up to `deadline` for task `id` to reach state `want`, and returns it.
    pub async fn task_in_state(&self, id: &str, want: &str, deadline: Duration) -> Value {
        eventually_within(deadline, &format!("task {id} to be {want}"), || async {
            let (_, t) = self.get(&format!("/api/v1/tasks/{id}")).await;
            (t["state"] == want).then_some(t)
        })
        .await
    }

    /// Waits until the agent is online with a heartbeat, and returns it.
    pub async fn online(&self, id: &str) -> Value {
        eventually(&format!("agent {id} online with a heartbeat"), || async {
            self.agent(id)
                .await
                .filter(|a| a["online"] == true && !a["last_heartbeat"].is_null())
        })
        .await
    }
}
