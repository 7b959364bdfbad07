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
        CertsCmd::Schedule { agent, every, targets } => {
            let body = json!({"agent": agent, "targets": targets, "every": every});
            let row = ctx
                .client
                .call(Method::POST, &["scans", "schedules"], Some(&body))
                .await?;
            if ctx.json {
                output::json(&row)?;
            } else {
                println!("{}", output::cell(&row["id"]));
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Schedules => {
            let list = ctx.client.get(&["scans", "schedules"], &[]).await?;
            if ctx.json {
                output::json(&list)?;
            } else {
                let mut t = output::table(&[
                    "id", "agent", "every", "next run", "last run", "ok", "failed", "targets",
                ]);
                for s in output::rows(&list) {
                    let every = s["interval_ms"]
                        .as_u64()
                        .map(|ms| humantime::format_duration(std::time::Duration::from_millis(ms)).to_string())
                        .unwrap_or_default();
                    let targets: Vec<&str> = output::rows(&s["targets"]).iter().filter_map(Value::as_str).collect();
                    t.add_row(vec![
                        output::cell(&s["id"]),
                        output::cell(&s["agent_id"]),
                        every,
                        when(&s["next_run"]),
                        when(&s["last_run"]),
                        output::cell(&s["last_ok"]),
                        output::cell(&s["last_failed"]),
                        targets.join(" "),
                    ]);
                }
                output::print(&t)?;
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Discover { agent, ports, every } => {
            let body = json!({"agent": agent, "ports": ports, "every": every});
            // The sweep may take the plugin up to three minutes, then the scans.
            let found = ctx
                .client
                .call_within(Method::POST, &["scans", "discover"], Some(&body), DISCOVER_TIMEOUT)
                .await?;
            if ctx.json {
                output::json(&found)?;
            } else {
                let mut t = output::table(&["target", "tls", "subject", "protocols", "detail"]);
                for r in output::rows(&found["scans"]) {
                    let c = &r["certificate"];
                    t.add_row(vec![
                        output::cell(&r["target"]),
                        if r["status"] == "ok" { "yes".into() } else { "no".into() },
                        output::cell(&c["subject"]),
                        protocols(&c["tls"]),
                        output::cell(&r["error"]),
                    ]);
                }
                output::print(&t)?;
                println!("{} endpoints tried", output::cell(&found["tried"]));
                for s in output::rows(&found["skipped"]) {
                    println!("skipped: {}", output::cell(s));
                }
                for id in output::rows(&found["schedules"]) {
                    println!("scheduled: {}", output::cell(id));
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::Unschedule { id } => {
            ctx.client
                .call(Method::DELETE, &["scans", "schedules", &id], None)
                .await?;
            Ok(ExitCode::SUCCESS)
        }
        CertsCmd::History { agent, target, limit } => {
            let mut query = vec![("limit", limit.to_string())];
            if let Some(a) = agent {
                query.push(("agent", a));
            }
            if let Some(t) = target {
                query.push(("target", t));
            }
            let list = ctx.client.get(&["certificates", "history"], &query).await?;
            if ctx.json {
                output::json(&list)?;
            } else {
                let mut t = output::table(&[
                    "scanned",
                    "target",
                    "agent",
                    "fingerprint",
                    "changed",
                    "findings",
                    "error",
                ]);
                for e in output::rows(&list) {
                    let codes: Vec<&str> = output::rows(&e["findings"]).iter().filter_map(Value::as_str).collect();
                    let fp = e["fingerprint"].as_str().unwrap_or_default();
                    t.add_row(vec![
                        when(&e["scanned_at"]),
                        output::cell(&e["target"]),
                        output::cell(&e["agent_id"]),
                        fp.chars().take(16).collect(),
                        if e["changed"] == true {
                            "changed".into()
                        } else {
                            String::new()
                        },
                        codes.join(" "),
                        output::cell(&e["error"]),
                    ]);
                }
                output::print(&t)?;
            }
            Ok(ExitCode::SUCCESS)
        }
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
                let mut t = output::table(&["target", "agent", "subject", "expires", "days", "key", "protocols"]);
                for c in output::rows(&list) {
                    t.add_row(vec![
                        output::cell(&c["target"]),
                        output::cell(&c["agent_id"]),
                        output::cell(&c["subject"]),
                        expires(&c["not_after"]),
                        days_left(&c["not_after"]),
                        output::cell(&c["public_key"]),
                        protocols(&c["tls"]),
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
        let mut t = output::table(&["target", "status", "subject", "expires", "protocols", "detail"]);
        for r in &all {
            let c = &r["certificate"];
            t.add_row(vec![
                output::cell(&r["target"]),
                output::cell(&r["status"]),
                output::cell(&c["subject"]),
                expires(&c["not_after"]),
                protocols(&c["tls"]),
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

/// The protocol versions a target accepted, oldest first.
fn protocols(tls: &Value) -> String {
    output::rows(&tls["protocols"])
        .iter()
        .filter(|p| p["accepted"] == true)
        .filter_map(|p| p["version"].as_str())
        .collect::<Vec<_>>()
        .join(" ")
}

/// How long a discovery may take: the sweep, then a scan of what it found.
const DISCOVER_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(600);

/// A time as RFC 3339 to the second, or `-` for none (0).
fn when(ms: &Value) -> String {
    match ms.as_i64() {
        Some(ms) if ms > 0 => keel_common::time::rfc3339_ms(ms).chars().take(19).collect(),
        _ => "-".into(),
    }
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

    #[test]
    fn protocols_are_the_accepted_versions() {
        let tls = json!({"protocols": [
            {"version": "TLSv1.0", "accepted": true},
            {"version": "TLSv1.1", "accepted": false},
            {"version": "TLSv1.3", "accepted": true}
        ]});
        assert_eq!(protocols(&tls), "TLSv1.0 TLSv1.3");
        assert_eq!(protocols(&Value::Null), "");
    }
}
