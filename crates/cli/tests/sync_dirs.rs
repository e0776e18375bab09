//! Several mirrored directories per agent (`--sync-dir DIR:PREFIX` repeated, `[[sync]]` in the
//! config file): two agents on loopback multicast (127.0.0.1, TTL 0, a random group), each
//! mirroring two prefixes into two directories; their figures, labelled per directory; and
//! the configuration errors of overlapping mirrors. Every wait is bounded; agents are killed
//! when their guard drops.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use chorus_testkit::{temp_dir, wait_until};
use serde_json::Value;

mod common;

use common::{Api, BIN, Net, local_http};

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn two_directories_are_mirrored_between_two_agents() {
    let net = Net::new("syncdirs");
    let tmp = temp_dir("syncdirs");
    let dir = |name: &str| tmp.path().join(name);
    let (one_app, one_web, two_app, two_web) =
        (dir("1-app"), dir("1-web"), dir("2-app"), dir("2-web"));
    // Node 1 by flags, node 2 by its config file.
    let flag = |d: &Path, prefix: &str| format!("{}:{prefix}", d.display());
    let (fa, fw) = (flag(&one_app, "app/"), flag(&one_web, "web/"));
    let one = net.agent(1, &["--sync-dir", &fa, "--sync-dir", &fw]);
    let config = tmp.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[sync]]\ndir = \"{}\"\nprefix = \"app/\"\n\n[[sync]]\ndir = \"{}\"\nprefix = \"web/\"\n",
            two_app.display(),
            two_web.display()
        ),
    )
    .unwrap();
    let cfg = config.display().to_string();
    let two = net.agent(2, &["--config", &cfg]);
    wait_until("two members", Duration::from_secs(30), || {
        one.member_ids() == [2] && two.member_ids() == [1]
    });

    one.put("app/server.conf", "port = 80");
    two.put("web/index.html", "<h1>hi</h1>");
    one.put("web/css/site.css", "body {}");
    two.put("other/ignored", "not mirrored");
    wait_until(
        "both prefixes in both agents' directories",
        Duration::from_secs(30),
        || {
            [&one_app, &two_app]
                .iter()
                .all(|d| read(&d.join("server.conf")).as_deref() == Some("port = 80"))
                && [&one_web, &two_web].iter().all(|d| {
                    read(&d.join("index.html")).as_deref() == Some("<h1>hi</h1>")
                        && read(&d.join("css/site.css")).as_deref() == Some("body {}")
                })
        },
    );
    // Each directory holds its own prefix only.
    for d in [&one_app, &two_app] {
        assert!(!d.join("index.html").exists() && !d.join("css").exists());
    }
    for d in [&one_web, &two_web] {
        assert!(!d.join("server.conf").exists());
    }
    for d in [&one_app, &one_web, &two_app, &two_web] {
        assert!(!d.join("ignored").exists() && !d.join("other").exists());
    }

    two.delete("app/server.conf");
    wait_until("the removal reached both", Duration::from_secs(30), || {
        !one_app.join("server.conf").exists() && !two_app.join("server.conf").exists()
    });

    // Figures per directory, labelled, and their sums.
    for (agent, app, web) in [(&one, &one_app, &one_web), (&two, &two_app, &two_web)] {
        // A removal is counted just after the file goes.
        wait_until("the removal counted", Duration::from_secs(10), || {
            agent.json("/v1/stats")["sync_dir"]["files_removed"] == 1
        });
        let stats = agent.json("/v1/stats");
        let each = stats["sync_dirs"].as_array().unwrap();
        assert_eq!(each.len(), 2, "{stats}");
        let find =
            |prefix: &str| -> &Value { each.iter().find(|d| d["prefix"] == prefix).unwrap() };
        assert_eq!(find("app/")["dir"], app.display().to_string());
        assert_eq!(find("web/")["dir"], web.display().to_string());
        assert_eq!(find("app/")["files_written"], 1, "{stats}");
        assert_eq!(find("app/")["files_removed"], 1, "{stats}");
        assert_eq!(find("web/")["files_written"], 2, "{stats}");
        assert_eq!(stats["sync_dir"]["files_written"], 3, "totals: {stats}");
        let (status, metrics) = agent.get("/metrics");
        assert_eq!(status, 200);
        let metrics = String::from_utf8(metrics).unwrap();
        let series = format!(
            "chorus_sync_dir_files_written{{dir=\"{}\",prefix=\"web/\"}} 2",
            web.display()
        );
        assert!(metrics.contains(&series), "no {series} in:\n{metrics}");
        assert_eq!(
            metrics
                .matches("# TYPE chorus_sync_dir_files_written counter")
                .count(),
            1
        );
    }
}

#[test]
fn overlapping_mirrors_are_a_clear_config_error() {
    let net = Net::new("syncdirs");
    let tmp = temp_dir("syncdirs-bad");
    let a = tmp.path().join("a").display().to_string();
    let b = tmp.path().join("b").display().to_string();
    for (dirs, what) in [
        (
            vec![format!("{a}:app/"), format!("{b}:app/conf/")],
            "overlapping prefixes",
        ),
        (
            vec![format!("{a}:app/"), format!("{a}/:web/")],
            "the same directory",
        ),
        (vec![a.clone()], "DIR:PREFIX"),
    ] {
        let mut extra: Vec<&str> = Vec::new();
        for d in &dirs {
            extra.extend(["--sync-dir", d.as_str()]);
        }
        let mut child = Command::new(BIN)
            .args(net.args(1, local_http(), &extra))
            .env_remove("CHORUS_KEY_FILE")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // A refused configuration exits at once; one that starts is killed after a while.
        let started = std::time::Instant::now();
        while child.try_wait().unwrap().is_none() && started.elapsed() < Duration::from_secs(20) {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let out = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{dirs:?} started");
        assert!(stderr.contains(what), "{dirs:?}: {stderr}");
        assert!(!Path::new(&a).exists(), "a refused mirror wrote {a}");
    }
}
