//! `keelctl agents …`: the registry, tags, deletion, revocation and an agent's
//! effective configuration.

use reqwest::Method;
use serde_json::Value;

use crate::Ctx;
use crate::cli::{AgentFilter, AgentsCmd};
use crate::output::{self, cell, get};

/// Runs an `agents` command.
pub async fn run(ctx: &Ctx, cmd: AgentsCmd) -> anyhow::Result<()> {
    match cmd {
        AgentsCmd::List(f) => list(ctx, &f).await,
        AgentsCmd::Show { id } => show(ctx, &id).await,
        AgentsCmd::Tag { id, tags } => retag(ctx, &id, &tags, Method::PUT).await,
        AgentsCmd::Untag { id, tags } => retag(ctx, &id, &tags, Method::DELETE).await,
        AgentsCmd::Delete { id } => {
            ctx.client.call(Method::DELETE, &["agents", &id], None).await?;
            if !ctx.json {
                output::line(&format!("agent {id} deleted"))?;
            }
            Ok(())
        }
        AgentsCmd::Config { id } => config(ctx, &id).await,
        AgentsCmd::Revoke { id } => {
            let v = ctx.client.call(Method::POST, &["agents", &id, "revoke"], None).await?;
            if ctx.json {
                return output::json(&v);
            }
            let serials = output::rows(&v["revoked"]);
            output::line(&format!(
                "revoked {} certificate(s) of agent {id}: {}",
                serials.len(),
                cell(&v["revoked"])
            ))
        }
    }
}

/// The query of `agents list`.
pub fn filter_query(f: &AgentFilter) -> Vec<(&'static str, String)> {
    let mut q = Vec::new();
    if f.online {
        q.push(("online", "true".to_owned()));
    }
    if f.offline {
        q.push(("online", "false".to_owned()));
    }
    let pairs = [
        ("version", &f.version),
        ("tag", &f.tag),
        ("hostname", &f.hostname),
        ("plugin", &f.plugin),
        ("q", &f.search),
    ];
    for (k, v) in pairs {
        if let Some(v) = v {
            q.push((k, v.clone()));
        }
    }
    q
}

async fn list(ctx: &Ctx, f: &AgentFilter) -> anyhow::Result<()> {
    if f.limit == Some(0) {
        anyhow::bail!("--limit must be at least 1");
    }
    let (agents, total) = ctx.client.get_pages(&["agents"], &filter_query(f), f.limit).await?;
    let v = Value::Array(agents);
    if ctx.json {
        return output::json(&v);
    }
    let mut t = output::table(&[
        "id",
        "hostname",
        "version",
        "online",
        "last seen",
        "address",
        "tags",
        "plugins",
    ]);
    for a in output::rows(&v) {
        let plugins: Vec<String> = output::rows(&a["plugins"])
            .iter()
            .map(|p| format!("{}@{}", cell(&p["name"]), cell(&p["version"])))
            .collect();
        t.add_row(vec![
            get(a, "id"),
            get(a, "hostname"),
            get(a, "version"),
            get(a, "online"),
            get(a, "last_seen"),
            output::rows(&a["intranet_ipv4"])
                .first()
                .map_or_else(|| "-".into(), cell),
            get(a, "tags"),
            if plugins.is_empty() {
                "-".into()
            } else {
                plugins.join(",")
            },
        ]);
    }
    output::print(&t)?;
    if let Some(total) = total
        && usize::try_from(total).is_ok_and(|t| t > output::rows(&v).len())
    {
        eprintln!("{} of {total} agents shown (--limit)", output::rows(&v).len());
    }
    Ok(())
}

async fn show(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let a = ctx.client.get(&["agents", id], &[]).await?;
    if ctx.json {
        return output::json(&a);
    }
    let mut rows = vec![
        ("id", get(&a, "id")),
        ("hostname", get(&a, "hostname")),
        ("version", get(&a, "version")),
        ("product", get(&a, "product")),
        ("online", get(&a, "online")),
        ("first seen", get(&a, "first_seen")),
        ("last seen", get(&a, "last_seen")),
        ("connected at", get(&a, "connected_at")),
        ("last heartbeat", get(&a, "last_heartbeat")),
        ("tags", get(&a, "tags")),
    ];
    for (label, key) in [
        ("intranet ipv4", "intranet_ipv4"),
        ("extranet ipv4", "extranet_ipv4"),
        ("intranet ipv6", "intranet_ipv6"),
        ("extranet ipv6", "extranet_ipv6"),
    ] {
        if !output::rows(&a[key]).is_empty() {
            rows.push((label, get(&a, key)));
        }
    }
    output::print(&output::fields(rows))?;
    let plugins = output::rows(&a["plugins"]);
    if !plugins.is_empty() {
        output::line("")?;
        let mut t = output::table(&["plugin", "version", "state", "pid", "updated"]);
        for p in plugins {
            t.add_row(vec![
                get(p, "name"),
                get(p, "version"),
                get(p, "state"),
                get(p, "pid"),
                get(p, "updated_at"),
            ]);
        }
        output::print(&t)?;
    }
    if let Some(hb) = a["heartbeat"].as_object().filter(|m| !m.is_empty()) {
        output::line("")?;
        let mut t = output::table(&["heartbeat", "value"]);
        for (k, v) in hb {
            t.add_row(vec![k.clone(), output::clip(&cell(v), 100)]);
        }
        output::print(&t)?;
    }
    Ok(())
}

async fn retag(ctx: &Ctx, id: &str, tags: &[String], method: Method) -> anyhow::Result<()> {
    let mut now = Value::Null;
    for tag in tags {
        now = ctx
            .client
            .call(method.clone(), &["agents", id, "tags", tag], None)
            .await?;
    }
    if ctx.json {
        return output::json(&now);
    }
    output::line(&format!("agent {id} tags: {}", cell(&now)))
}

fn source(v: &Value) -> String {
    match v["kind"].as_str() {
        Some("policy") => format!("policy {}", cell(&v["name"])),
        Some("agent") => "agent's own plugin set".into(),
        _ => cell(v),
    }
}

async fn config(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let v = ctx.client.get(&["agents", id, "config"], &[]).await?;
    if ctx.json {
        return output::json(&v);
    }
    output::line(&format!(
        "agent {id}: {}",
        if v["managed"] == true {
            "managed by the server"
        } else {
            "not managed by the server (no policy or plugin set applies)"
        }
    ))?;
    let components = output::rows(&v["components"]);
    if components.is_empty() {
        return Ok(());
    }
    let mut t = output::table(&["component", "version", "source", "conflicts with", "detail"]);
    for c in components {
        t.add_row(vec![
            get(c, "component"),
            get(c, "version"),
            source(&c["source"]),
            get(c, "conflicts_with"),
            output::clip(&get(c, "detail"), 40),
        ]);
    }
    output::print(&t)
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn filters_become_the_query() {
        let f = AgentFilter {
            offline: true,
            tag: Some("web".into()),
            ..AgentFilter::default()
        };
        assert_eq!(
            filter_query(&f),
            vec![("online", "false".to_owned()), ("tag", "web".to_owned())]
        );
        assert!(filter_query(&AgentFilter::default()).is_empty());
    }

    #[test]
    fn sources() {
        assert_eq!(
            source(&json!({"kind": "policy", "id": "1", "name": "web"})),
            "policy web"
        );
        assert_eq!(source(&json!({"kind": "agent"})), "agent's own plugin set");
    }
}
