//! Starting a plugin process with its pipes: tasks on fd 3, records on fd 4, and
//! high-priority records on fd 5 (Elkeid's, announced by
//! `ELKEID_PLUGIN_HIGH_PRIORITY_PIPE`).
//!
//! This is the agent's only `unsafe`: the `pre_exec` hook that moves the pipe ends
//! onto fds 3, 4 and 5, puts the child into its cgroup and marks every other
//! descriptor from 6 on close-on-exec, before `exec`.
//!
//! Why it is sound: the hook runs in the forked child before `exec`, where only
//! async-signal-safe calls are allowed. It calls only `dup2(2)` and `write(2)` on
//! descriptors opened before the fork, allocates nothing, takes no lock, and
//! reports failure with `io::Error::last_os_error()`, which does not allocate.
//! The source descriptors were moved to numbers ≥ 10 in the parent first, so a
//! `dup2` onto 3, 4 or 5 can never clobber another source.

use std::os::fd::{AsRawFd, OwnedFd};
use std::path::Path;
use std::process::Stdio;

use nix::fcntl::{FcntlArg, OFlag, fcntl};
use tokio::net::unix::pipe;
use tokio::process::{Child, ChildStderr, ChildStdout, Command};

/// A running plugin process and the agent's ends of its pipes.
#[derive(Debug)]
pub struct Spawned {
    /// The process; it leads its own process group.
    pub child: Child,
    /// Its PID (and process group ID).
    pub pid: u32,
    /// Tasks go in here (the plugin reads them on fd 3).
    pub tasks: pipe::Sender,
    /// Records come out here (the plugin writes them on fd 4).
    pub records: pipe::Receiver,
    /// High-priority records come out here (the plugin writes them on fd 5).
    pub high: pipe::Receiver,
    /// The plugin's stdout.
    pub stdout: Option<ChildStdout>,
    /// The plugin's stderr.
    pub stderr: Option<ChildStderr>,
}

fn above_10(fd: OwnedFd) -> std::io::Result<OwnedFd> {
    let raw = fcntl(&fd, FcntlArg::F_DUPFD_CLOEXEC(10)).map_err(std::io::Error::from)?;
    #[allow(unsafe_code)]
    // SAFETY: `raw` is a descriptor fcntl just created and nothing else owns.
    Ok(unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(raw) })
}

/// The variable that tells a plugin fd 5 is its high-priority pipe (Elkeid's
/// plugin libraries look for it).
pub const HIGH_PRIORITY_ENV: &str = "ELKEID_PLUGIN_HIGH_PRIORITY_PIPE";

