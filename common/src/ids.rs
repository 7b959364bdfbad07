//! Agent IDs and plugin names: what a valid one looks like, checked the same way
//! on both ends.

/// Longest agent ID accepted.
pub const MAX_AGENT_ID_LEN: usize = 64;

/// An agent ID is 1–64 characters of `[A-Za-z0-9._-]`, starting with a letter or
/// digit. Elkeid's UUIDs and key-request's numeric IDs both fit.
pub fn valid_agent_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_AGENT_ID_LEN
        && id.as_bytes()[0].is_ascii_alphanumeric()
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Longest plugin (component) name accepted.
pub const MAX_PLUGIN_NAME_LEN: usize = 64;

/// A plugin name is 1–64 characters of `[A-Za-z0-9_-]`: it names the plugin's
/// directory, log files and cgroup on the host, so it has no dot and no slash.
pub fn valid_plugin_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= MAX_PLUGIN_NAME_LEN
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_uuids_and_numbers_refuses_the_rest() {
        assert!(valid_agent_id("0b1e8d2c-7a53-5a46-9c3e-1f0f6a2b9d11"));
        assert!(valid_agent_id("001"));
        for bad in ["", "-x", ".x", "a/b", "a b", "a\n", &"a".repeat(65), "ä"] {
            assert!(!valid_agent_id(bad), "{bad:?}");
        }
    }

    #[test]
    fn plugin_names_are_one_path_component_without_dots() {
        for good in ["proxy", "file-delivery", "key_request2"] {
            assert!(valid_plugin_name(good), "{good:?}");
        }
        for bad in ["", ".", "..", "a.b", "a/b", "a b", &"a".repeat(65), "ä"] {
            assert!(!valid_plugin_name(bad), "{bad:?}");
        }
    }
}
