//! A small client of the server's `/api/v1`: bearer token on every call, HTTPS
//! trusting only the configured Keel CA, answers as [`serde_json::Value`], and
//! refusals as [`ApiError`] carrying the server's own message.

use std::fmt;
use std::time::Duration;

use anyhow::Context;
use keel_common::secret::Secret;
use reqwest::{Method, RequestBuilder, StatusCode, Url};
use serde_json::Value;

use crate::config::{Settings, UsageError};

/// How long an ordinary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(60);

/// A refusal or failure the server answered, with its message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    /// The HTTP status.
    pub status: StatusCode,
    /// The server's `error`, or what it sent instead.
    pub message: String,
}

impl fmt::Display for ApiError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.status, self.message)
    }
}

impl std::error::Error for ApiError {}

/// The server did not answer: it could not be reached, TLS failed, or it timed out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Unreachable(pub String);

impl fmt::Display for Unreachable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Unreachable {}

/// A client of one server with one token.
#[derive(Debug, Clone)]
pub struct Client {
    http: reqwest::Client,
    base: Url,
    token: Secret,
    pinned: bool,
}

impl Client {
    /// A client for `settings`. A CA file that holds no usable certificate is a
    /// [`UsageError`].
    pub fn new(settings: &Settings) -> anyhow::Result<Self> {
        keel_common::tls::install_crypto_provider();
        let mut builder = reqwest::Client::builder()
            .user_agent(format!("keelctl/{}", keel_common::VERSION))
            .connect_timeout(Duration::from_secs(10));
        let mut pinned = false;
        if let Some((path, pem)) = settings.ca.as_ref().filter(|_| settings.server.scheme() == "https") {
            let tls = keel_common::tls::pinned_client(pem.as_bytes())
                .map_err(|e| UsageError(format!("the CA file {} is unusable: {e}", path.display())))?
                .with_no_client_auth();
            builder = builder.tls_backend_preconfigured(tls);
            pinned = true;
        }
        Ok(Self {
            http: builder.build().context("cannot set up the HTTP client")?,
            base: settings.server.clone(),
            token: settings.token.clone(),
            pinned,
        })
    }

    /// The URL of `/api/v1/<segments…>`, each segment percent-encoded.
    pub fn url(&self, segments: &[&str]) -> Url {
        let mut url = self.base.clone();
        url.set_query(None);
        url.set_fragment(None);
        if let Ok(mut path) = url.path_segments_mut() {
            path.pop_if_empty().extend(["api", "v1"]).extend(segments);
        }
        url
    }

    fn request(&self, method: Method, segments: &[&str], query: &[(&str, String)]) -> RequestBuilder {
        let req = self
            .http
            .request(method, self.url(segments))
            .bearer_auth(self.token.expose())
            .header(reqwest::header::ACCEPT, "application/json");
        if query.is_empty() { req } else { req.query(query) }
    }

    /// Sends a call and reads its JSON answer (`null` for none).
    async fn send(&self, req: RequestBuilder) -> anyhow::Result<Value> {
        Ok(self.send_paged(req).await?.0)
    }

    /// Sends a call; its JSON answer and the paging headers `X-Next-Cursor` and
    /// `X-Total-Count`.
    async fn send_paged(&self, req: RequestBuilder) -> anyhow::Result<(Value, Option<String>, Option<i64>)> {
        let resp = req.send().await.map_err(|e| self.unreachable(&e))?;
        let status = resp.status();
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let next = header("x-next-cursor");
        let total = header("x-total-count").and_then(|t| t.parse().ok());
        let text = resp.text().await.map_err(|e| self.unreachable(&e))?;
        if !status.is_success() {
            return Err(api_error(status, &text).into());
        }
        if text.trim().is_empty() {
            return Ok((Value::Null, next, total));
        }
        let value = serde_json::from_str(&text).map_err(|e| {
            anyhow::anyhow!(
                "the server answered {status} with something other than JSON ({e}): {}",
                crate::output::clip(text.trim(), 200)
            )
        })?;
        Ok((value, next, total))
    }

    /// A paged list, `GET /api/v1/<segments…>?<query>`, page after page until
    /// `max` items (all of them without): the items, and how many there are in all.
    pub async fn get_pages(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        max: Option<usize>,
    ) -> anyhow::Result<(Vec<Value>, Option<i64>)> {
        const PAGE: usize = 1000;
        let mut items = Vec::new();
        let mut cursor: Option<String> = None;
        loop {
            let want = max.map_or(PAGE, |m| (m - items.len()).min(PAGE));
            let mut q = query.to_vec();
            q.push(("limit", want.to_string()));
            if let Some(c) = &cursor {
                q.push(("cursor", c.clone()));
            }
            let (page, next, total) = self
                .send_paged(self.request(Method::GET, segments, &q).timeout(CALL_TIMEOUT))
                .await?;
            items.extend(page.as_array().cloned().unwrap_or_default());
            match next {
                Some(c) if max.is_none_or(|m| items.len() < m) => cursor = Some(c),
                _ => return Ok((items, total)),
            }
        }
    }