/// Starts `exe` in `dir` with only `env` (and [`HIGH_PRIORITY_ENV`]), its own
/// process group, the pipes on fds 3, 4 and 5, and (if given) the cgroup `procs`
/// files it writes itself into.
pub fn spawn(exe: &Path, dir: &Path, env: &[(String, String)], cgroup_procs: Vec<OwnedFd>) -> std::io::Result<Spawned> {
    let (task_read, task_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let (record_read, record_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let (high_read, high_write) = nix::unistd::pipe2(OFlag::O_CLOEXEC).map_err(std::io::Error::from)?;
    let child_tasks = above_10(task_read)?;
    let child_records = above_10(record_write)?;
    let child_high = above_10(high_write)?;
    let (t, r, h) = (
        child_tasks.as_raw_fd(),
        child_records.as_raw_fd(),
        child_high.as_raw_fd(),
    );
    let procs: Vec<i32> = cgroup_procs.iter().map(AsRawFd::as_raw_fd).collect();

    let mut cmd = Command::new(exe);
    cmd.current_dir(dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        .env(HIGH_PRIORITY_ENV, "5")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    #[allow(unsafe_code)]
    // SAFETY: see the module documentation; the closure only calls dup2, write,
    // close_range (or fcntl) and getrlimit, all async-signal-safe.
    unsafe {
        cmd.pre_exec(move || {
            if libc_dup2(t, 3) < 0 || libc_dup2(r, 4) < 0 || libc_dup2(h, 5) < 0 {
                return Err(std::io::Error::last_os_error());
            }
            for fd in &procs {
                // "0" moves the writing process itself into the cgroup.
                if libc_write(*fd, b"0") < 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
            close_on_exec_from(6);
            Ok(())
        });
    }
    let mut child = spawn_when_not_busy(&mut cmd)?;
    drop((child_tasks, child_records, child_high, cgroup_procs));
    let pid = child.id().unwrap_or_default();
    Ok(Spawned {
        pid,
        tasks: pipe::Sender::from_owned_fd(task_write)?,
        records: pipe::Receiver::from_owned_fd(record_read)?,
        high: pipe::Receiver::from_owned_fd(high_read)?,
        stdout: child.stdout.take(),
        stderr: child.stderr.take(),
        child,
    })
}

/// How often a start refused with ETXTBSY is tried again, and how long apart.
const BUSY_TRIES: u32 = 20;
const BUSY_PAUSE: std::time::Duration = std::time::Duration::from_millis(5);

/// `cmd.spawn()`, tried again while `exec` says the file is busy (ETXTBSY).
///
/// A freshly installed executable was written through a descriptor that is closed
/// by the time it starts, but a fork made meanwhile by another thread (another
/// plugin starting) holds a copy of that descriptor until its child execs and the
/// copy closes on exec. For that moment, Linux refuses to execute the file. It
/// passes within milliseconds, so the start is tried again, at most
/// `BUSY_TRIES` times, `BUSY_PAUSE` apart (a blocking pause: 100 ms at worst).
fn spawn_when_not_busy(cmd: &mut Command) -> std::io::Result<Child> {
    let mut tries = 1;
    loop {
        match cmd.spawn() {
            Err(e) if e.raw_os_error() == Some(nix::libc::ETXTBSY) && tries < BUSY_TRIES => {
                tries += 1;
                std::thread::sleep(BUSY_PAUSE);
            }
            other => return other,
        }
    }
}

/// Marks every descriptor from `first` on close-on-exec, so the plugin inherits
/// only 0–5 whatever the agent was given by its parent. Marked rather than closed:
/// the spawner's own pipe, which reports a failed `exec`, must stay open until then.
fn close_on_exec_from(first: u32) {
    const CLOSE_RANGE_CLOEXEC: u32 = 1 << 2;
    #[allow(unsafe_code)]
    // SAFETY: close_range takes integers only; it changes descriptor flags.
    let done = unsafe { nix::libc::syscall(nix::libc::SYS_close_range, first, u32::MAX, CLOSE_RANGE_CLOEXEC) };
    if done == 0 {
        return;
    }
    // Before Linux 5.11: one descriptor at a time, up to the process's limit.
    let limit =
        nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE).map_or(1024, |(soft, _)| soft);
    let first = i32::try_from(first).unwrap_or(i32::MAX);
    for fd in first..i32::try_from(limit.min(1 << 20)).unwrap_or(1024) {
        #[allow(unsafe_code)]
        // SAFETY: fcntl on an integer descriptor; a closed one gives EBADF.
        unsafe {
            nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
        }
    }
}

fn libc_dup2(from: i32, to: i32) -> i32 {
    #[allow(unsafe_code)]
    // SAFETY: dup2 on integer descriptors has no memory-safety preconditions.
    unsafe {
        nix::libc::dup2(from, to)
    }
}

fn libc_write(fd: i32, bytes: &[u8]) -> isize {
    #[allow(unsafe_code)]
    // SAFETY: `bytes` is a live slice for the duration of the call.
    unsafe {
        nix::libc::write(fd, bytes.as_ptr().cast(), bytes.len())
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;

    use super::*;

    /// A script that would exit 0, in a directory of its own, still open for writing.
    fn script_open_for_writing() -> (tempfile::TempDir, std::path::PathBuf, std::fs::File) {
        let dir = tempfile::tempdir().unwrap();
        let exe = dir.path().join("plugin");
        let mut writer = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o755)
            .open(&exe)
            .unwrap();
        writer.write_all(b"#!/bin/sh\nexit 0\n").unwrap();
        (dir, exe, writer)
    }

    #[tokio::test]
    async fn a_start_waits_out_a_descriptor_still_open_for_writing() {
        let (dir, exe, writer) = script_open_for_writing();
        // While the file is open for writing, exec refuses it; the writer lets go
        // 30 ms later, as a sibling's fork does when its child execs.
        let held = std::thread::spawn(move || {
            std::thread::sleep(std::time::Duration::from_millis(30));
            drop(writer);
        });
        let mut spawned = spawn(&exe, dir.path(), &[], Vec::new()).expect("started once the file was free");
        held.join().unwrap();
        assert!(spawned.child.wait().await.unwrap().success());
    }

    #[tokio::test]
    async fn a_file_that_stays_busy_fails_with_the_reason() {
        let (dir, exe, writer) = script_open_for_writing();
        let e = spawn(&exe, dir.path(), &[], Vec::new()).unwrap_err();
        assert_eq!(e.raw_os_error(), Some(nix::libc::ETXTBSY), "{e}");
        drop(writer);
    }
}
