//! Getting a plugin package onto disk safely: download (each URL in turn, with
//! timeouts and a size cap), check the SHA-256 and the Ed25519 signature against
//! the release key pinned in `agent.toml`, unpack refusing anything that would
//! escape the plugin's directory, and swap directories so the old version stays
//! until the new one runs.
//!
//! Layout under the plugin directory: `<name>/` is the installed plugin with its
//! executable `<name>/<name>`; `.staging/` holds downloads and unpacked packages;
//! `.old/` holds the previous version during an upgrade.

use std::io::{Read, Write};
use std::path::{Component, Path, PathBuf};
use std::time::Duration;

use ed25519_dalek::{Signature, VerifyingKey};
use keel_common::ids::valid_plugin_name;
use sha2::{Digest, Sha256};

use super::{PackageKind, PluginConfig};

/// Entries accepted in one archive.
const MAX_ENTRIES: usize = 10_000;

/// Why a package was refused. Each names the check that failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InstallError {
    /// The name is not `^[A-Za-z0-9_-]+$`.
    #[error("invalid plugin name {0:?}: must match ^[A-Za-z0-9_-]+$")]
    Name(String),
    /// No release key is pinned.
    #[error("no release key pinned (plugins.release_public_key in agent.toml); refusing to install")]
    NoKey,
    /// The config names no URL.
    #[error("no download URL")]
    NoUrl,
    /// Every URL failed.
    #[error("download failed from every URL: {0}")]
    Download(String),
    /// The package is larger than allowed.
    #[error("package larger than {0} bytes")]
    TooLarge(u64),
    /// The hash differs.
    #[error("sha256 mismatch: expected {expected}, got {actual}")]
    Sha256 {
        /// From the config.
        expected: String,
        /// Of the download.
        actual: String,
    },
    /// The signature is malformed or does not verify.
    #[error("signature check failed: {0}")]
    Signature(String),
    /// The type is neither `exec` nor `tar.gz`.
    #[error("unknown package type {0:?}: expected exec or tar.gz")]
    Kind(String),
    /// An archive entry would escape or is of a refused kind.
    #[error("unsafe archive entry {path:?}: {reason}")]
    Archive {
        /// The entry's path.
        path: String,
        /// Why.
        reason: &'static str,
    },
    /// The archive lacks `<name>` at its top.
    #[error("package has no executable {0:?} at its top level")]
    NoExecutable(String),
    /// A packaged plugin of the local set is not where only root can change it.
    #[error("packaged plugin not trusted: {0}")]
    Untrusted(String),
    /// Local I/O failed.
    #[error("{0}")]
    Io(String),
}

fn io(context: &str) -> impl FnOnce(std::io::Error) -> InstallError + '_ {
    move |e| InstallError::Io(format!("{context}: {e}"))
}

/// Downloads, verifies and stages packages.
#[derive(Debug, Clone)]
pub struct Installer {
    root: PathBuf,
    key: Option<VerifyingKey>,
    client: reqwest::Client,
    timeout: Duration,
    max_bytes: u64,
}

fn random_suffix() -> String {
    format!("{:016x}", rand::random::<u64>())
}

impl Installer {
    /// An installer for `root` (the plugin directory). `tls` verifies HTTPS
    /// download URLs (the pinned Keel CA).
    pub fn new(
        root: PathBuf,
        key: Option<VerifyingKey>,
        tls: Option<rustls::ClientConfig>,
        timeout: Duration,
        max_bytes: u64,
    ) -> Result<Self, InstallError> {
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .no_proxy();
        if let Some(tls) = tls {
            builder = builder.tls_backend_preconfigured(tls);
        }
        let client = builder
            .build()
            .map_err(|e| InstallError::Io(format!("HTTP client: {e}")))?;
        Ok(Self {
            root,
            key,
            client,
            timeout,
            max_bytes,
        })
    }

    fn staging(&self) -> PathBuf {
        self.root.join(".staging")
    }

