//! The deb and rpm packages: metadata, file lists, a real dpkg install, upgrade,
//! removal and purge in a throwaway root, the systemd units, and the packaged agent
//! talking to a server. `./build.sh test` builds versions 1.0.0 and 1.0.1 of the
//! packages and names their directory in `KEEL_TEST_PACKAGES`.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use base64::Engine;
use keel_tests::mariadb::{AgentRow, KeyDb};
use keel_tests::{Agent, Server, ServerOptions, deb, dpkg, packages, run, throwaway_root};
use serde_json::json;

fn rpm(dir: &Path, name: &str, version: &str) -> PathBuf {
    dir.join(format!("{name}-{version}-1.x86_64.rpm"))
}

fn mode(p: &Path) -> u32 {
    std::fs::metadata(p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .permissions()
        .mode()
        & 0o7777
}

#[test]
fn packages_carry_the_right_metadata_and_files() {
    let Some(dir) = packages() else { return };
    for name in ["keel-agent", "keel-server"] {
        let info = run(Command::new("dpkg-deb").arg("-I").arg(deb(&dir, name, "1.0.0")));
        assert!(info.contains(&format!("Package: {name}")), "{info}");
        assert!(
            info.contains("Version: 1.0.0") && info.contains("Architecture: amd64"),
            "{info}"
        );
        assert!(info.contains("Depends: libc6 (>= 2."), "states its C library: {info}");
        let conffiles = run(Command::new("dpkg-deb")
            .arg("-I")
            .arg(deb(&dir, name, "1.0.0"))
            .arg("conffiles"));
        let config = if name == "keel-agent" {
            "/etc/keel/agent.toml"
        } else {
            "/etc/keel/server.toml"
        };
        assert!(conffiles.contains(config), "{conffiles}");
        if name == "keel-agent" {
            assert!(conffiles.contains("/etc/keel/file-delivery.toml"), "{conffiles}");
            assert!(conffiles.contains("/etc/keel/proxy.toml"), "{conffiles}");
        }
        let files = run(Command::new("dpkg-deb").arg("-c").arg(deb(&dir, name, "1.0.0")));
        assert!(
            files.contains("-rwxr-xr-x root/root") && files.contains(&format!("./usr/bin/{name}")),
            "{files}"
        );
        assert!(
            files.contains(&format!("./usr/lib/systemd/system/{name}.service")),
            "{files}"
        );
        if name == "keel-server" {
            assert!(
                files.contains("./usr/share/keel-server/grafana/keel-dashboard.json"),
                "the Grafana dashboard ships with the server: {files}"
            );
        }
        assert!(
            files.contains("-rw-r----- root/root"),
            "the configuration is not world-readable: {files}"
        );

        let rpm_path = rpm(&dir, name, "1.0.0");
        let info = run(Command::new("rpm").arg("-qip").arg(&rpm_path));
        assert!(
            info.contains(&format!("Name        : {name}")) && info.contains("Version     : 1.0.0"),
            "{info}"
        );
        assert!(info.contains("Architecture: x86_64"), "{info}");
        let list = run(Command::new("rpm").arg("-qlp").arg(&rpm_path));
        assert!(
            list.contains(&format!("/usr/bin/{name}"))
                && list.contains(&format!("/usr/lib/systemd/system/{name}.service")),
            "{list}"
        );
        let configs = run(Command::new("rpm").arg("-qcp").arg(&rpm_path));
        assert!(configs.contains(config), "{configs}");
        let requires = run(Command::new("rpm").arg("-qRp").arg(&rpm_path));
        assert!(requires.contains("glibc >= 2."), "{requires}");
        let scripts = run(Command::new("rpm").arg("-qp").arg("--scripts").arg(&rpm_path));
        assert!(scripts.contains("postinstall scriptlet"), "{scripts}");
    }
}

/// A throwaway root with keel-server and keel-agent 1.0.0 installed by dpkg.
fn both_installed(dir: &Path) -> tempfile::TempDir {
    let root = throwaway_root();
    dpkg(
        root.path(),
        &["-i"],
        &[deb(dir, "keel-server", "1.0.0"), deb(dir, "keel-agent", "1.0.0")],
    );
    root
}

fn version_of(binary: &Path) -> String {
    run(Command::new(binary).arg("--version")).trim().to_owned()
}

#[test]
fn deb_install_upgrade_remove_and_purge_in_a_throwaway_root() {
    let Some(dir) = packages() else { return };
    let root = both_installed(&dir);
    let r = root.path();
    assert_eq!(version_of(&r.join("usr/bin/keel-agent")), "keel-agent 1.0.0");
    assert_eq!(version_of(&r.join("usr/bin/keel-server")), "keel-server 1.0.0");
    let server_bin = std::fs::read(r.join("usr/bin/keel-server")).unwrap();
    assert!(
        server_bin.windows(27).any(|w| w == b"<title>Keel console</title>"),
        "the console's assets are in the packaged server"
    );
    assert_eq!(mode(&r.join("usr/bin/keel-agent")), 0o755);
    // keelctl comes with both; /usr/bin/keelctl is an alternative, the server's first.
    let keelctl = || std::fs::read_link(r.join("etc/alternatives/keelctl")).ok();
    assert_eq!(
        std::fs::read_link(r.join("usr/bin/keelctl")).unwrap(),
        Path::new("/etc/alternatives/keelctl")
    );
    assert_eq!(keelctl().as_deref(), Some(Path::new("/usr/lib/keel-server/keelctl")));
    assert_eq!(mode(&r.join("usr/lib/keel-agent/keelctl")), 0o755);
    // The local plugin set and its files.
    assert_eq!(mode(&r.join("usr/lib/keel-agent/plugins/key-request")), 0o755);
    assert!(r.join("usr/share/keel-agent/key-request/mysql_provider.py").exists());
    assert_eq!(mode(&r.join("usr/bin/keel-keyprovider-mysql")), 0o755);
    assert_eq!(
        version_of(&r.join("usr/bin/keel-keyprovider-mysql")),
        "keel-keyprovider-mysql 1.0.0"
    );
    assert!(r.join("etc/default/keel-keyprovider-mysql").exists());
    assert!(r.join("usr/share/doc/keel-agent/key-request.md").exists());
    let agent_toml = std::fs::read_to_string(r.join("etc/keel/agent.toml")).unwrap();
    assert!(agent_toml.contains("[plugins.local.key-request]"), "{agent_toml}");
    assert_eq!(mode(&r.join("usr/lib/keel-agent/plugins/file-delivery")), 0o755);
    assert!(agent_toml.contains("[plugins.local.file-delivery]"), "{agent_toml}");
    assert_eq!(
        mode(&r.join("etc/keel/file-delivery.toml")),
        0o600,
        "only root reads whom the host trusts"
    );
    assert!(r.join("usr/share/doc/keel-agent/file-delivery.md").exists());
    assert_eq!(mode(&r.join("usr/lib/keel-agent/plugins/proxy")), 0o755);
    assert!(agent_toml.contains("[plugins.local.proxy]"), "{agent_toml}");
    assert_eq!(
        mode(&r.join("etc/keel/proxy.toml")),
        0o600,
        "only root reads what the host lets jobs reach"
    );
    assert!(r.join("usr/share/doc/keel-agent/proxy.md").exists());
    assert_eq!(mode(&r.join("etc/keel/agent.toml")), 0o640);
    assert_eq!(mode(&r.join("etc/keel/server.toml")), 0o640);
    assert_eq!(mode(&r.join("var/lib/keel-agent")), 0o700);
    assert_eq!(mode(&r.join("var/log/keel-agent")), 0o750);
    assert_eq!(mode(&r.join("var/lib/keel-server")), 0o700);
    let passwd = std::fs::read_to_string(r.join("etc/passwd")).unwrap();
    let keel = passwd
        .lines()
        .find(|l| l.starts_with("keel:"))
        .expect("the keel system user");
    let uid: u32 = keel.split(':').nth(2).unwrap().parse().unwrap();
    assert!(uid < 1000, "a system user: {keel}");
    assert_eq!(
        std::fs::metadata(r.join("var/lib/keel-server")).unwrap().uid(),
        uid,
        "the server's state is its own"
    );

    // A local edit of the configuration survives the upgrade.
    let config = r.join("etc/keel/agent.toml");
    let mut edited = std::fs::read_to_string(&config).unwrap();
    edited.push_str("\n# edited by the operator\n");
    std::fs::write(&config, &edited).unwrap();
    std::fs::write(r.join("var/lib/keel-agent/agent_id"), "kept-across-upgrades\n").unwrap();
    dpkg(
        r,
        &["-i"],
        &[deb(&dir, "keel-server", "1.0.1"), deb(&dir, "keel-agent", "1.0.1")],
    );
    assert_eq!(version_of(&r.join("usr/bin/keel-agent")), "keel-agent 1.0.1");
    assert_eq!(std::fs::read_to_string(&config).unwrap(), edited);
    assert!(
        r.join("var/lib/keel-agent/agent_id").exists(),
        "state survives an upgrade"
    );

    // Without the server, keelctl is the agent's.
    dpkg(r, &["-r"], &[PathBuf::from("keel-server")]);
    assert_eq!(keelctl().as_deref(), Some(Path::new("/usr/lib/keel-agent/keelctl")));
    assert!(r.join("usr/lib/keel-agent/keelctl").exists());

    // Remove keeps configuration and state; purge deletes them.
    dpkg(r, &["-r"], &[PathBuf::from("keel-agent")]);
    assert!(keelctl().is_none() && std::fs::symlink_metadata(r.join("usr/bin/keelctl")).is_err());
    assert!(!r.join("usr/bin/keel-agent").exists());
    assert!(config.exists() && r.join("var/lib/keel-agent/agent_id").exists());
    dpkg(r, &["-P"], &[PathBuf::from("keel-agent"), PathBuf::from("keel-server")]);
    for gone in [
        "etc/keel/agent.toml",
        "etc/keel/server.toml",
        "var/lib/keel-agent",
        "var/lib/keel-server",
        "var/log/keel-agent",
    ] {
        assert!(!r.join(gone).exists(), "{gone} must be purged");
    }
}

#[test]
fn units_verify_and_the_daemon_units_are_hardened() {
    let Some(dir) = packages() else { return };
    let root = both_installed(&dir);
    let r = root.path();
    // The targets and units the ones under test refer to.
    let units = r.join("usr/lib/systemd/system");
    for entry in std::fs::read_dir("/lib/systemd/system").unwrap().flatten() {
        let to = units.join(entry.file_name());
        if !to.exists() && entry.path().is_file() {
            let _ = std::fs::copy(entry.path(), to);
        }
    }
    for unit in [
        "keel-agent.service",
        "keel-server.service",
        "keel-keyprovider-mysql.service",
    ] {
        run(Command::new("systemd-analyze")
            .arg(format!("--root={}", r.display()))
            .arg("verify")
            .arg(unit));
        let out = Command::new("systemd-analyze")
            .args(["security", "--offline=yes", "--no-pager"])
            .arg(format!("--root={}", r.display()))
            .arg(unit)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        let line = text
            .lines()
            .find(|l| l.contains("Overall exposure level"))
            .expect("an exposure score");
        println!("{line}");
        let score: f64 = line
            .split(':')
            .nth(1)
            .unwrap()
            .split_whitespace()
            .next()
            .unwrap()
            .parse()
            .unwrap();
        if unit != "keel-agent.service" {
            assert!(score <= 2.0, "{unit} is hardened: {line}");
        }
    }
}

#[tokio::test]
async fn the_packaged_agent_connects_to_a_server() {
    let Some(dir) = packages() else { return };
    let root = throwaway_root();
    let r = root.path();
    dpkg(r, &["-i"], &[deb(&dir, "keel-agent", "1.0.1")]);
    // The packaged configuration is valid as shipped.
    let state = tempfile::tempdir().unwrap();
    let out = Command::new(r.join("usr/bin/keel-agent"))
        .arg("--config")
        .arg(r.join("etc/keel/agent.toml"))
        .arg("--state-dir")
        .arg(state.path())
        .arg("id")
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));

    // The packaged agent runs the packaged key-request from its local set, which
    // looks keys up with the packaged provider in a real MariaDB.
    let db = KeyDb::create(&[AgentRow::new("001", "web-1", "10.1.2.3", "key-of-web-1-5e4d")]);
    let mut exec_path = vec![r.join("usr/bin/keel-keyprovider-mysql").display().to_string()];
    exec_path.extend(db.provider_args());
    let detail = json!({"exec_path": exec_path.join(" "), "timeout": 20});
    let server = Server::start(ServerOptions::default()).await;
    let local = format!(
        "local_dir = {:?}\n[plugins.local.key-request]\ndetail = '{detail}'\n",
        r.join("usr/lib/keel-agent/plugins").display().to_string()
    );
    let mut agent = Agent::with(&server, "packaged-1", &local, "");
    agent.exe = r.join("usr/bin/keel-agent");
    let out = agent.enroll(&server, &server.enrollment_token(1, "10m"), Some(&server.fingerprint()));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    agent.start();
    let api = server.api();
    let a = api.online("packaged-1").await;
    assert_eq!(a["version"], "1.0.1", "the version built into the package");
    keel_tests::eventually("the packaged key-request running", || async {
        let a = api.agent("packaged-1").await?;
        a["plugins"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == "key-request" && p["state"] == "running" && p["version"] == "1.0.1")
            .cloned()
    })
    .await;
    let lookup = json!({"data_type": 6000, "object_name": "key-request", "data": r#"{"by":"id","value":"001"}"#});
    let (status, answer) = api.post("/api/v1/agents/packaged-1/tasks", &lookup).await;
    assert_eq!(status, 202, "{answer}");
    let token = answer["token"].as_str().unwrap().to_owned();
    let task = keel_tests::eventually("the lookup's result", || async {
        let (_, t) = api.get(&format!("/api/v1/tasks/{token}")).await;
        (t["status"] != "sent").then_some(t)
    })
    .await;
    assert_eq!(task["status"], "succeeded", "{task}");
    let record = keel_tests::eventually("the 6000 record in the sink", || async {
        server.sink_lines().into_iter().find(|l| l["data_type"] == 6000)
    })
    .await;
    // The plugin's record, passed through undecoded: its payload's fields.
    let payload = base64::engine::general_purpose::STANDARD
        .decode(record["data"].as_str().unwrap())
        .unwrap();
    let shown = String::from_utf8_lossy(&payload);
    assert!(shown.contains("web-1") && shown.contains(&token), "{record}");
    assert!(!shown.contains("key-of-web-1"), "the key left the plugin: {record}");
}
