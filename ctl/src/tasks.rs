//! `keelctl tasks …`: tasks rolled out to many agents in batches; `watch` is in
//! [`crate::watch`].

use std::process::ExitCode;
use std::time::Duration;

use reqwest::Method;
use serde_json::{Map, Value, json};

use crate::Ctx;
use crate::cli::{TaskCreateArgs, TaskKind, TasksCmd};
use crate::output::{self, cell, get};
use crate::policies::target_json;

/// Runs a `tasks` command; only `watch` returns anything but success.
pub async fn run(ctx: &Ctx, cmd: TasksCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        TasksCmd::Create(a) => create(ctx, &a).await?,
        TasksCmd::List { state, limit } => {
            let mut q = Vec::new();
            if let Some(s) = state {
                q.push(("state", s));
            }
            if let Some(l) = limit {
                q.push(("limit", l.to_string()));
            }
            let v = ctx.client.get(&["tasks"], &q).await?;
            if ctx.json {
                output::json(&v)?;
            } else {
                print_tasks(output::rows(&v))?;
            }
        }
        TasksCmd::Show { id } => show(ctx, &id).await?,
        TasksCmd::Pause { id } => change(ctx, &id, "pause").await?,
        TasksCmd::Resume { id } => change(ctx, &id, "resume").await?,
        TasksCmd::Cancel { id } => change(ctx, &id, "cancel").await?,
        TasksCmd::Watch { id, interval_ms } => {
            return crate::watch::watch(ctx, &id, Duration::from_millis(interval_ms)).await;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The body of `POST /api/v1/tasks`; plugin-task flags are refused on other kinds.
pub fn create_body(a: &TaskCreateArgs) -> anyhow::Result<Value> {
    let mut body = Map::new();
    body.insert("kind".into(), json!(a.kind.as_str()));
    body.insert("target".into(), target_json(&a.target));
    if let Some(n) = a.batch_size {
        body.insert("batch_size".into(), json!(n));
    }
    if let Some(f) = a.failure_threshold {
        body.insert("failure_threshold".into(), json!(f));
    }
    if let Some(t) = a.timeout {
        body.insert("timeout_secs".into(), json!(t));
    }
    if a.kind == TaskKind::PluginTask {
        body.insert("data_type".into(), json!(a.data_type));
        body.insert("object_name".into(), json!(a.object));
        body.insert("data".into(), json!(a.data.clone().unwrap_or_default()));
    } else if a.data_type.is_some() || a.object.is_some() || a.data.is_some() {
        return Err(crate::usage(format!(
            "--data-type, --object and --data are for plugin-task, not {}",
            a.kind.as_str()
        )));
    }
    Ok(Value::Object(body))
}

async fn create(ctx: &Ctx, a: &TaskCreateArgs) -> anyhow::Result<()> {
    let body = create_body(a)?;
    let v = ctx.client.call(Method::POST, &["tasks"], Some(&body)).await?;
    if ctx.json {
        return output::json(&v);
    }
    let total: i64 = v["counts"]
        .as_object()
        .map(|m| m.values().filter_map(Value::as_i64).sum())
        .unwrap_or_default();
    eprintln!(
        "task {} created: {} for {total} agent(s)",
        get(&v, "id"),
        get(&v, "kind")
    );
    output::line(&get(&v, "id"))
}

/// Subtask counts as `pending 1, sent 0, …`.
pub fn counts_text(counts: &Value) -> String {
    crate::watch::STATES
        .iter()
        .map(|s| format!("{s} {}", counts[*s].as_i64().unwrap_or(0)))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Subtask counts in brief: finished/total and the states that have any, e.g.
/// `3/4 sent 1, succeeded 3`.
pub fn counts_brief(counts: &Value) -> String {
    let n = |s: &str| counts[s].as_i64().unwrap_or(0);
    let total: i64 = crate::watch::STATES.iter().map(|s| n(s)).sum();
    let finished: i64 = crate::watch::STATES[2..].iter().map(|s| n(s)).sum();
    let some: Vec<String> = crate::watch::STATES
        .iter()
        .filter(|s| n(s) != 0)
        .map(|s| format!("{s} {}", n(s)))
        .collect();
    format!("{finished}/{total} {}", some.join(", ")).trim_end().to_owned()
}

fn print_tasks(tasks: &[Value]) -> anyhow::Result<()> {
    let mut t = output::table(&["id", "kind", "state", "progress", "created by", "created", "reason"]);
    for task in tasks {
        t.add_row(vec![
            get(task, "id"),
            get(task, "kind"),
            get(task, "state"),
            counts_brief(&task["counts"]),
            get(task, "created_by"),
            get(task, "created_at"),
            output::clip(&get(task, "reason"), 60),
        ]);
    }
    output::print(&t)
}

/// The message of a subtask's 5100 result.
fn result_message(subtask: &Value) -> String {
    let r = &subtask["result"];
    r["msg"]
        .as_str()
        .or_else(|| r["message"].as_str())
        .map_or_else(|| if r.is_null() { "-".into() } else { cell(r) }, str::to_owned)
}

async fn show(ctx: &Ctx, id: &str) -> anyhow::Result<()> {
    let v = ctx.client.get(&["tasks", id], &[]).await?;
    if ctx.json {
        return output::json(&v);
    }
    if v.get("state").is_none() {
        // A single task (or one subtask) by token.
        return output::print(&output::fields(vec![
            ("token", get(&v, "token")),
            ("agent", get(&v, "agent_id")),
            ("data type", get(&v, "data_type")),
            ("object", get(&v, "object_name")),
            ("status", get(&v, "status")),
            ("created", get(&v, "created_at")),
            ("finished", get(&v, "finished_at")),
            ("result", result_message(&v)),
        ]));
    }
    output::print(&output::fields(vec![
        ("id", get(&v, "id")),
        ("kind", get(&v, "kind")),
        ("state", get(&v, "state")),
        ("reason", get(&v, "reason")),
        ("batch size", get(&v, "batch_size")),
        ("failure threshold", get(&v, "failure_threshold")),
        ("timeout", format!("{} s", get(&v, "timeout_secs"))),
        ("counts", counts_text(&v["counts"])),
        ("created by", get(&v, "created_by")),
        ("created", get(&v, "created_at")),
        ("updated", get(&v, "updated_at")),
    ]))?;
    let subtasks = output::rows(&v["subtasks"]);
    if !subtasks.is_empty() {
        output::line("")?;
        let mut t = output::table(&["agent", "status", "finished", "result"]);
        for s in subtasks {
            t.add_row(vec![
                get(s, "agent_id"),
                get(s, "status"),
                get(s, "finished_at"),
                output::clip(&result_message(s), 80),
            ]);
        }
        output::print(&t)?;
    }
    Ok(())
}

async fn change(ctx: &Ctx, id: &str, action: &str) -> anyhow::Result<()> {
    let v = ctx.client.call(Method::POST, &["tasks", id, action], None).await?;
    if ctx.json {
        return output::json(&v);
    }
    output::line(&format!(
        "task {id} is {}: {}",
        get(&v, "state"),
        counts_text(&v["counts"])
    ))
}

#[cfg(test)]
mod tests {
    use crate::cli::TargetArgs;

    use super::*;

    fn args(kind: TaskKind) -> TaskCreateArgs {
        TaskCreateArgs {
            kind,
            target: TargetArgs {
                agents: vec!["a1".into()],
                ..TargetArgs::default()
            },
            batch_size: Some(5),
            failure_threshold: None,
            timeout: Some(30),
            data_type: None,
            object: None,
            data: None,
        }
    }

    #[test]
    fn bodies() {
        assert_eq!(
            create_body(&args(TaskKind::RestartAgent)).unwrap(),
            json!({"kind": "restart-agent", "target": {"agents": ["a1"]}, "batch_size": 5, "timeout_secs": 30})
        );
        let mut a = args(TaskKind::PluginTask);
        a.data_type = Some(7);
        a.object = Some("p".into());
        let b = create_body(&a).unwrap();
        assert_eq!(
            (b["data_type"].clone(), b["object_name"].clone(), b["data"].clone()),
            (json!(7), json!("p"), json!(""))
        );
        let mut a = args(TaskKind::SyncConfig);
        a.data = Some("x".into());
        assert!(crate::exit_code(&create_body(&a).unwrap_err()) == ExitCode::from(64));
    }

    #[test]
    fn counts() {
        let c = json!({"pending": 1, "sent": 2, "succeeded": 3, "failed": 0, "timed_out": 0, "cancelled": 0});
        assert_eq!(
            counts_text(&c),
            "pending 1, sent 2, succeeded 3, failed 0, timed_out 0, cancelled 0"
        );
        assert_eq!(
            result_message(&json!({"result": {"status": "succeed", "msg": "restarting"}})),
            "restarting"
        );
        assert_eq!(result_message(&json!({"result": null})), "-");
        assert_eq!(counts_brief(&c), "3/6 pending 1, sent 2, succeeded 3");
        assert_eq!(counts_brief(&json!({})), "0/0");
    }
}
