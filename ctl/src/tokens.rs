//! `keelctl tokens …`: API tokens with roles, and enrollment tokens (admin only).
//! A new token's secret goes to stdout, alone, so scripts can capture it; its ID
//! goes to stderr.

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::Ctx;
use crate::cli::TokensCmd;
use crate::output::{self, get};

/// Runs a `tokens` command.
pub async fn run(ctx: &Ctx, cmd: TokensCmd) -> anyhow::Result<()> {
    match cmd {
        TokensCmd::Create {
            role,
            ttl,
            uses,
            description,
        } => {
            let mut body = Map::new();
            body.insert("role".into(), json!(role.as_str()));
            if let Some(t) = ttl {
                body.insert("ttl_secs".into(), json!(t));
            }
            if let Some(u) = uses {
                body.insert("uses".into(), json!(u));
            }
            body.insert("description".into(), json!(description.unwrap_or_default()));
            let v = ctx
                .client
                .call(Method::POST, &["tokens"], Some(&Value::Object(body)))
                .await?;
            if ctx.json {
                return output::json(&v);
            }
            let Some(secret) = v["secret"].as_str() else {
                anyhow::bail!("the server's answer has no secret");
            };
            let expires = v["expires_at"]
                .as_str()
                .map_or_else(String::new, |e| format!(", expires {e}"));
            eprintln!("created {} token {}{expires}", role.as_str(), get(&v, "id"));
            output::line(secret)
        }
        TokensCmd::List => {
            let v = ctx.client.get(&["tokens"], &[]).await?;
            if ctx.json {
                return output::json(&v);
            }
            let mut t = output::table(&["id", "kind", "description", "created", "expires", "uses", "revoked"]);
            for tok in output::rows(&v) {
                let uses = match (tok["uses"].as_i64(), tok["max_uses"].as_i64()) {
                    (Some(u), Some(m)) => format!("{u}/{m}"),
                    _ => "-".into(),
                };
                t.add_row(vec![
                    get(tok, "id"),
                    get(tok, "kind"),
                    output::clip(&get(tok, "description"), 40),
                    get(tok, "created_at"),
                    get(tok, "expires_at"),
                    uses,
                    get(tok, "revoked"),
                ]);
            }
            output::print(&t)
        }
        TokensCmd::Revoke { id } => {
            ctx.client.call(Method::DELETE, &["tokens", &id], None).await?;
            if !ctx.json {
                output::line(&format!("token {id} revoked"))?;
            }
            Ok(())
        }
    }
}