    /// The installed directory of a plugin.
    pub fn dir(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    async fn download_one(&self, url: &str, to: &Path) -> Result<String, String> {
        let fetch = async {
            let mut resp = self
                .client
                .get(url)
                .send()
                .await
                .map_err(|e| keel_common::error_chain(&e))?;
            if !resp.status().is_success() {
                return Err(format!("HTTP {}", resp.status()));
            }
            if resp.content_length().is_some_and(|l| l > self.max_bytes) {
                return Err(InstallError::TooLarge(self.max_bytes).to_string());
            }
            let mut file = std::fs::File::create(to).map_err(|e| e.to_string())?;
            let mut hasher = Sha256::new();
            let mut total = 0u64;
            while let Some(chunk) = resp.chunk().await.map_err(|e| keel_common::error_chain(&e))? {
                total += chunk.len() as u64;
                if total > self.max_bytes {
                    return Err(InstallError::TooLarge(self.max_bytes).to_string());
                }
                hasher.update(&chunk);
                file.write_all(&chunk).map_err(|e| e.to_string())?;
            }
            file.sync_all().map_err(|e| e.to_string())?;
            Ok(hex::encode(hasher.finalize()))
        };
        match tokio::time::timeout(self.timeout, fetch).await {
            Ok(r) => r,
            Err(_) => Err(format!("timed out after {:?}", self.timeout)),
        }
    }

    /// Downloads a package to `to` (trying each URL), and checks its SHA-256 and its
    /// signature against the pinned release key. Returns its bytes. On failure `to`
    /// is removed.
    pub async fn fetch_verified(
        &self,
        what: &str,
        urls: &[String],
        sha256: &str,
        signature: &str,
        to: &Path,
    ) -> Result<Vec<u8>, InstallError> {
        let key = self.key.ok_or(InstallError::NoKey)?;
        if urls.is_empty() {
            return Err(InstallError::NoUrl);
        }
        let mut failures = Vec::new();
        let mut digest = None;
        for url in urls {
            match self.download_one(url, to).await {
                Ok(d) => {
                    digest = Some(d);
                    break;
                }
                Err(e) => {
                    tracing::warn!(package = what, %url, error = %e, "download failed; trying the next URL");
                    failures.push(format!("{url}: {e}"));
                }
            }
        }
        let checked = (|| {
            let digest = digest.ok_or_else(|| InstallError::Download(failures.join("; ")))?;
            if !digest.eq_ignore_ascii_case(sha256.trim()) {
                return Err(InstallError::Sha256 {
                    expected: sha256.to_owned(),
                    actual: digest,
                });
            }
            let bytes = std::fs::read(to).map_err(io("reading the package"))?;
            verify(&key, &bytes, signature)?;
            Ok(bytes)
        })();
        if checked.is_err() {
            let _ = std::fs::remove_file(to);
        }
        checked
    }

    /// Downloads and verifies a package, and unpacks it into a staging directory.
    pub async fn stage(&self, cfg: &PluginConfig) -> Result<PathBuf, InstallError> {
        if !valid_plugin_name(&cfg.name) {
            return Err(InstallError::Name(cfg.name.clone()));
        }
        let kind = cfg.kind.clone().map_err(InstallError::Kind)?;
        std::fs::create_dir_all(self.staging()).map_err(io("staging directory"))?;
        let suffix = random_suffix();
        let bytes = match &cfg.local {
            Some(path) => self.read_local(path, &cfg.sha256)?,
            None => {
                let package = self.staging().join(format!("{}.{suffix}.pkg", cfg.name));
                let bytes = self
                    .fetch_verified(&cfg.name, &cfg.download_urls, &cfg.sha256, &cfg.signature, &package)
                    .await?;
                let _ = std::fs::remove_file(&package);
                bytes
            }
        };
        let staged = self.staging().join(format!("{}.{suffix}", cfg.name));
        std::fs::create_dir_all(&staged).map_err(io("staging directory"))?;
        let unpacked = match kind {
            PackageKind::Exec => write_exec(&staged.join(&cfg.name), &bytes),
            PackageKind::TarGz => unpack(&bytes, &staged, self.max_bytes),
        }
        .and_then(|()| match std::fs::symlink_metadata(staged.join(&cfg.name)) {
            Ok(m) if m.is_file() => Ok(()),
            _ => Err(InstallError::NoExecutable(cfg.name.clone())),
        });
        if let Err(e) = unpacked {
            let _ = std::fs::remove_dir_all(&staged);
            return Err(e);
        }
        Ok(staged)
    }

    /// Reads a packaged plugin of the local set. It is trusted for where it is, like
    /// the agent's own binary: a regular file (not a link) in directories that only
    /// root or the agent's user own and can write (a sticky directory such as /tmp
    /// may be writable by all: nobody else can replace what is in it), checked by
    /// the one implementation of that rule ([`keel_plugin_sdk::trust`]), and with
    /// the hash it had when the set was read.
    fn read_local(&self, path: &Path, sha256: &str) -> Result<Vec<u8>, InstallError> {
        let trusted = keel_plugin_sdk::trust::check_trusted(path)
            .map_err(|e| InstallError::Untrusted(format!("{}: {e}", path.display())))?;
        if trusted.metadata.len() > self.max_bytes {
            return Err(InstallError::TooLarge(self.max_bytes));
        }
        let path = &trusted.path;
        let bytes = std::fs::read(path).map_err(io("reading the packaged plugin"))?;
        let actual = hex::encode(Sha256::digest(&bytes));
        if !actual.eq_ignore_ascii_case(sha256) {
            return Err(InstallError::Sha256 {
                expected: sha256.to_owned(),
                actual,
            });
        }
        Ok(bytes)
    }

    /// Puts a staged package in place. Returns where the previous version went.
    pub fn activate(&self, name: &str, staged: &Path) -> Result<Option<PathBuf>, InstallError> {
        let current = self.dir(name);
        let old = if current.exists() {
            let old_root = self.root.join(".old");
            std::fs::create_dir_all(&old_root).map_err(io("old directory"))?;
            let old = old_root.join(format!("{name}.{}", random_suffix()));
            std::fs::rename(&current, &old).map_err(io("moving the old version aside"))?;
            Some(old)
        } else {
            None
        };
        if let Err(e) = std::fs::rename(staged, &current) {
            if let Some(old) = &old {
                let _ = std::fs::rename(old, &current);
            }
            return Err(InstallError::Io(format!("moving the new version in place: {e}")));
        }
        Ok(old)
    }

    /// Puts the previous version back after a failed upgrade.
    pub fn restore(&self, name: &str, old: &Path) -> Result<(), InstallError> {
        let current = self.dir(name);
        let failed = self.staging().join(format!("{name}.failed.{}", random_suffix()));
        if current.exists() {
            std::fs::rename(&current, &failed).map_err(io("moving the failed version aside"))?;
            let _ = std::fs::remove_dir_all(&failed);
        }
        std::fs::rename(old, &current).map_err(io("restoring the previous version"))
    }

    /// Deletes a plugin's directory.
    pub fn remove(&self, name: &str) {
        let dir = self.dir(name);
        if let Err(e) = std::fs::remove_dir_all(&dir)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            tracing::warn!(error = %e, "cannot delete the plugin directory");
        }
    }

