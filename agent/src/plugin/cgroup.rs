//! Per-plugin cgroups with memory, CPU and process limits, on cgroup v2 or v1.
//!
//! Written against the cgroup filesystem directly rather than with cgroups-rs: the
//! agent needs a few file writes, and that crate brings a D-Bus client (zbus) and
//! a second `nix` into a binary that should stay small.
//!
//! The agent creates `keel-plugins-<instance>/<name>` below its own cgroup (with
//! systemd's `Delegate=yes` that subtree is the agent's to manage). The instance
//! is derived from the agent's state directory ([`instance`]), so that agents that
//! share a cgroup (started by hand, or by a test harness) never share, limit or
//! sweep each other's plugins, while a restarted agent finds its own again. A
//! plugin enters its
//! cgroup itself, before `exec`, by writing `0` to each `cgroup.procs` (see
//! `spawn`), so not even its first instruction runs unlimited.

use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};

use crate::config::PluginLimits;

/// The subtree's name, before the instance.
const SUBTREE: &str = "keel-plugins";
/// Hex digits of the state directory's digest in the subtree's name.
const INSTANCE_HEX: usize = 8;
const CPU_PERIOD_US: u64 = 100_000;

/// Where plugin cgroups go.
#[derive(Debug, Clone)]
pub enum Cgroups {
    /// Unified hierarchy.
    V2 {
        /// `<mount>/<own cgroup>/keel-plugins-<instance>`.
        base: PathBuf,
    },
    /// Legacy hierarchies, one per controller.
    V1 {
        /// `<memory mount>/<own memory cgroup>/keel-plugins-<instance>`.
        memory: PathBuf,
        /// Same for cpu.
        cpu: Option<PathBuf>,
        /// Same for pids.
        pids: Option<PathBuf>,
    },
}

/// One plugin's cgroup.
#[derive(Debug, Clone)]
pub struct PluginCgroup {
    dirs: Vec<PathBuf>,
    memory: PathBuf,
    v2: bool,
}

struct Mount {
    point: PathBuf,
    fstype: String,
    options: String,
}

fn mounts() -> Vec<Mount> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let (pre, post) = l.split_once(" - ")?;
            let point = pre.split_whitespace().nth(4)?;
            let mut post = post.split_whitespace();
            let fstype = post.next()?.to_owned();
            let options = post.nth(1).unwrap_or_default().to_owned();
            Some(Mount {
                point: PathBuf::from(point),
                fstype,
                options,
            })
        })
        .collect()
}

/// This process's cgroup path per controller (`""` for v2).
fn own_paths() -> Vec<(String, String)> {
    let text = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    text.lines()
        .filter_map(|l| {
            let mut parts = l.splitn(3, ':');
            let _id = parts.next()?;
            Some((parts.next()?.to_owned(), parts.next()?.to_owned()))
        })
        .collect()
}

/// The name of this agent's plugin subtree: `keel-plugins-` and the first
/// [`INSTANCE_HEX`] hex digits of SHA-256 of its (canonical) state directory.
pub fn instance(state_dir: &Path) -> String {
    let dir = state_dir.canonicalize().unwrap_or_else(|_| state_dir.to_owned());
    let digest = hex::encode(Sha256::digest(dir.as_os_str().as_encoded_bytes()));
    format!("{SUBTREE}-{}", &digest[..INSTANCE_HEX])
}

fn join(mount: &Path, own: &str, subtree: &str) -> PathBuf {
    mount.join(own.trim_start_matches('/')).join(subtree)
}

fn writable_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    // Probe: creating and removing a child cgroup is what we will do for real.
    let probe = dir.join(".probe");
    std::fs::create_dir(&probe).or_else(|e| {
        if e.kind() == std::io::ErrorKind::AlreadyExists {
            Ok(())
        } else {
            Err(e)
        }
    })?;
    std::fs::remove_dir(&probe)
}

fn v2_setup(mount: &Path, own: &str, subtree: &str) -> std::io::Result<PathBuf> {
    let own_dir = mount.join(own.trim_start_matches('/'));
    let base = own_dir.join(subtree);
    std::fs::create_dir_all(&base)?;
    // No process may sit in a cgroup whose children have controllers: move the agent
    // into a leaf of its own before enabling controllers below its cgroup.
    if own != "/" {
        let leaf = own_dir.join("keel-agent");
        std::fs::create_dir_all(&leaf)?;
        std::fs::write(leaf.join("cgroup.procs"), std::process::id().to_string())?;
    }
    let wanted = ["+memory", "+cpu", "+pids"];
    for dir in [&own_dir, &base] {
        for c in wanted {
            // A controller the parent does not offer is left out; the limit for it
            // then simply does not apply.
            let _ = std::fs::write(dir.join("cgroup.subtree_control"), c);
        }
    }
    writable_dir(&base)?;
    Ok(base)
}

