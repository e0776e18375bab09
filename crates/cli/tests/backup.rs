//! Backup and restore (`chorus snapshot save|restore`) and export/import in `consul kv
//! export`'s format, against live agents on loopback multicast (127.0.0.1, TTL 0, a random
//! group per test). Every wait is bounded; agents are killed when their guard drops.

#![allow(clippy::unwrap_used)]

use std::process::{Command, Output};
use std::time::Duration;

use base64::Engine as _;
use chorus_testkit::http::request;
use chorus_testkit::{Agent, temp_dir, wait_until};
use serde_json::{Value, json};

mod common;

use common::{Api, BIN, Net};

const WAIT: Duration = Duration::from_secs(20);

fn text(agent: &Agent, key: &str) -> Option<String> {
    agent.value(key).map(|v| String::from_utf8(v).unwrap())
}

/// The `version` of `key` as the listing shows it.
fn version(agent: &Agent, key: &str) -> Option<String> {
    agent.json(&format!("/v1/kv?prefix={key}"))["entries"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["key"] == key)
        .map(|e| e["version"].as_str().unwrap().to_owned())
}

fn revision(agent: &Agent) -> u64 {
    agent.json("/v1/stats")["revision"].as_u64().unwrap()
}

/// `chorus ARGS` against `agent`, bounded in time.
fn cli(agent: &Agent, args: &[&str]) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("CHORUS_AGENT", agent.url())
        .env_remove("CHORUS_HTTP_TOKEN")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let done = chorus_testkit::poll_until(WAIT, Duration::from_millis(20), || {
        child.try_wait().unwrap().is_some()
    });
    if !done {
        let _ = child.kill();
    }
    let out = child.wait_with_output().unwrap();
    assert!(done, "chorus {args:?} did not finish");
    out
}

