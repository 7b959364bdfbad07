//! Scraping `/metrics` and reading it with the Prometheus project's own Python
//! parser (`prometheus_client`, OpenMetrics), so that what Keel serves is held to
//! a real scraper's grammar, not to this harness's idea of it.

use std::collections::BTreeMap;
use std::io::Write;
use std::process::{Command, Stdio};

use serde::Deserialize;

use crate::Api;

/// Reads OpenMetrics text from stdin and prints its samples as JSON; any
/// violation of the format is an exception, and a failed test.
const PARSER: &str = r#"
import json, sys
from prometheus_client.openmetrics.parser import text_string_to_metric_families
families, samples = [], []
for family in text_string_to_metric_families(sys.stdin.read()):
    families.append(family.name)
    for s in family.samples:
        samples.append({"family": family.name, "type": family.type, "name": s.name, "labels": s.labels, "value": s.value})
print(json.dumps({"families": families, "samples": samples}))
"#;

/// One sample.
#[derive(Debug, Clone, Deserialize)]
pub struct Sample {
    /// Its family's name.
    pub family: String,
    /// The family's type: `counter`, `gauge`, `histogram`, …
    #[serde(rename = "type")]
    pub kind: String,
    /// The sample's name (`…_total`, `…_bucket`, …).
    pub name: String,
    /// Its labels.
    pub labels: BTreeMap<String, String>,
    /// Its value.
    pub value: f64,
}

/// One scrape: every family's name (including those without samples yet) and
/// the samples.
#[derive(Debug, Clone, Deserialize)]
pub struct Scrape {
    /// Family names.
    pub families: Vec<String>,
    /// Samples.
    pub samples: Vec<Sample>,
}

impl Scrape {
    /// The samples named `name` whose labels include `labels`.
    pub fn matching<'a>(&'a self, name: &'a str, labels: &'a [(&str, &str)]) -> impl Iterator<Item = &'a Sample> {
        self.samples.iter().filter(move |s| {
            s.name == name
                && labels
                    .iter()
                    .all(|(k, v)| s.labels.get(*k).map(String::as_str) == Some(*v))
        })
    }

    /// The sum of those samples (0 when there are none).
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        self.matching(name, labels).map(|s| s.value).sum()
    }

    /// Whether there is such a sample.
    pub fn has(&self, name: &str, labels: &[(&str, &str)]) -> bool {
        self.matching(name, labels).next().is_some()
    }

    /// The type of family `family`.
    pub fn kind(&self, family: &str) -> Option<&str> {
        self.samples
            .iter()
            .find(|s| s.family == family)
            .map(|s| s.kind.as_str())
    }
}

/// Parses OpenMetrics `text` with the Prometheus Python client's parser.
pub fn parse(text: &str) -> Scrape {
    let mut child = Command::new("python3")
        .args(["-c", PARSER])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run python3 (with prometheus_client installed)");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write the scrape");
    let out = child.wait_with_output().expect("parser output");
    assert!(
        out.status.success(),
        "the Prometheus parser refused the scrape: {}\n--- scrape ---\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("parser JSON")
}

/// `GET <base>/metrics` with `api`'s token (if any): the status and the text.
pub async fn fetch(api: &Api, base: &str) -> (u16, String, String) {
    api.send_raw(api.client().get(format!("{base}/metrics"))).await
}

/// Scrapes and parses, insisting on a 200 in the OpenMetrics content type.
pub async fn scrape(api: &Api, base: &str) -> Scrape {
    let (status, kind, text) = fetch(api, base).await;
    assert_eq!(status, 200, "GET {base}/metrics answered {status}: {text}");
    assert!(kind.starts_with("application/openmetrics-text"), "content type {kind}");
    parse(&text)
}
