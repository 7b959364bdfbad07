//! Layered configuration: a TOML file, overridden by `KEEL_*` environment variables,
//! overridden by command-line flags, then deserialised once into typed structs.
//!
//! Every layer is merged into one TOML tree before deserialising, so an error names
//! the key at fault and where its value came from, whichever layer set it.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// Exit code for invalid configuration or usage (`EX_USAGE` from sysexits.h).
pub const EX_USAGE: i32 = 64;

/// Configuration that cannot be used. Its `Display` names the source, the key and
/// what is wrong, e.g. `/etc/keel/agent.toml: server.private: invalid type: …`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Where the offending value came from: a file path, `KEEL_X` or `--flag`.
    pub source: String,
    /// Dotted key path, or empty when the whole file is at fault.
    pub key: String,
    /// What is wrong.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.key.is_empty() {
            write!(f, "{}: {}", self.source, self.message)
        } else {
            write!(f, "{}: {}: {}", self.source, self.key, self.message)
        }
    }
}

impl std::error::Error for ConfigError {}

/// How an environment variable's string maps to a TOML value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvKind {
    /// Taken as a string.
    Str,
    /// Comma-separated strings; empty items are dropped.
    List,
    /// A decimal integer.
    Int,
    /// `true`/`false`/`1`/`0`.
    Bool,
}

/// One environment override: variable name, dotted key, kind.
pub type EnvBinding = (&'static str, &'static str, EnvKind);

/// A configuration being assembled from its layers.
#[derive(Debug, Clone)]
pub struct Layers {
    tree: toml::Table,
    file: String,
    /// Which key was set by which non-file layer, for error messages.
    overrides: BTreeMap<String, String>,
}

