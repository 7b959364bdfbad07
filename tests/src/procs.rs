//! [`Supervisor`]: an agent process restarted whenever it exits, in place of
//! systemd.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::Agent;

/// An agent process restarted whenever it exits, as systemd's `Restart=always`
/// would (for tests without systemd).
#[derive(Debug)]
pub struct Supervisor {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    /// How many times it (re)started the agent.
    pub starts: std::sync::Arc<std::sync::atomic::AtomicU32>,
}

impl Agent {
    /// Runs `keel-agent run` under a [`Supervisor`]. The executable is looked up
    /// afresh at every start, so an upgrade that replaces it takes effect.
    pub fn supervise(&self) -> Supervisor {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let starts = std::sync::Arc::new(std::sync::atomic::AtomicU32::new(0));
        let (exe, config, log) = (self.exe.clone(), self.config.clone(), self.log_path());
        let (flag, count) = (std::sync::Arc::clone(&stop), std::sync::Arc::clone(&starts));
        let thread = std::thread::spawn(move || {
            while !flag.load(std::sync::atomic::Ordering::SeqCst) {
                let out = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(&log)
                    .expect("log file");
                let child = Command::new(&exe)
                    .arg("--config")
                    .arg(&config)
                    .arg("run")
                    .env("KEEL_LOG", crate::log_filter("info,keel_agent=debug"))
                    .stdout(Stdio::null())
                    .stderr(out)
                    .spawn();
                count.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let Ok(mut child) = child else {
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                };
                loop {
                    if flag.load(std::sync::atomic::Ordering::SeqCst) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return;
                    }
                    if let Ok(Some(_)) = child.try_wait() {
                        break;
                    }
                    std::thread::sleep(Duration::from_millis(50));
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Supervisor {
            stop,
            thread: Some(thread),
            starts,
        }
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}