    /// Clears leftovers of interrupted installs.
    pub fn clean(&self) {
        for d in [self.staging(), self.root.join(".old")] {
            let _ = std::fs::remove_dir_all(d);
        }
    }
}

/// Checks a hex Ed25519 signature over `bytes`.
pub fn verify(key: &VerifyingKey, bytes: &[u8], signature_hex: &str) -> Result<(), InstallError> {
    let raw: [u8; 64] = hex::decode(signature_hex.trim())
        .map_err(|_| InstallError::Signature("signature is not hex".into()))?
        .try_into()
        .map_err(|_| InstallError::Signature("signature is not 64 bytes".into()))?;
    key.verify_strict(bytes, &Signature::from_bytes(&raw))
        .map_err(|_| InstallError::Signature("does not verify against the pinned release key".into()))
}

fn write_exec(path: &Path, bytes: &[u8]) -> Result<(), InstallError> {
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o755)
        .open(path)
        .map_err(io("writing the executable"))?;
    f.write_all(bytes).map_err(io("writing the executable"))
}

fn refuse(path: &Path, reason: &'static str) -> InstallError {
    InstallError::Archive {
        path: path.display().to_string(),
        reason,
    }
}

/// Checks that `rel` is a plain relative path and that no existing ancestor
/// inside `root` is a symlink.
fn checked_target(root: &Path, rel: &Path) -> Result<PathBuf, InstallError> {
    let mut out = root.to_path_buf();
    let comps: Vec<Component<'_>> = rel.components().filter(|c| !matches!(c, Component::CurDir)).collect();
    for (i, c) in comps.iter().enumerate() {
        match c {
            Component::Normal(part) => out.push(part),
            Component::ParentDir => return Err(refuse(rel, "contains '..'")),
            Component::RootDir | Component::Prefix(_) => return Err(refuse(rel, "absolute path")),
            Component::CurDir => {}
        }
        if i + 1 < comps.len() && std::fs::symlink_metadata(&out).is_ok_and(|m| m.file_type().is_symlink()) {
            return Err(refuse(rel, "passes through a symlink"));
        }
    }
    Ok(out)
}

