//! `keelctl audit`: the audit log of changes made through the API, newest first.

use std::time::Duration;

use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::Ctx;
use crate::cli::AuditArgs;
use crate::output::{self, get};

/// A time for the audit filter: RFC 3339 as given, or a duration ago (`2h`) as
/// RFC 3339 relative to `now`.
pub fn time_arg(flag: &str, value: &str, now: OffsetDateTime) -> anyhow::Result<String> {
    if OffsetDateTime::parse(value, &Rfc3339).is_ok() {
        return Ok(value.to_owned());
    }
    let ago: Duration = humantime::parse_duration(value).map_err(|_| {
        crate::usage(format!(
            "invalid {flag} {value:?}: expected RFC 3339 (2024-05-01T12:00:00Z) or a duration ago (2h, 30m)"
        ))
    })?;
    let at = now
        .checked_sub(time::Duration::try_from(ago).unwrap_or(time::Duration::MAX))
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    Ok(at.format(&Rfc3339)?)
}

/// The query of `audit`.
pub fn query(a: &AuditArgs, now: OffsetDateTime) -> anyhow::Result<Vec<(&'static str, String)>> {
    let mut q = Vec::new();
    if let Some(s) = &a.since {
        q.push(("since", time_arg("--since", s, now)?));
    }
    if let Some(u) = &a.until {
        q.push(("until", time_arg("--until", u, now)?));
    }
    if let Some(x) = &a.actor {
        q.push(("actor", x.clone()));
    }
    if let Some(x) = &a.target {
        q.push(("target", x.clone()));
    }
    if let Some(n) = a.limit {
        q.push(("limit", n.to_string()));
    }
    Ok(q)
}

/// Runs `audit`.
pub async fn run(ctx: &Ctx, a: &AuditArgs) -> anyhow::Result<()> {
    let q = query(a, OffsetDateTime::now_utc())?;
    let v = ctx.client.get(&["audit"], &q).await?;
    if ctx.json {
        return output::json(&v);
    }
    let mut t = output::table(&["at", "actor", "action", "target", "status", "outcome"]);
    for e in output::rows(&v) {
        t.add_row(vec![
            get(e, "at"),
            get(e, "actor"),
            get(e, "action"),
            get(e, "target"),
            get(e, "status"),
            output::clip(&get(e, "outcome"), 80),
        ]);
    }
    output::print(&t)
}

#[cfg(test)]
mod tests {
    use time::macros::datetime;

    use super::*;

    #[test]
    fn times_are_rfc3339_or_durations_ago() {
        let now = datetime!(2024-05-01 12:00:00 UTC);
        assert_eq!(
            time_arg("--since", "2024-04-01T00:00:00Z", now).unwrap(),
            "2024-04-01T00:00:00Z"
        );
        assert_eq!(time_arg("--since", "2h", now).unwrap(), "2024-05-01T10:00:00Z");
        let e = time_arg("--since", "yesterday", now).unwrap_err();
        assert!(e.to_string().contains("--since"));
        assert_eq!(crate::exit_code(&e), std::process::ExitCode::from(64));
    }

    #[test]
    fn queries() {
        let a = AuditArgs {
            actor: Some("tok".into()),
            limit: Some(5),
            ..AuditArgs::default()
        };
        assert_eq!(
            query(&a, OffsetDateTime::UNIX_EPOCH).unwrap(),
            vec![("actor", "tok".to_owned()), ("limit", "5".to_owned())]
        );
    }
}