    fn unreachable(&self, e: &reqwest::Error) -> anyhow::Error {
        let chain = keel_common::error_chain(e);
        let mut message = if e.is_timeout() {
            format!("no answer from {} in time: {chain}", self.base)
        } else {
            format!("cannot reach {}: {chain}", self.base)
        };
        let tls_trouble = ["certificate", "UnknownIssuer", "handshake"]
            .iter()
            .any(|w| chain.contains(w));
        if tls_trouble && self.base.scheme() == "https" {
            message.push_str(if self.pinned {
                " (is the CA file the Keel CA of this server? It is <data_dir>/pki/ca.pem on the server)"
            } else {
                " (a Keel server's certificate comes from its own CA: give it with --ca-file, KEEL_CA_FILE \
                 or ca_file; it is <data_dir>/pki/ca.pem on the server)"
            });
        }
        Unreachable(message).into()
    }

    /// `GET /api/v1/<segments…>?<query>`.
    pub async fn get(&self, segments: &[&str], query: &[(&str, String)]) -> anyhow::Result<Value> {
        self.send(self.request(Method::GET, segments, query).timeout(CALL_TIMEOUT))
            .await
    }

    /// A call with an optional JSON body; the answer, `null` when there is none.
    pub async fn call(&self, method: Method, segments: &[&str], body: Option<&Value>) -> anyhow::Result<Value> {
        self.call_within(method, segments, body, CALL_TIMEOUT).await
    }

    /// [`Client::call`] for a call the server may take up to `limit` to answer.
    pub async fn call_within(
        &self,
        method: Method,
        segments: &[&str],
        body: Option<&Value>,
        limit: Duration,
    ) -> anyhow::Result<Value> {
        let mut req = self.request(method, segments, &[]).timeout(limit);
        if let Some(b) = body {
            req = req.json(b);
        }
        self.send(req).await
    }

    /// `POST /api/v1/<segments…>?<query>` with a streamed raw body and no overall
    /// time limit.
    pub async fn upload(
        &self,
        segments: &[&str],
        query: &[(&str, String)],
        body: reqwest::Body,
    ) -> anyhow::Result<Value> {
        let req = self
            .request(Method::POST, segments, query)
            .header(reqwest::header::CONTENT_TYPE, "application/octet-stream")
            .body(body);
        self.send(req).await
    }
}

/// The error of a refused call, from the server's `{"error": "…"}` or, failing
/// that, whatever text it sent.
pub fn api_error(status: StatusCode, body: &str) -> ApiError {
    let message = serde_json::from_str::<Value>(body)
        .ok()
        .and_then(|v| v.get("error").and_then(Value::as_str).map(str::to_owned))
        .unwrap_or_else(|| {
            let text = body.trim();
            if text.is_empty() {
                "the server gave no reason".to_owned()
            } else {
                crate::output::clip(text, 300)
            }
        });
    ApiError { status, message }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(server: &str) -> Client {
        let settings = Settings {
            server: Url::parse(server).unwrap(),
            token: Secret::new("t"),
            ca: None,
        };
        Client::new(&settings).unwrap()
    }

    #[test]
    fn a_ca_file_without_certificates_is_a_usage_error_naming_it() {
        let settings = Settings {
            server: Url::parse("https://keel.example:6752").unwrap(),
            token: Secret::new("t"),
            ca: Some(("/etc/keel/ca.pem".into(), "not a pem".into())),
        };
        let err = Client::new(&settings).expect_err("refused");
        let usage = err.downcast_ref::<UsageError>().expect("a usage error");
        assert_eq!(
            usage.0,
            "the CA file /etc/keel/ca.pem is unusable: no certificate in it"
        );
    }

    #[test]
    fn urls_encode_segments_and_keep_a_base_path() {
        let c = client("https://keel.example:6752");
        assert_eq!(
            c.url(&["agents", "a/b", "tags", "x y"]).as_str(),
            "https://keel.example:6752/api/v1/agents/a%2Fb/tags/x%20y"
        );
        let c = client("https://proxy.example/keel/");
        assert_eq!(c.url(&["tasks"]).as_str(), "https://proxy.example/keel/api/v1/tasks");
    }

    #[test]
    fn errors_carry_the_server_message() {
        let e = api_error(
            StatusCode::FORBIDDEN,
            r#"{"error":"this needs the operator role; token abc has viewer"}"#,
        );
        assert_eq!(
            e.to_string(),
            "403 Forbidden: this needs the operator role; token abc has viewer"
        );
        assert_eq!(
            api_error(StatusCode::BAD_GATEWAY, "").to_string(),
            "502 Bad Gateway: the server gave no reason"
        );
        assert_eq!(api_error(StatusCode::NOT_FOUND, "nope\n").message, "nope");
    }
}
