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
//!
//! Keel allocates its own agent-level types in 1100–1199. Plugins own their ranges.

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
/// The result of a task, with fields `token`, `status` (`succeeded`/`failed`) and `msg`.
pub const TASK_RESULT: i32 = 5100;

/// The key-request plugin's range.
pub const KEY_REQUEST: RangeInclusive<i32> = 6000..=6099;
/// The proxy plugin's range.
pub const PROXY: RangeInclusive<i32> = 6100..=6199;
/// The file-delivery plugin's range.
pub const FILE_DELIVERY: RangeInclusive<i32> = 6200..=6299;

/// Whether records of this type carry a `Payload` that Keel itself produces, so the
/// server may decode it for storage. Everything else stays opaque bytes.
pub fn is_keel_payload(data_type: i32) -> bool {
    matches!(
        data_type,
        AGENT_HEARTBEAT | PLUGIN_HEARTBEAT | AGENT_ERROR_LOG | PLUGIN_LOG | CERT_RENEWAL | TASK_RESULT
    )
}
