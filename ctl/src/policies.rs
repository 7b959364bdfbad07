//! `keelctl policies …`: which version of a component applies to which agents.

use reqwest::Method;
use serde_json::{Value, json};

use crate::Ctx;
use crate::cli::{PoliciesCmd, TargetArgs};
use crate::output::{self, get};

/// The API form of a target: `"all"`, `{"tags": […]}`, `{"agents": […]}` or
/// `{"platform": "…"}`.
pub fn target_json(t: &TargetArgs) -> Value {
    if !t.tags.is_empty() {
        json!({ "tags": t.tags })
    } else if !t.agents.is_empty() {
        json!({ "agents": t.agents })
    } else if let Some(p) = &t.platform {
        json!({ "platform": p })
    } else {
        json!("all")
    }
}

/// Runs a `policies` command.
pub async fn run(ctx: &Ctx, cmd: PoliciesCmd) -> anyhow::Result<()> {
    match cmd {
        PoliciesCmd::List => {
            let v = ctx.client.get(&["policies"], &[]).await?;
            if ctx.json {
                return output::json(&v);
            }
            print_policies(output::rows(&v))
        }
        PoliciesCmd::Create(a) => {
            let body = json!({
                "name": a.name,
                "component": a.component,
                "version": a.version,
                "detail": a.detail.unwrap_or_default(),
                "target": target_json(&a.target),
            });
            let v = ctx.client.call(Method::POST, &["policies"], Some(&body)).await?;
            if ctx.json {
                return output::json(&v);
            }
            print_policies(std::slice::from_ref(&v))
        }
        PoliciesCmd::Update { id, version, detail } => {
            // Without a new detail the server keeps the current one.
            let mut body = json!({ "version": version });
            if let Some(detail) = detail {
                body["detail"] = json!(detail);
            }
            let v = ctx.client.call(Method::PUT, &["policies", &id], Some(&body)).await?;
            if ctx.json {
                return output::json(&v);
            }
            print_policies(std::slice::from_ref(&v))
        }
        PoliciesCmd::Delete { id } => {
            ctx.client.call(Method::DELETE, &["policies", &id], None).await?;
            if !ctx.json {
                output::line(&format!("policy {id} deleted"))?;
            }
            Ok(())
        }
    }
}

fn print_policies(policies: &[Value]) -> anyhow::Result<()> {
    let mut t = output::table(&["id", "name", "component", "version", "target", "detail", "created"]);
    for p in policies {
        t.add_row(vec![
            get(p, "id"),
            get(p, "name"),
            get(p, "component"),
            get(p, "version"),
            output::target(&p["target"]),
            output::clip(&get(p, "detail"), 30),
            get(p, "created_at"),
        ]);
    }
    output::print(&t)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets() {
        let t = |f: fn(&mut TargetArgs)| {
            let mut a = TargetArgs::default();
            f(&mut a);
            target_json(&a)
        };
        assert_eq!(t(|a| a.all = true), json!("all"));
        assert_eq!(t(|a| a.tags = vec!["x".into()]), json!({"tags": ["x"]}));
        assert_eq!(
            t(|a| a.agents = vec!["a".into(), "b".into()]),
            json!({"agents": ["a", "b"]})
        );
        assert_eq!(t(|a| a.platform = Some("debian".into())), json!({"platform": "debian"}));
    }
}