impl Layers {
    /// Starts from `path`. A missing file is an error only when `required`; otherwise
    /// the layers start empty and defaults apply.
    pub fn from_file(path: &Path, required: bool) -> Result<Self, ConfigError> {
        let file = path.display().to_string();
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => String::new(),
            Err(e) => {
                return Err(ConfigError {
                    source: file,
                    key: String::new(),
                    message: format!("cannot read: {e}"),
                });
            }
        };
        Self::from_str(&file, &text)
    }

    /// Starts from TOML text; `name` is how errors refer to it.
    pub fn from_str(name: &str, text: &str) -> Result<Self, ConfigError> {
        let tree: toml::Table = toml::from_str(text).map_err(|e| ConfigError {
            source: name.to_owned(),
            key: String::new(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Ok(Self {
            tree,
            file: name.to_owned(),
            overrides: BTreeMap::new(),
        })
    }

    /// Applies every binding whose variable is set in the process environment.
    pub fn env(self, bindings: &[EnvBinding]) -> Result<Self, ConfigError> {
        self.env_from(bindings, |name| std::env::var(name).ok())
    }

    /// Applies bindings from any lookup, for tests.
    pub fn env_from(
        mut self,
        bindings: &[EnvBinding],
        lookup: impl Fn(&str) -> Option<String>,
    ) -> Result<Self, ConfigError> {
        for &(var, key, kind) in bindings {
            let Some(raw) = lookup(var) else { continue };
            let value = env_value(&raw, kind).map_err(|message| ConfigError {
                source: var.to_owned(),
                key: key.to_owned(),
                message,
            })?;
            self.set(key, value, var);
        }
        Ok(self)
    }

    /// Sets `key` (dotted) to `value`; `origin` (e.g. `--state-dir`) names it in errors.
    pub fn set(&mut self, key: &str, value: toml::Value, origin: &str) {
        let mut table = &mut self.tree;
        let mut parts = key.split('.').peekable();
        while let Some(part) = parts.next() {
            if parts.peek().is_none() {
                table.insert(part.to_owned(), value);
                break;
            }
            let entry = table
                .entry(part.to_owned())
                .or_insert_with(|| toml::Value::Table(toml::Table::new()));
            if !entry.is_table() {
                *entry = toml::Value::Table(toml::Table::new());
            }
            let toml::Value::Table(next) = entry else {
                return;
            };
            table = next;
        }
        self.overrides.insert(key.to_owned(), origin.to_owned());
    }

    /// Sets `key` to a string when `value` is `Some`, e.g. from an optional flag.
    pub fn set_opt(&mut self, key: &str, value: Option<impl Into<String>>, origin: &str) {
        if let Some(v) = value {
            self.set(key, toml::Value::String(v.into()), origin);
        }
    }

    /// Deserialises the merged tree into `T`.
    pub fn build<T: DeserializeOwned>(self) -> Result<T, ConfigError> {
        let Layers { tree, file, overrides } = self;
        serde_path_to_error::deserialize(toml::Value::Table(tree)).map_err(|e| {
            let path = e.path().to_string();
            let key = if path == "." { String::new() } else { path };
            let message = e.into_inner().to_string().trim().to_owned();
            let source = overrides.get(&key).cloned().unwrap_or(file);
            ConfigError { source, key, message }
        })
    }

    /// The name errors use for the file layer.
    pub fn file_name(&self) -> &str {
        &self.file
    }
}

fn env_value(raw: &str, kind: EnvKind) -> Result<toml::Value, String> {
    Ok(match kind {
        EnvKind::Str => toml::Value::String(raw.to_owned()),
        EnvKind::List => toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(|s| toml::Value::String(s.to_owned()))
                .collect(),
        ),
        EnvKind::Int => toml::Value::Integer(
            raw.trim()
                .parse()
                .map_err(|_| format!("expected an integer, got {raw:?}"))?,
        ),
        EnvKind::Bool => toml::Value::Boolean(match raw.trim() {
            "true" | "1" | "yes" => true,
            "false" | "0" | "no" => false,
            _ => return Err(format!("expected true or false, got {raw:?}")),
        }),
    })
}

/// Resolves `path` against `base` unless it is absolute.
pub fn resolve(base: &Path, path: &Path) -> PathBuf {
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base.join(path)
    }
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Conf {
        server: Server,
        #[serde(default)]
        name: String,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    struct Server {
        #[serde(default)]
        hosts: Vec<String>,
        #[serde(default)]
        port: u16,
    }

    fn lookup<'a>(pairs: &'a [(&'a str, &'a str)]) -> impl Fn(&str) -> Option<String> + 'a {
        move |k| pairs.iter().find(|(n, _)| *n == k).map(|(_, v)| (*v).to_owned())
    }

    const ENV: &[EnvBinding] = &[
        ("KEEL_HOSTS", "server.hosts", EnvKind::List),
        ("KEEL_PORT", "server.port", EnvKind::Int),
    ];

    #[test]
    fn layers_override_in_order() {
        let mut l = Layers::from_str("a.toml", "name = \"file\"\n[server]\nport = 1\n")
            .unwrap()
            .env_from(ENV, lookup(&[("KEEL_PORT", "2"), ("KEEL_HOSTS", "a:1, b:2,")]))
            .unwrap();
        l.set("name", toml::Value::String("flag".into()), "--name");
        let c: Conf = l.build().unwrap();
        assert_eq!(c.server.port, 2);
        assert_eq!(c.server.hosts, ["a:1", "b:2"]);
        assert_eq!(c.name, "flag");
    }

    #[test]
    fn unknown_key_is_named() {
        let e = Layers::from_str("a.toml", "[server]\nprot = 1\n")
            .unwrap()
            .build::<Conf>()
            .unwrap_err();
        assert_eq!(e.source, "a.toml");
        assert_eq!(e.key, "server.prot");
        assert!(
            e.to_string().starts_with("a.toml: server.prot: unknown field `prot`"),
            "{e}"
        );
    }

    #[test]
    fn wrong_type_is_named() {
        let e = Layers::from_str("a.toml", "[server]\nport = \"x\"\n")
            .unwrap()
            .build::<Conf>()
            .unwrap_err();
        assert_eq!(e.key, "server.port");
        assert!(e.message.contains("invalid type"), "{e}");
    }

    #[test]
    fn bad_env_value_names_the_variable() {
        let e = Layers::from_str("a.toml", "")
            .unwrap()
            .env_from(ENV, lookup(&[("KEEL_PORT", "many")]))
            .unwrap_err();
        assert_eq!(e.source, "KEEL_PORT");
        assert_eq!(e.key, "server.port");
        let e = Layers::from_str("a.toml", "[server]\n")
            .unwrap()
            .env_from(ENV, lookup(&[("KEEL_PORT", "70000")]))
            .unwrap()
            .build::<Conf>()
            .unwrap_err();
        assert_eq!(e.source, "KEEL_PORT", "{e}");
    }

    #[test]
    fn missing_section_and_syntax_errors() {
        let e = Layers::from_str("a.toml", "").unwrap().build::<Conf>().unwrap_err();
        assert!(e.message.contains("missing field `server`"), "{e}");
        let e = Layers::from_str("a.toml", "[server\n").unwrap_err();
        assert_eq!(e.source, "a.toml");
        assert!(e.key.is_empty());
    }

    #[test]
    fn missing_optional_file_is_empty() {
        let dir = tempfile::tempdir().unwrap();
        let l = Layers::from_file(&dir.path().join("none.toml"), false).unwrap();
        assert!(l.build::<Conf>().is_err());
        assert!(Layers::from_file(&dir.path().join("none.toml"), true).is_err());
    }
}