fn ok(out: &Output) -> String {
    assert!(
        out.status.success(),
        "stdout: {}\nstderr: {}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails with exit code 2 and a message containing `expect`.
fn refused(out: &Output, expect: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains(expect), "expected {expect:?} in: {stderr}");
}

fn pair(net: &Net) -> (Agent, Agent) {
    let a = net.agent(1, &[]);
    let b = net.agent(2, &[]);
    wait_until("the two agents see each other", WAIT, || {
        a.member_ids() == [2] && b.member_ids() == [1]
    });
    (a, b)
}

/// Rewrites a snapshot's records with `edit` and gives it a correct checksum again: a file
/// someone else made, well-formed but breaking a limit.
fn resealed(file: &[u8], edit: impl Fn(&mut Value)) -> Vec<u8> {
    let text = std::str::from_utf8(file).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    let mut out = String::new();
    out.push_str(lines[0]);
    out.push('\n');
    for line in &lines[1..lines.len() - 1] {
        let mut record: Value = serde_json::from_str(line).unwrap();
        edit(&mut record);
        out.push_str(&record.to_string());
        out.push('\n');
    }
    let mut trailer: Value = serde_json::from_str(lines[lines.len() - 1]).unwrap();
    trailer["crc32"] = json!(format!("{:08x}", crc32fast::hash(out.as_bytes())));
    out.push_str(&trailer.to_string());
    out.push('\n');
    out.into_bytes()
}

#[test]
fn a_snapshot_restores_by_version_and_force_newer_restamps_it() {
    let dir = temp_dir("backup");
    let snap = dir.path().join("store.snap");
    let snap_arg = snap.display().to_string();
    let net = Net::new("backup");
    let (a, b) = pair(&net);
    a.put("app/a", "1");
    a.put("app/b", "1");
    a.put("app/gone", "x");
    a.delete("app/gone");
    let original_a = version(&a, "app/a").unwrap();
    wait_until("replicated", WAIT, || {
        text(&b, "app/b").as_deref() == Some("1")
    });

    let out = ok(&cli(&a, &["snapshot", "save", &snap_arg]));
    assert!(out.contains("3 entries (1 tombstones)"), "{out}");
    let file = std::fs::read(&snap).unwrap();
    let header: Value =
        serde_json::from_slice(file.split(|&c| c == b'\n').next().unwrap()).unwrap();
    assert_eq!(header["format"], "chorus-snapshot");
    assert_eq!(header["version"], 1);
    use std::os::unix::fs::PermissionsExt as _;
    assert_eq!(
        std::fs::metadata(&snap).unwrap().permissions().mode() & 0o777,
        0o600,
        "a snapshot holds every value: not world-readable"
    );

    // Newer writes after the snapshot: a restore by version keeps them.
    a.put("app/a", "2");
    a.delete("app/b");
    a.put("app/new", "n");
    let report: Value =
        serde_json::from_str(&ok(&cli(&a, &["snapshot", "restore", &snap_arg, "--json"]))).unwrap();
    assert_eq!(report["entries"], 3);
    assert_eq!(report["applied"], 0, "{report}");
    assert_eq!(report["skipped_older"], 3, "{report}");
    assert_eq!(text(&a, "app/a").as_deref(), Some("2"));
    assert_eq!(text(&a, "app/b"), None);
    assert_eq!(text(&a, "app/new").as_deref(), Some("n"));

    // Into an empty cluster: everything, with the original versions, on both agents.
    let other = Net::new("backup-restore");
    let (c, d) = pair(&other);
    let out = ok(&cli(&c, &["snapshot", "restore", &snap_arg]));
    assert!(out.contains("restored 3 of 3"), "{out}");
    for agent in [&c, &d] {
        wait_until("the restored keys everywhere", WAIT, || {
            text(agent, "app/a").as_deref() == Some("1")
                && text(agent, "app/b").as_deref() == Some("1")
        });
        assert_eq!(
            version(agent, "app/a").as_deref(),
            Some(original_a.as_str())
        );
        assert_eq!(text(agent, "app/gone"), None);
    }
    // The tombstone came too: a late write older than the delete cannot bring the key back.
    let again = dir.path().join("again.snap");
    ok(&cli(
        &d,
        &["snapshot", "save", &again.display().to_string()],
    ));
    let lines = std::fs::read_to_string(&again).unwrap();
    assert!(
        lines
            .lines()
            .any(|l| l.contains("\"app/gone\"") && l.contains("\"deleted\":true")),
        "{lines}"
    );

    // --force-newer: the snapshot wins over the newer writes, with new versions, cluster-wide.
    let out = ok(&cli(
        &a,
        &["snapshot", "restore", &snap_arg, "--force-newer"],
    ));
    assert!(out.contains("restored 3 of 3"), "{out}");
    for agent in [&a, &b] {
        wait_until("the forced restore everywhere", WAIT, || {
            text(agent, "app/a").as_deref() == Some("1")
                && text(agent, "app/b").as_deref() == Some("1")
        });
        assert_ne!(
            version(agent, "app/a").as_deref(),
            Some(original_a.as_str())
        );
        assert_eq!(
            text(agent, "app/new").as_deref(),
            Some("n"),
            "keys the snapshot lacks stay"
        );
    }
}

#[test]
fn bad_snapshots_are_refused_and_change_nothing() {
    let dir = temp_dir("backup-bad");
    let net = Net::new("backup-bad");
    let agent = net.agent(1, &[]);
    agent.put("k/one", "1");
    agent.put("k/two", "2");
    let good_path = dir.path().join("good.snap");
    ok(&cli(
        &agent,
        &["snapshot", "save", &good_path.display().to_string()],
    ));
    let good = std::fs::read(&good_path).unwrap();
    agent.delete("k/one");
    let before = revision(&agent);

    let good_text = String::from_utf8(good.clone()).unwrap();
    let mut flipped = good.clone();
    let at = good_text.find("\"k/two\"").unwrap() + 3;
    flipped[at] = b'X';
    let long_key = resealed(&good, |r| r["key"] = json!("k".repeat(2000)));
    let large_value = resealed(&good, |r| {
        r["value"] =
            json!(base64::engine::general_purpose::STANDARD.encode(vec![b'v'; 600 * 1024]));
    });
    let cases: [(&str, Vec<u8>, &str); 6] = [
        (
            "truncated",
            good[..good.len() * 2 / 3].to_vec(),
            "truncated",
        ),
        ("checksum", flipped, "checksum"),
        (
            "not-json",
            b"this is not a snapshot\n".to_vec(),
            "not a Chorus snapshot",
        ),
        ("empty", Vec::new(), "not a Chorus snapshot"),
        ("long-key", long_key, "above the limit"),
        ("large-value", large_value, "above the limit"),
    ];
    for (name, bytes, expect) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, bytes).unwrap();
        refused(
            &cli(
                &agent,
                &["snapshot", "restore", &path.display().to_string()],
            ),
            expect,
        );
        // The agent checks on its own too (a client that skipped the check).
        let (status, body) = request(agent.http, "PUT", "/v1/snapshot?force-newer", &[], bytes);
        assert_eq!(status, 400, "{name}: {}", String::from_utf8_lossy(&body));
        let body: Value = serde_json::from_slice(&body).unwrap();
        assert!(
            body["error"].as_str().unwrap().contains(expect),
            "{name}: {body}"
        );
    }
    assert_eq!(
        revision(&agent),
        before,
        "a refused snapshot changed the store"
    );
    assert_eq!(text(&agent, "k/one"), None);
}

