//! Printing: the server's JSON (pretty) with `--json`, otherwise plain tables that
//! line up for people and split on whitespace for `awk`. A closed stdout (as with
//! `keelctl … | head`) ends the output quietly.

use std::io::Write;

use comfy_table::{ContentArrangement, Table};
use serde_json::Value;

/// Writes `text` and a newline to stdout.
pub fn line(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{text}").and_then(|()| out.flush()) {
        Err(e) if e.kind() != std::io::ErrorKind::BrokenPipe => Err(anyhow::anyhow!("cannot write to stdout: {e}")),
        _ => Ok(()),
    }
}

/// Writes `value` as pretty JSON to stdout.
pub fn json(value: &Value) -> anyhow::Result<()> {
    line(&serde_json::to_string_pretty(value)?)
}

/// A table with these column headers.
pub fn table(headers: &[&str]) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled)
        .set_header(headers.iter().map(|h| h.to_uppercase()));
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t
}

/// A two-column table of fields and their values.
pub fn fields(rows: Vec<(&str, String)>) -> Table {
    let mut t = Table::new();
    t.load_style(comfy_table::presets::NOTHING)
        .set_content_arrangement(ContentArrangement::Disabled);
    for (k, v) in rows {
        t.add_row(vec![format!("{k}:"), v]);
    }
    for column in t.column_iter_mut() {
        column.set_padding((0, 2));
    }
    t
}

/// Prints a table to stdout.
pub fn print(table: &Table) -> anyhow::Result<()> {
    line(&table.trim_fmt())
}

/// A JSON value as a table cell: strings bare, `null` as `-`, arrays joined with
/// commas, booleans as yes/no.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) if s.is_empty() => "-".into(),
        Value::String(s) => s.clone(),
        Value::Bool(b) => if *b { "yes" } else { "no" }.into(),
        Value::Number(n) => n.to_string(),
        Value::Array(a) if a.is_empty() => "-".into(),
        Value::Array(a) => a
            .iter()
            .map(|x| match x {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            })
            .collect::<Vec<_>>()
            .join(","),
        Value::Object(_) => v.to_string(),
    }
}

/// `field` of `v` as a cell.
pub fn get(v: &Value, field: &str) -> String {
    cell(&v[field])
}

/// Text cut to `max` characters, with an ellipsis when cut.
pub fn clip(text: &str, max: usize) -> String {
    if text.chars().count() <= max {
        text.to_owned()
    } else {
        let mut s: String = text.chars().take(max.saturating_sub(1)).collect();
        s.push('…');
        s
    }
}

/// The rows of a JSON array answer (an empty list for anything else).
pub fn rows(v: &Value) -> &[Value] {
    v.as_array().map_or(&[], Vec::as_slice)
}

/// A policy or task target as text: `all`, `tags a,b`, `agents x`, `platform p`.
pub fn target(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Object(m) => m
            .iter()
            .map(|(k, v)| format!("{k} {}", cell(v)))
            .collect::<Vec<_>>()
            .join("; "),
        other => cell(other),
    }
}

/// A byte count for people: `512 B`, `1.5 KiB`, `3.2 MiB`.
pub fn bytes(n: i64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn cells() {
        assert_eq!(cell(&json!(null)), "-");
        assert_eq!(cell(&json!(["a", "b"])), "a,b");
        assert_eq!(cell(&json!(true)), "yes");
        assert_eq!(cell(&json!(3)), "3");
        assert_eq!(target(&json!("all")), "all");
        assert_eq!(target(&json!({"tags": ["a", "b"]})), "tags a,b");
        assert_eq!(target(&json!({"platform": "debian"})), "platform debian");
        assert_eq!(clip("abcdef", 4), "abc…");
        assert_eq!(bytes(100), "100 B");
        assert_eq!(bytes(1536), "1.5 KiB");
    }

    #[test]
    fn tables_split_on_whitespace() {
        let mut t = table(&["id", "state"]);
        t.add_row(vec!["a1", "running"]);
        let text = t.trim_fmt();
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(
            lines.first().map(|l| l.split_whitespace().collect::<Vec<_>>()),
            Some(vec!["ID", "STATE"])
        );
        assert!(
            text.lines()
                .any(|l| l.split_whitespace().collect::<Vec<_>>() == ["a1", "running"]),
            "{text}"
        );
    }
}
