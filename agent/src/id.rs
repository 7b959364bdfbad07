//! The agent ID: stable across restarts and reinstalls.
//!
//! Sources, first match wins (Elkeid's order):
//! 1. an explicit `agent.id`;
//! 2. the cloud instance-id, DMI product_uuid and the MAC of eth0, hashed together
//!    (UUIDv5 in the OID namespace), when they are long enough and the product
//!    UUID and name are not a vendor placeholder;
//! 3. `/etc/machine-id` (as a UUID, or hashed when it is not one);
//! 4. the ID stored in the state directory;
//! 5. a new random UUID.
//!
//! The result is stored in `<state_dir>/agent_id` with mode 0600.

use std::path::{Path, PathBuf};

use keel_common::fsutil;
use uuid::Uuid;

/// File in the state directory that holds the ID.
pub const ID_FILE: &str = "agent_id";

/// Product UUIDs that firmware vendors ship on every board.
const PLACEHOLDER_UUIDS: &[&str] = &[
    "03000200-0400-0500-0006-000700080009",
    "02000100-0300-0400-0005-000600070008",
];
/// Product names that say nothing.
const PLACEHOLDER_NAMES: &[&str] = &["--", "unknown", "to be filled by o.e.m.", "oem not specify", "t.b.d"];

/// Where the ID came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// `agent.id`.
    Explicit,
    /// Cloud instance-id, DMI and MAC.
    Hardware,
    /// `/etc/machine-id`.
    MachineId,
    /// The stored ID file.
    Stored,
    /// Newly generated.
    Random,
}

/// The ID could not be stored.
#[derive(Debug, thiserror::Error)]
#[error("cannot store the agent ID in {path}: {source}")]
pub struct IdError {
    path: PathBuf,
    source: std::io::Error,
}

fn read_trimmed(path: &Path) -> Option<String> {
    let s = std::fs::read_to_string(path).ok()?;
    let s = s.trim();
    (s.len() >= 6).then(|| s.to_owned())
}

fn under(root: &Path, abs: &str) -> PathBuf {
    root.join(abs.trim_start_matches('/'))
}

fn from_hardware(root: &Path) -> Option<String> {
    let instance = read_trimmed(&under(root, "/var/lib/cloud/data/instance-id"));
    let product_uuid = read_trimmed(&under(root, "/sys/class/dmi/id/product_uuid"));
    let mac = read_trimmed(&under(root, "/sys/class/net/eth0/address"));
    let source: String = [&instance, &product_uuid, &mac]
        .into_iter()
        .flatten()
        .map(String::as_str)
        .collect();
    if source.len() <= 8 {
        return None;
    }
    if product_uuid.as_deref().is_some_and(|u| PLACEHOLDER_UUIDS.contains(&u)) {
        return None;
    }
    let name = read_trimmed(&under(root, "/sys/class/dmi/id/product_name"))
        .or_else(|| std::fs::read_to_string(under(root, "/sys/class/dmi/id/product_name")).ok())?;
    let name = name.trim().to_ascii_lowercase();
    if name.is_empty() || PLACEHOLDER_NAMES.contains(&name.as_str()) {
        return None;
    }
    Some(Uuid::new_v5(&Uuid::NAMESPACE_OID, source.as_bytes()).to_string())
}

fn from_machine_id(root: &Path) -> Option<String> {
    let raw = std::fs::read_to_string(under(root, "/etc/machine-id")).ok()?;
    let raw = raw.trim();
    if raw.is_empty() {
        return None;
    }
    Some(match Uuid::parse_str(raw) {
        Ok(u) => u.to_string(),
        Err(_) => Uuid::new_v5(&Uuid::NAMESPACE_OID, raw.as_bytes()).to_string(),
    })
}

fn from_file(state_dir: &Path) -> Option<String> {
    let id = std::fs::read_to_string(state_dir.join(ID_FILE)).ok()?;
    let id = id.trim();
    keel_common::ids::valid_agent_id(id).then(|| id.to_owned())
}

