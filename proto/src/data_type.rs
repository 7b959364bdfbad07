//! Every `data_type` Keel knows, in one table.
//!
//! | data_type | direction | meaning | origin |
//! |---|---|---|---|
//! | 1000 | up | agent heartbeat | Elkeid |
//! | 1001 | up | plugin heartbeat | Elkeid |
//! | 1010 | up | agent error log | Elkeid |
//! | 1011 | up | plugin log | Elkeid |
//! | 1050 | down | upload a file | Elkeid (not supported by Keel) |
//! | 1051 | down | set idc/region | Elkeid |
//! | 1060 | down | restart the agent | Elkeid |
//! | 1100 | up | certificate renewal request, field `csr` (PEM) | Keel |
//! | 5100 | up | task result, fields `token`, `status`, `msg` | Elkeid |
//! | 6000–6099 | both | key-request plugin | Keel |
//! | 6100–6199 | both | proxy plugin: 6100 audit job (down); 6101 job ended (up) | Keel |
//! | 6200–6299 | both | file-delivery plugin: 6200 deliver, 6201 inventory, 6202 remove (down); 6203 host key, 6210 file event (up) | Keel |
//! | 6900–6999 | both | Keel's test plugin | Keel |
//! | 20000–29999 | both | third-party plugins ([`THIRD_PARTY`]): Keel never allocates here | yours |
//!
//! Keel allocates its own agent-level types in 1100–1199. Plugins own their ranges.
//! A plugin written outside Keel takes its types from [`THIRD_PARTY`] (one
//! hundred per plugin is the custom); below 1000 and in 5000–5999 are Elkeid's
//! plugins' (its driver and collector), which Keel passes through untouched.
//!
//! The agent's own types are the agent's alone: a plugin that sends 1000, 1001,
//! 1050, 1051, 1060 or anything in 1100–1199 faults ([`from_plugin`]), so nothing a
//! plugin writes can change the registry's view of its host, hide loss, or reach
//! certificate renewal. A plugin's 1010 (Elkeid's plugin library logs as 1010) is
//! passed on as 1011, a plugin log: only the agent writes its own error log.

use std::ops::RangeInclusive;

/// Agent heartbeat: resource use, transfer counters and host facts.
pub const AGENT_HEARTBEAT: i32 = 1000;
/// Plugin heartbeat, one per plugin and interval.
pub const PLUGIN_HEARTBEAT: i32 = 1001;
/// An error the agent logged, sent upstream.
pub const AGENT_ERROR_LOG: i32 = 1010;
/// A log line of a plugin.
pub const PLUGIN_LOG: i32 = 1011;
/// Task: upload a file from the host (Elkeid's `FileExt`; Keel answers "unsupported").
pub const UPLOAD_FILE: i32 = 1050;
/// Task: set the agent's idc and/or region, data `{"idc":…,"region":…}`.
pub const SET_METADATA: i32 = 1051;
/// Task: restart the agent.
pub const RESTART_AGENT: i32 = 1060;
/// The agent asks for a new certificate; field `csr` holds a PEM CSR.
pub const CERT_RENEWAL: i32 = 1100;
/// Keel's agent-level types.
pub const AGENT_KEEL: RangeInclusive<i32> = 1100..=1199;
/// The result of a task, with fields `token`, `status` (`succeeded`/`failed`) and `msg`.
pub const TASK_RESULT: i32 = 5100;

