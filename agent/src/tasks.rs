//! Tasks addressed to the agent itself (object_name `keel-agent`), and the task
//! results (data_type 5100) every task gets.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use keel_proto::data_type;
use serde::{Deserialize, Serialize};

use crate::record::{PRODUCT, Record};

/// A task from the server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskRequest {
    /// Task type.
    pub data_type: i32,
    /// `keel-agent` or a plugin name.
    pub object_name: String,
    /// Task data.
    pub data: String,
    /// Correlation token for the result.
    pub token: String,
}

/// A 5100 task result.
pub fn result(token: &str, ok: bool, msg: &str) -> Record {
    let status = if ok { "succeeded" } else { "failed" };
    Record::new(
        data_type::TASK_RESULT,
        [("token", token), ("status", status), ("msg", msg)],
    )
}

/// Placement of this host: set by task 1051, kept in `<state>/metadata.json`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Metadata {
    /// Data centre.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idc: Option<String>,
    /// Region.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
}

/// Shared, persisted metadata.
#[derive(Debug, Clone)]
pub struct MetadataStore {
    path: PathBuf,
    current: Arc<RwLock<Metadata>>,
}

impl MetadataStore {
    /// Loads `<state_dir>/metadata.json`; a missing or unreadable file is empty.
    pub fn load(state_dir: &Path) -> Self {
        let path = state_dir.join("metadata.json");
        let current = std::fs::read(&path)
            .ok()
            .and_then(|b| {
                serde_json::from_slice(&b)
                    .map_err(|e| tracing::warn!(file = %path.display(), error = %e, "ignoring unreadable metadata"))
                    .ok()
            })
            .unwrap_or_default();
        Self {
            path,
            current: Arc::new(RwLock::new(current)),
        }
    }

    /// The current metadata.
    pub fn get(&self) -> Metadata {
        self.current.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set(&self, m: Metadata) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(&m).map_err(std::io::Error::other)?;
        keel_common::fsutil::write_public(&self.path, &json)?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = m;
        Ok(())
    }
}

/// What the agent must do after answering a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Nothing more.
    None,
    /// Restart (task 1060).
    Restart,
}

fn valid_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

fn set_metadata(store: &MetadataStore, data: &str) -> Result<String, String> {
    let update: Metadata = serde_json::from_str(data).map_err(|e| format!("invalid 1051 data: {e}"))?;
    if update.idc.is_none() && update.region.is_none() {
        return Err("invalid 1051 data: give idc and/or region".into());
    }
    for (name, v) in [("idc", &update.idc), ("region", &update.region)] {
        if let Some(v) = v
            && !valid_label(v)
        {
            return Err(format!("invalid {name} {v:?}: 1-64 characters of [A-Za-z0-9._-]"));
        }
    }
    let mut m = store.get();
    if update.idc.is_some() {
        m.idc = update.idc;
    }
    if update.region.is_some() {
        m.region = update.region;
    }
    store
        .set(m.clone())
        .map_err(|e| format!("cannot store metadata: {e}"))?;
    Ok(format!(
        "idc={} region={}",
        m.idc.unwrap_or_default(),
        m.region.unwrap_or_default()
    ))
}

/// Handles a task for the agent itself. Returns the 5100 result and what to do next.
pub fn handle(task: &TaskRequest, metadata: &MetadataStore) -> (Record, Action) {
    match task.data_type {
        data_type::SET_METADATA => match set_metadata(metadata, &task.data) {
            Ok(msg) => {
                tracing::info!(%msg, "metadata set");
                (result(&task.token, true, &msg), Action::None)
            }
            Err(msg) => {
                tracing::warn!(%msg, "refused task 1051");
                (result(&task.token, false, &msg), Action::None)
            }
        },
        data_type::RESTART_AGENT => (result(&task.token, true, "restarting"), Action::Restart),
        other => (
            result(
                &task.token,
                false,
                &format!("unsupported data_type {other} for {PRODUCT}"),
            ),
            Action::None,
        ),
    }
}

#[cfg(test)]
mod tests {
    use keel_proto::payload;

    use super::*;

    fn task(data_type: i32, data: &str) -> TaskRequest {
        TaskRequest {
            data_type,
            object_name: PRODUCT.into(),
            data: data.into(),
            token: "t".into(),
        }
    }

    fn fields(r: &Record) -> std::collections::HashMap<String, String> {
        payload::decode(&r.data).unwrap()
    }

    #[test]
    fn set_metadata_persists_and_validates() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::load(dir.path());
        let (r, a) = handle(&task(1051, r#"{"idc":"lab-1"}"#), &store);
        assert_eq!((fields(&r)["status"].as_str(), a), ("succeeded", Action::None));
        let (r, _) = handle(&task(1051, r#"{"region":"eu"}"#), &store);
        assert_eq!(fields(&r)["msg"], "idc=lab-1 region=eu");
        assert_eq!(MetadataStore::load(dir.path()).get().idc.as_deref(), Some("lab-1"));
        for bad in [r#"{"idc":"a b"}"#, "{}", "not json", r#"{"colour":"red"}"#] {
            let (r, _) = handle(&task(1051, bad), &store);
            assert_eq!(fields(&r)["status"], "failed", "{bad}");
        }
        assert_eq!(
            store.get().region.as_deref(),
            Some("eu"),
            "refused input changes nothing"
        );
    }

    #[test]
    fn restart_and_unsupported() {
        let dir = tempfile::tempdir().unwrap();
        let store = MetadataStore::load(dir.path());
        assert_eq!(handle(&task(1060, ""), &store).1, Action::Restart);
        let (r, _) = handle(&task(1050, "{}"), &store);
        assert_eq!(fields(&r)["msg"], "unsupported data_type 1050 for keel-agent");
    }
}
