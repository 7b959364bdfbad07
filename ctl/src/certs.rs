//! `keelctl certs`: the TLS inventory. `scan` has an agent's proxy plugin reach
//! targets and the server record their certificates; `list` shows the inventory,
//! soonest expiry first; `findings` what is wrong with it, most severe first.

use std::process::ExitCode;

use reqwest::Method;
use serde_json::{Value, json};

use crate::cli::CertsCmd;
use crate::{Ctx, EXIT_TASK_UNSUCCESSFUL, output};

/// Targets per request: each request finishes within the client's time limit
/// even when every target waits out the server's tunnel wait.
const PER_REQUEST: usize = 8;

/// Runs a `certs` command.
pub async fn run(ctx: &Ctx, cmd: CertsCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        CertsCmd::Scan { agent, targets } => scan(ctx, &agent, &targets).await,
        CertsCmd::Findings { agent, min_severity } => {
            let mut query = Vec::new();
            if let Some(a) = agent {
                query.push(("agent", a));
            }
            if let Some(s) = min_severity {
                query.push(("min_severity", s));
            }
            let list = ctx.client.get(&["certificates", "findings"], &query).await?;
            let serious = output::rows(&list)
                .iter()
                .any(|f| f["severity"] == "high" || f["severity"] == "critical");
            if ctx.json {
                output::json(&list)?;
            } else {
                let mut t = output::table(&["severity", "target", "agent", "finding", "detail"]);
                for f in output::rows(&list) {
                    t.add_row(vec![
                        output::cell(&f["severity"]),
                        output::cell(&f["target"]),
                        output::cell(&f["agent_id"]),
                        output::cell(&f["code"]),
                        output::cell(&f["message"]),
                    ]);
                }
                output::print(&t)?;
            }
            Ok(if serious {
                ExitCode::from(EXIT_TASK_UNSUCCESSFUL)
            } else {
                ExitCode::SUCCESS
            })
        }
        CertsCmd::List { agent, expiring_within } => {
            let mut query = Vec::new();
            if let Some(a) = agent {
                query.push(("agent", a));
            }
            if let Some(d) = expiring_within {
                query.push(("expiring_within_days", d.to_string()));
            }
            let list = ctx.client.get(&["certificates"], &query).await?;
            if ctx.json {
                output::json(&list)?;
            } else {
                let mut t = output::table(&["target", "agent", "subject", "expires", "days", "key"]);
                for c in output::rows(&list) {
                    t.add_row(vec![
                        output::cell(&c["target"]),
                        output::cell(&c["agent_id"]),
                        output::cell(&c["subject"]),
                        expires(&c["not_after"]),
                        days_left(&c["not_after"]),
                        output::cell(&c["public_key"]),
                    ]);
                }
                output::print(&t)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

async fn scan(ctx: &Ctx, agent: &str, targets: &[String]) -> anyhow::Result<ExitCode> {
    let mut all = Vec::new();
    for chunk in targets.chunks(PER_REQUEST) {
        let body = json!({"agent": agent, "targets": chunk});
        let answer = ctx.client.call(Method::POST, &["scans"], Some(&body)).await?;
        all.extend(output::rows(&answer).iter().map(|r| (*r).clone()));
    }
    let failed = all.iter().filter(|r| r["status"] != "ok").count();
    if ctx.json {
        output::json(&Value::Array(all))?;
    } else {
        let mut t = output::table(&["target", "status", "subject", "expires", "detail"]);
        for r in &all {
            let c = &r["certificate"];
            t.add_row(vec![
                output::cell(&r["target"]),
                output::cell(&r["status"]),
                output::cell(&c["subject"]),
                expires(&c["not_after"]),
                output::cell(&r["error"]),
            ]);
        }
        output::print(&t)?;
    }
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_TASK_UNSUCCESSFUL)
    })
}

fn expires(ms: &Value) -> String {
    ms.as_i64()
        .map(|ms| keel_common::time::rfc3339_ms(ms).chars().take(10).collect())
        .unwrap_or_else(|| "-".into())
}

fn days_left(ms: &Value) -> String {
    ms.as_i64()
        .map(|ms| ((ms - keel_common::time::now_ms()) / 86_400_000).to_string())
        .unwrap_or_else(|| "-".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_are_days() {
        assert_eq!(expires(&json!(0)), "1970-01-01");
        assert_eq!(expires(&Value::Null), "-");
        let in_ten_days = keel_common::time::now_ms() + 10 * 86_400_000 + 60_000;
        assert_eq!(days_left(&json!(in_ten_days)), "10");
    }
}