/// Finds a writable cgroup hierarchy for the plugin subtree named `subtree` (see
/// [`instance`]), or says why there is none.
pub fn detect(subtree: &str) -> Result<Cgroups, String> {
    let mounts = mounts();
    let own = own_paths();
    if let Some(m) = mounts.iter().find(|m| m.fstype == "cgroup2") {
        let unified_only = !mounts
            .iter()
            .any(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == "memory"));
        if unified_only {
            let path = own
                .iter()
                .find(|(c, _)| c.is_empty())
                .map(|(_, p)| p.clone())
                .unwrap_or_else(|| "/".into());
            return v2_setup(&m.point, &path, subtree)
                .map(|base| Cgroups::V2 { base })
                .map_err(|e| format!("cgroup v2 at {} is not writable: {e}", m.point.display()));
        }
    }
    let controller = |name: &str| -> Option<PathBuf> {
        let mount = mounts
            .iter()
            .find(|m| m.fstype == "cgroup" && m.options.split(',').any(|o| o == name))?;
        let own = own
            .iter()
            .find(|(c, _)| c.split(',').any(|x| x == name))
            .map(|(_, p)| p.clone())?;
        Some(join(&mount.point, &own, subtree))
    };
    let memory = controller("memory").ok_or("no cgroup v1 memory controller is mounted")?;
    writable_dir(&memory)
        .map_err(|e| format!("cgroup v1 memory hierarchy {} is not writable: {e}", memory.display()))?;
    let cpu = controller("cpu").filter(|p| writable_dir(p).is_ok());
    let pids = controller("pids").filter(|p| writable_dir(p).is_ok());
    Ok(Cgroups::V1 { memory, cpu, pids })
}

fn write(dir: &Path, file: &str, value: &str) -> std::io::Result<()> {
    std::fs::write(dir.join(file), value)
        .map_err(|e| std::io::Error::new(e.kind(), format!("{}: {e}", dir.join(file).display())))
}

impl Cgroups {
    /// Creates (or reuses) the cgroup of `plugin` and applies `limits`.
    pub fn create(&self, plugin: &str, limits: &PluginLimits) -> std::io::Result<PluginCgroup> {
        let quota = u64::from(limits.cpu_max_percent) * CPU_PERIOD_US / 100;
        match self {
            Cgroups::V2 { base } => {
                let dir = base.join(plugin);
                std::fs::create_dir_all(&dir)?;
                write(&dir, "memory.max", &limits.memory_max_bytes.to_string())?;
                // Without swap accounting a capped process would swap instead of being stopped.
                let _ = write(&dir, "memory.swap.max", "0");
                let _ = write(&dir, "cpu.max", &format!("{quota} {CPU_PERIOD_US}"));
                let _ = write(&dir, "pids.max", &limits.pids_max.to_string());
                Ok(PluginCgroup {
                    dirs: vec![dir.clone()],
                    memory: dir,
                    v2: true,
                })
            }
            Cgroups::V1 { memory, cpu, pids } => {
                let mem = memory.join(plugin);
                std::fs::create_dir_all(&mem)?;
                write(&mem, "memory.limit_in_bytes", &limits.memory_max_bytes.to_string())?;
                let _ = write(
                    &mem,
                    "memory.memsw.limit_in_bytes",
                    &limits.memory_max_bytes.to_string(),
                );
                let mut dirs = vec![mem.clone()];
                if let Some(cpu) = cpu {
                    let d = cpu.join(plugin);
                    std::fs::create_dir_all(&d)?;
                    write(&d, "cpu.cfs_period_us", &CPU_PERIOD_US.to_string())?;
                    write(&d, "cpu.cfs_quota_us", &quota.to_string())?;
                    dirs.push(d);
                }
                if let Some(pids) = pids {
                    let d = pids.join(plugin);
                    std::fs::create_dir_all(&d)?;
                    write(&d, "pids.max", &limits.pids_max.to_string())?;
                    dirs.push(d);
                }
                Ok(PluginCgroup {
                    dirs,
                    memory: mem,
                    v2: false,
                })
            }
        }
    }

    /// Removes the subtree if it is empty (every plugin stopped), as the agent exits.
    pub fn remove(&self) {
        let dirs = match self {
            Cgroups::V2 { base } => vec![base],
            Cgroups::V1 { memory, cpu, pids } => std::iter::once(memory).chain(cpu).chain(pids).collect(),
        };
        for d in dirs {
            let _ = std::fs::remove_dir(d);
        }
    }

    /// A short description for logs.
    pub fn describe(&self) -> String {
        match self {
            Cgroups::V2 { base } => format!("cgroup v2 at {}", base.display()),
            Cgroups::V1 { memory, cpu, pids } => format!(
                "cgroup v1 at {} (cpu: {}, pids: {})",
                memory.display(),
                cpu.is_some(),
                pids.is_some()
            ),
        }
    }
}

impl PluginCgroup {
    /// `cgroup.procs` of every hierarchy, opened for the child to write itself in.
    pub fn open_procs(&self) -> std::io::Result<Vec<OwnedFd>> {
        self.dirs
            .iter()
            .map(|d| {
                std::fs::OpenOptions::new()
                    .write(true)
                    .open(d.join("cgroup.procs"))
                    .map(OwnedFd::from)
            })
            .collect()
    }

    /// How often the kernel's OOM killer has killed in this cgroup.
    pub fn oom_kills(&self) -> u64 {
        let file = if self.v2 { "memory.events" } else { "memory.oom_control" };
        let text = std::fs::read_to_string(self.memory.join(file)).unwrap_or_default();
        text.lines()
            .find_map(|l| l.strip_prefix("oom_kill ").and_then(|v| v.trim().parse().ok()))
            .unwrap_or(0)
    }

    /// PIDs still in the cgroup.
    pub fn pids(&self) -> Vec<i32> {
        std::fs::read_to_string(self.memory.join("cgroup.procs"))
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().parse().ok())
            .collect()
    }

    /// Removes the cgroup once it is empty.
    pub fn remove(&self) {
        for d in &self.dirs {
            let _ = std::fs::remove_dir(d);
        }
    }
}