/// The key-request plugin's range.
pub const KEY_REQUEST: RangeInclusive<i32> = 6000..=6099;
/// key-request task: look an agent up; answered with a `KEY_LOOKUP` record.
pub const KEY_LOOKUP: i32 = 6000;
/// key-request task: look an agent up and check a key proof; answered with a
/// `KEY_PROOF` record.
pub const KEY_PROOF: i32 = 6001;
/// The proxy plugin's range.
pub const PROXY: RangeInclusive<i32> = 6100..=6199;
/// proxy task: run an audit job (data: the job as JSON).
pub const PROXY_JOB: i32 = 6100;
/// proxy record: a job ended (fields `job`, `target`, `address`, `outcome`,
/// `sent`, `received`, `ms`).
pub const PROXY_JOB_EVENT: i32 = 6101;
/// proxy task: sweep what the allow list permits for open TCP endpoints (data:
/// `{"ports": [...]}` or empty); the 5100 result's `msg` is the JSON of what was
/// found (`open`, `tried`, `skipped`).
pub const PROXY_DISCOVER: i32 = 6102;
/// The file-delivery plugin's range.
pub const FILE_DELIVERY: RangeInclusive<i32> = 6200..=6299;
/// file-delivery task: deliver files (data: a sealed envelope, a bundle of them,
/// or a piece of one too large for a task; at most [`FILE_PART_MAX_BYTES`]). The
/// 5100 result of a bundle or a last piece carries `files`, each file's outcome.
pub const FILE_DELIVER: i32 = 6200;
/// The most data a 6200 task carries: below NATS's default 1 MiB payload, so a
/// part routed between the servers of a cluster passes as it is.
pub const FILE_PART_MAX_BYTES: usize = 512 << 10;
/// file-delivery task: report the host key and every delivered file's digest; the
/// 5100 result carries `host_key` and `files`.
pub const FILE_INVENTORY: i32 = 6201;
/// file-delivery task: remove a file (data: a signed removal envelope).
pub const FILE_REMOVE: i32 = 6202;
/// file-delivery record: the host key (field `host_key`), sent at start.
pub const FILE_HOST_KEY: i32 = 6203;
/// file-delivery record: a file changed (fields `name`, `action`, `version`, `keeper`).
pub const FILE_EVENT: i32 = 6210;

/// The range third-party plugins allocate their types from; Keel never uses it.
pub const THIRD_PARTY: RangeInclusive<i32> = 20_000..=29_999;

/// Whether records of this type carry a `Payload` that Keel itself produces, so the
/// server may decode it for storage. Everything else stays opaque bytes.
pub fn is_keel_payload(data_type: i32) -> bool {
    matches!(
        data_type,
        AGENT_HEARTBEAT | PLUGIN_HEARTBEAT | AGENT_ERROR_LOG | PLUGIN_LOG | CERT_RENEWAL | TASK_RESULT
    )
}

/// What the agent does with a record a plugin sent, by its type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FromPlugin {
    /// Passed on unchanged.
    Pass,
    /// Passed on as this type instead.
    As(i32),
    /// Refused: the type is the agent's own.
    Refused,
}

/// Whether a plugin may send `data_type`, and as what.
pub fn from_plugin(data_type: i32) -> FromPlugin {
    match data_type {
        AGENT_ERROR_LOG => FromPlugin::As(PLUGIN_LOG),
        AGENT_HEARTBEAT | PLUGIN_HEARTBEAT | UPLOAD_FILE | SET_METADATA | RESTART_AGENT => FromPlugin::Refused,
        t if AGENT_KEEL.contains(&t) => FromPlugin::Refused,
        _ => FromPlugin::Pass,
    }
}

/// Whether `data_type` is the agent's alone: what the server reads from such a
/// record (heartbeats, renewals) it takes only from the agent itself, never from a
/// record that names a plugin.
pub fn agent_only(data_type: i32) -> bool {
    from_plugin(data_type) != FromPlugin::Pass
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugins_may_not_send_the_agent_s_own_types() {
        for t in [
            AGENT_HEARTBEAT,
            PLUGIN_HEARTBEAT,
            UPLOAD_FILE,
            SET_METADATA,
            RESTART_AGENT,
            CERT_RENEWAL,
            1199,
        ] {
            assert_eq!(from_plugin(t), FromPlugin::Refused, "{t}");
            assert!(agent_only(t), "{t}");
        }
        assert!(agent_only(AGENT_ERROR_LOG));
        assert_eq!(from_plugin(AGENT_ERROR_LOG), FromPlugin::As(PLUGIN_LOG));
        for t in [PLUGIN_LOG, TASK_RESULT, 1099, 1200, 6001, 6100, 6210, 0, -1] {
            assert_eq!(from_plugin(t), FromPlugin::Pass, "{t}");
            assert!(!agent_only(t), "{t}");
        }
    }
}