/// Resolves the agent ID and stores it.
pub fn resolve(explicit: &str, host_root: &Path, state_dir: &Path) -> Result<(String, Source), IdError> {
    let (id, source) = if !explicit.is_empty() {
        (explicit.to_owned(), Source::Explicit)
    } else if let Some(id) = from_hardware(host_root) {
        (id, Source::Hardware)
    } else if let Some(id) = from_machine_id(host_root) {
        (id, Source::MachineId)
    } else if let Some(id) = from_file(state_dir) {
        (id, Source::Stored)
    } else {
        (Uuid::new_v4().to_string(), Source::Random)
    };
    if from_file(state_dir).as_deref() != Some(id.as_str()) {
        let path = state_dir.join(ID_FILE);
        let store = || -> std::io::Result<()> {
            fsutil::create_dir(state_dir, 0o700)?;
            fsutil::write_private(&path, format!("{id}\n").as_bytes())
        };
        store().map_err(|source| IdError {
            path: path.clone(),
            source,
        })?;
    }
    Ok((id, source))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn host(files: &[(&str, &str)]) -> tempfile::TempDir {
        let root = tempfile::tempdir().unwrap();
        for (path, text) in files {
            let p = under(root.path(), path);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, text).unwrap();
        }
        root
    }

    #[test]
    fn machine_id_survives_losing_the_id_file() {
        let root = host(&[("/etc/machine-id", "4c4c4544004a3510804bb4c04f4d4e32\n")]);
        let state = tempfile::tempdir().unwrap();
        let (a, src) = resolve("", root.path(), state.path()).unwrap();
        assert_eq!(src, Source::MachineId);
        assert_eq!(a, "4c4c4544-004a-3510-804b-b4c04f4d4e32");
        std::fs::remove_file(state.path().join(ID_FILE)).unwrap();
        let (b, _) = resolve("", root.path(), state.path()).unwrap();
        assert_eq!(a, b);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(state.path().join(ID_FILE))
            .unwrap()
            .permissions()
            .mode()
            & 0o777;
        assert_eq!(mode, 0o600);
    }

    #[test]
    fn stored_id_is_reused_then_random() {
        let root = host(&[]);
        let state = tempfile::tempdir().unwrap();
        let (a, src) = resolve("", root.path(), state.path()).unwrap();
        assert_eq!(src, Source::Random);
        let (b, src) = resolve("", root.path(), state.path()).unwrap();
        assert_eq!((a, Source::Stored), (b, src));
    }

    #[test]
    fn hardware_wins_unless_placeholder() {
        let files = [
            ("/sys/class/dmi/id/product_uuid", "8e2b1a4c-1111-2222-3333-444455556666"),
            ("/sys/class/dmi/id/product_name", "PowerEdge R640"),
            ("/sys/class/net/eth0/address", "52:54:00:12:34:56"),
            ("/etc/machine-id", "4c4c4544004a3510804bb4c04f4d4e32"),
        ];
        let root = host(&files);
        let state = tempfile::tempdir().unwrap();
        let (_, src) = resolve("", root.path(), state.path()).unwrap();
        assert_eq!(src, Source::Hardware);
        let placeholder = host(&[
            ("/sys/class/dmi/id/product_uuid", PLACEHOLDER_UUIDS[0]),
            ("/sys/class/dmi/id/product_name", "PowerEdge R640"),
            ("/etc/machine-id", "4c4c4544004a3510804bb4c04f4d4e32"),
        ]);
        let (_, src) = resolve("", placeholder.path(), state.path()).unwrap();
        assert_eq!(src, Source::MachineId);
        let (id, src) = resolve("host-7", root.path(), state.path()).unwrap();
        assert_eq!((id.as_str(), src), ("host-7", Source::Explicit));
    }
}