#[test]
fn export_and_import_speak_consul_kv_export() {
    let dir = temp_dir("backup-consul");
    let net = Net::new("backup-consul");
    let (a, b) = pair(&net);
    // What `consul kv export` prints (tabs, flags, an empty value, a binary value).
    let consul = r#"[
	{
		"key": "svc/web/url",
		"flags": 0,
		"value": "aHR0cDovL3dlYjo4MA=="
	},
	{
		"key": "svc/web/empty",
		"flags": 7,
		"value": ""
	},
	{
		"key": "svc/bin",
		"flags": 42,
		"value": "AP8="
	}
]
"#;
    let file = dir.path().join("consul.json");
    std::fs::write(&file, consul).unwrap();
    let out = ok(&cli(&a, &["import", &file.display().to_string()]));
    assert!(out.contains("imported 3 keys in 1 batches"), "{out}");
    wait_until("imported everywhere", WAIT, || {
        text(&b, "svc/web/url").as_deref() == Some("http://web:80")
    });
    assert_eq!(b.value("svc/bin").unwrap(), [0, 0xff]);

    // Back out, from the other agent: the same entries, flags included, in key order.
    let exported: Value = serde_json::from_str(&ok(&cli(&b, &["export", "svc/"]))).unwrap();
    let mut expected: Vec<Value> = serde_json::from_str(consul).unwrap();
    expected.sort_by(|x, y| x["key"].as_str().cmp(&y["key"].as_str()));
    assert_eq!(exported, Value::from(expected));
    let only_web: Value = serde_json::from_str(&ok(&cli(&b, &["export", "svc/web/"]))).unwrap();
    assert_eq!(only_web.as_array().unwrap().len(), 2);

    // Many keys: batches within the node's limits, all applied.
    let many: Vec<Value> = (0..2500)
        .map(|i| json!({"key": format!("bulk/{i:05}"), "flags": 0, "value": "dg=="}))
        .collect();
    let bulk = dir.path().join("bulk.json");
    std::fs::write(&bulk, Value::from(many).to_string()).unwrap();
    let out = ok(&cli(&a, &["import", &bulk.display().to_string()]));
    assert!(out.contains("imported 2500 keys in 3 batches"), "{out}");
    wait_until("the bulk import everywhere", WAIT, || {
        b.json("/v1/kv?prefix=bulk/")["count"] == 2500
    });

    // A file above the API's usual 1 MiB body limit, values near the node's value limit:
    // two batches of two (a batch stays within the write limit of about 1 MiB).
    let heavy: Vec<Value> = (0..4)
        .map(|i| {
            json!({
                "key": format!("heavy/{i}"),
                "flags": i,
                "value": base64::engine::general_purpose::STANDARD.encode(vec![b'h'; 400 * 1024]),
            })
        })
        .collect();
    let heavy_file = dir.path().join("heavy.json");
    std::fs::write(&heavy_file, Value::from(heavy).to_string()).unwrap();
    let out = ok(&cli(&a, &["import", &heavy_file.display().to_string()]));
    assert!(out.contains("imported 4 keys in 2 batches"), "{out}");
    wait_until("the heavy import everywhere", WAIT, || {
        b.value("heavy/3").is_some_and(|v| v.len() == 400 * 1024)
    });

    // Bad input: refused, nothing written.
    let before = revision(&a);
    let big = base64::engine::general_purpose::STANDARD.encode(vec![b'v'; 600 * 1024]);
    let cases = [
        ("not-json", "{ nope".to_owned(), "not a consul kv export"),
        (
            "object",
            "{\"key\": \"a\"}".to_owned(),
            "not a consul kv export",
        ),
        (
            "long-key",
            format!(
                "[{{\"key\":\"ok\",\"value\":\"\"}},{{\"key\":\"{}\",\"value\":\"\"}}]",
                "k".repeat(2000)
            ),
            "above the limit",
        ),
        (
            "large-value",
            format!("[{{\"key\":\"ok\",\"value\":\"\"}},{{\"key\":\"big\",\"value\":\"{big}\"}}]"),
            "above the limit",
        ),
        (
            "bad-base64",
            "[{\"key\":\"ok\",\"value\":\"\"},{\"key\":\"b\",\"value\":\"%%\"}]".to_owned(),
            "not base64",
        ),
    ];
    for (name, content, expect) in &cases {
        let path = dir.path().join(name);
        std::fs::write(&path, content).unwrap();
        refused(&cli(&a, &["import", &path.display().to_string()]), expect);
        let (status, body) = request(a.http, "PUT", "/v1/import", &[], content.as_bytes());
        assert_eq!(status, 400, "{name}: {}", String::from_utf8_lossy(&body));
    }
    assert_eq!(revision(&a), before, "a refused import wrote something");
    assert_eq!(text(&a, "ok"), None);
}