/// Whether a symlink at `link` (relative to root) pointing to `target` stays inside.
fn link_stays_inside(link: &Path, target: &Path) -> bool {
    if target.is_absolute() {
        return false;
    }
    let mut depth: i64 = 0;
    for c in link
        .parent()
        .into_iter()
        .flat_map(Path::components)
        .chain(target.components())
    {
        match c {
            Component::Normal(_) => depth += 1,
            Component::ParentDir => depth -= 1,
            Component::CurDir => {}
            _ => return false,
        }
        if depth < 0 {
            return false;
        }
    }
    true
}

/// Unpacks a tar.gz into `into`, refusing entries that would escape it.
pub fn unpack(bytes: &[u8], into: &Path, max_bytes: u64) -> Result<(), InstallError> {
    use tar::EntryType;
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(bytes));
    let mut total = 0u64;
    let entries = archive
        .entries()
        .map_err(|e| InstallError::Io(format!("not a tar.gz: {e}")))?;
    for (n, entry) in entries.enumerate() {
        if n >= MAX_ENTRIES {
            return Err(InstallError::Io(format!("archive has more than {MAX_ENTRIES} entries")));
        }
        let mut entry = entry.map_err(|e| InstallError::Io(format!("corrupt archive: {e}")))?;
        let rel = entry
            .path()
            .map_err(|e| InstallError::Io(format!("corrupt archive path: {e}")))?
            .into_owned();
        if rel.as_os_str().is_empty() || rel == Path::new(".") || rel == Path::new("./") {
            continue;
        }
        let target = checked_target(into, &rel)?;
        match entry.header().entry_type() {
            EntryType::Directory => std::fs::create_dir_all(&target).map_err(io("creating a directory"))?,
            EntryType::Regular | EntryType::Continuous => {
                total += entry.header().size().unwrap_or(0);
                if total > max_bytes {
                    return Err(InstallError::TooLarge(max_bytes));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating a directory"))?;
                }
                let mode = entry.header().mode().unwrap_or(0o644) & 0o755;
                let mut data = Vec::new();
                entry
                    .read_to_end(&mut data)
                    .map_err(|e| InstallError::Io(format!("corrupt archive: {e}")))?;
                use std::os::unix::fs::OpenOptionsExt;
                let mut f = std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .mode(mode)
                    .open(&target)
                    .map_err(|e| InstallError::Io(format!("writing {}: {e}", rel.display())))?;
                f.write_all(&data).map_err(io("writing a file"))?;
            }
            EntryType::Symlink => {
                let link = entry
                    .link_name()
                    .map_err(|e| InstallError::Io(format!("corrupt archive: {e}")))?
                    .ok_or_else(|| refuse(&rel, "symlink without a target"))?
                    .into_owned();
                if !link_stays_inside(&rel, &link) {
                    return Err(refuse(&rel, "symlink points outside the plugin directory"));
                }
                if let Some(parent) = target.parent() {
                    std::fs::create_dir_all(parent).map_err(io("creating a directory"))?;
                }
                std::os::unix::fs::symlink(&link, &target).map_err(io("creating a symlink"))?;
            }
            EntryType::Link => return Err(refuse(&rel, "hard links are not allowed")),
            _ => return Err(refuse(&rel, "only files, directories and symlinks are allowed")),
        }
    }
    Ok(())
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    #[test]
    fn packaged_plugins_are_trusted_only_where_nobody_else_can_change_them() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        keel_common::tls::install_crypto_provider();
        let installer = Installer::new(dir.path().join("p"), None, None, Duration::from_secs(1), 1 << 20).unwrap();
        let local = dir.path().join("local");
        std::fs::create_dir(&local).unwrap();
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();
        let exe = local.join("echo");
        std::fs::write(&exe, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();
        let sha = hex::encode(Sha256::digest(b"#!/bin/sh\n"));
        assert_eq!(installer.read_local(&exe, &sha).unwrap(), b"#!/bin/sh\n");

        let e = installer.read_local(&exe, &"0".repeat(64)).unwrap_err();
        assert!(
            matches!(e, InstallError::Sha256 { .. }),
            "changed since the set was read: {e}"
        );

        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o775)).unwrap();
        let e = installer.read_local(&exe, &sha).unwrap_err().to_string();
        assert!(e.contains("the file") && e.contains("writable by others"), "{e}");
        std::fs::set_permissions(&exe, std::fs::Permissions::from_mode(0o755)).unwrap();

        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o777)).unwrap();
        let e = installer.read_local(&exe, &sha).unwrap_err().to_string();
        assert!(e.contains("the directory") && e.contains("writable by others"), "{e}");
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o1777)).unwrap();
        assert!(installer.read_local(&exe, &sha).is_ok(), "a sticky directory is fine");
        std::fs::set_permissions(&local, std::fs::Permissions::from_mode(0o755)).unwrap();

        let link = local.join("link");
        std::os::unix::fs::symlink(&exe, &link).unwrap();
        let e = installer.read_local(&link, &sha).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");
        let e = installer
            .read_local(&local.join("missing"), &sha)
            .unwrap_err()
            .to_string();
        assert!(e.contains("not trusted") && e.contains("missing"), "{e}");
    }

    /// Builds a tar.gz from (path, kind) entries; kind "file:<data>", "dir", "link:<target>", "hard:<target>".
    pub(crate) fn targz(entries: &[(&str, &str)]) -> Vec<u8> {
        let gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        let mut b = tar::Builder::new(gz);
        for (path, kind) in entries {
            let mut h = tar::Header::new_gnu();
            // Write the raw name so that '..' and absolute paths reach the archive.
            let name = path.as_bytes();
            h.as_old_mut().name[..name.len()].copy_from_slice(name);
            if let Some(data) = kind.strip_prefix("file:") {
                h.set_entry_type(tar::EntryType::Regular);
                h.set_size(data.len() as u64);
                h.set_mode(0o4755);
                h.set_cksum();
                b.append(&h, data.as_bytes()).unwrap();
            } else if *kind == "dir" {
                h.set_entry_type(tar::EntryType::Directory);
                h.set_size(0);
                h.set_mode(0o755);
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            } else {
                let (ty, target) = kind.split_once(':').unwrap();
                h.set_entry_type(if ty == "link" {
                    tar::EntryType::Symlink
                } else {
                    tar::EntryType::Link
                });
                h.set_size(0);
                h.set_link_name(target).unwrap();
                h.set_cksum();
                b.append(&h, &[][..]).unwrap();
            }
        }
        b.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn safe_archive_unpacks_without_setuid() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let bytes = targz(&[
            ("p", "file:#!/bin/sh"),
            ("lib", "dir"),
            ("lib/a.txt", "file:x"),
            ("lib/b", "link:a.txt"),
        ]);
        unpack(&bytes, dir.path(), 1 << 20).unwrap();
        assert_eq!(std::fs::read_to_string(dir.path().join("lib/b")).unwrap(), "x");
        let mode = std::fs::metadata(dir.path().join("p")).unwrap().permissions().mode() & 0o7777;
        assert_eq!(mode, 0o755, "setuid bit stripped");
    }

    #[test]
    fn escaping_entries_are_refused() {
        let cases: [(&[(&str, &str)], &str); 6] = [
            (&[("../evil", "file:x")], "contains '..'"),
            (&[("/etc/evil", "file:x")], "absolute path"),
            (&[("out", "link:../../etc")], "symlink points outside"),
            (&[("abs", "link:/etc/passwd")], "symlink points outside"),
            (&[("d", "link:."), ("d/x", "file:y")], "passes through a symlink"),
            (&[("h", "hard:/etc/passwd")], "hard links"),
        ];
        for (entries, reason) in cases {
            let dir = tempfile::tempdir().unwrap();
            let inner = dir.path().join("plugin");
            std::fs::create_dir(&inner).unwrap();
            let e = unpack(&targz(entries), &inner, 1 << 20).unwrap_err();
            assert!(e.to_string().contains(reason), "{entries:?}: {e}");
            assert!(!dir.path().join("evil").exists());
        }
    }

    #[test]
    fn unpacked_size_is_capped() {
        let dir = tempfile::tempdir().unwrap();
        let big = "x".repeat(2000);
        let e = unpack(&targz(&[("a", &format!("file:{big}"))]), dir.path(), 1000).unwrap_err();
        assert_eq!(e, InstallError::TooLarge(1000));
    }

    #[test]
    fn signatures_must_verify() {
        let sk = ed25519_dalek::SigningKey::from_bytes(&[7u8; 32]);
        let vk = sk.verifying_key();
        use ed25519_dalek::Signer;
        let sig = hex::encode(sk.sign(b"package").to_bytes());
        verify(&vk, b"package", &sig).unwrap();
        assert!(verify(&vk, b"tampered", &sig).is_err());
        assert!(verify(&vk, b"package", "zz").is_err());
    }
}
