//! End-to-end tests of the `chorus` binary: real agent processes on loopback multicast
//! (127.0.0.1, TTL 0, a random group and port per test), driven through the CLI and raw HTTP.
//! Every wait is bounded; agents are killed when their guard drops.

#![allow(clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use chorus_testkit::http::request as http;
use chorus_testkit::net::{free_tcp_port, random_group};
use chorus_testkit::{Agent, temp_dir, wait_until};
use serde_json::Value;

mod common;

use common::{Api, BIN, Net, local_http, spawn_agent};

/// The client commands, run against an agent.
trait Client {
    /// Runs a client command against this agent.
    fn cli(&self, args: &[&str]) -> Output;
}

impl Client for Agent {
    fn cli(&self, args: &[&str]) -> Output {
        cli_with_stdin(args, &self.url(), None)
    }
}

fn cli_with_stdin(args: &[&str], agent: &str, stdin: Option<&[u8]>) -> Output {
    let mut child = Command::new(BIN)
        .args(args)
        .env("CHORUS_AGENT", agent)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    if let Some(data) = stdin {
        child.stdin.take().unwrap().write_all(data).unwrap();
    }
    wait_output(child, Duration::from_secs(30))
}

/// Waits for a child's output, killing it after `timeout`.
fn wait_output(mut child: Child, timeout: Duration) -> Output {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return child.wait_with_output().unwrap();
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!(
                "command did not finish within {timeout:?}\nstdout: {}\nstderr: {}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

#[test]
fn put_on_one_is_readable_on_all_and_client_commands_work() {
    let net = Net::new("test");
    // One agent from a TOML file, to cover --config.
    let dir = temp_dir("config");
    let http0 = local_http();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "cluster = \"{}\"\ngroup = \"{}\"\niface = \"127.0.0.1\"\nttl = 0\nnode_id = 1\nhttp = \"{http0}\"\n",
            net.cluster, net.group
        ),
    )
    .unwrap();
    let a = spawn_agent(
        &[
            "agent".into(),
            "--config".into(),
            config.display().to_string(),
        ],
        http0,
    );
    let b = net.agent(2, &[]);
    let c = net.agent(3, &[]);

    let out = a.cli(&["put", "app/db/url", "postgres://db1/app"]);
    assert!(out.status.success(), "{out:?}");
    let out = cli_with_stdin(&["put", "app/from-stdin"], &b.url(), Some(b"piped\nvalue"));
    assert!(out.status.success(), "{out:?}");
    for agent in [&a, &b, &c] {
        wait_until("the value on every node", Duration::from_secs(20), || {
            let o = agent.cli(&["get", "app/db/url"]);
            o.status.code() == Some(0) && stdout(&o) == "postgres://db1/app"
        });
        wait_until(
            "the stdin value on every node",
            Duration::from_secs(20),
            || stdout(&agent.cli(&["get", "app/from-stdin"])) == "piped\nvalue",
        );
    }

    // Absent key: exit code 1; unreachable agent: exit code 2.
    assert_eq!(c.cli(&["get", "app/nope"]).status.code(), Some(1));
    assert_eq!(c.cli(&["del", "app/nope"]).status.code(), Some(1));
    let dead = format!("http://127.0.0.1:{}", free_tcp_port());
    assert_eq!(
        cli_with_stdin(&["get", "x"], &dead, None).status.code(),
        Some(2)
    );

    // ls, human and JSON.
    let ls = c.cli(&["ls", "app/"]);
    assert!(
        stdout(&ls).contains("app/db/url\tpostgres://db1/app"),
        "{}",
        stdout(&ls)
    );
    let ls: Value = serde_json::from_slice(&c.cli(&["ls", "app/", "--json"]).stdout).unwrap();
    assert_eq!(ls["count"], 2);
    assert!(ls["entries"][0]["version"].as_str().unwrap().contains('@'));
    let got: Value =
        serde_json::from_slice(&b.cli(&["get", "app/db/url", "--json"]).stdout).unwrap();
    assert_eq!(got["value"], "postgres://db1/app");

    // Delete on one node, gone everywhere.
    assert_eq!(c.cli(&["del", "app/db/url"]).status.code(), Some(0));
    for agent in [&a, &b, &c] {
        wait_until("the delete on every node", Duration::from_secs(20), || {
            agent.cli(&["get", "app/db/url"]).status.code() == Some(1)
        });
    }

    // Members and stats.
    wait_until("three members", Duration::from_secs(20), || {
        let m: Value =
            serde_json::from_slice(&a.cli(&["members", "--json"]).stdout).unwrap_or_default();
        m["members"].as_array().is_some_and(|l| l.len() == 3)
    });
    let members = stdout(&a.cli(&["members"]));
    assert!(
        members.contains("NODE") && members.lines().count() == 4,
        "{members}"
    );
    let stats: Value = serde_json::from_slice(&a.cli(&["stats", "--json"]).stdout).unwrap();
    assert_eq!(stats["node_id"], 1);
    assert!(stats["counters"].as_object().is_some_and(|c| !c.is_empty()));
    // Health turns 200 once in sync; metrics are Prometheus text.
    wait_until("health 200", Duration::from_secs(30), || {
        b.get("/v1/health").0 == 200
    });
    let (status, metrics) = http(a.http, "GET", "/metrics", &[], b"");
    assert_eq!(status, 200);
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(metrics.contains("# TYPE chorus_keys gauge"));
    // Each peer's clock offset, measured from its heartbeats (same host: near 0).
    let offsets: Vec<i64> = metrics
        .lines()
        .filter_map(|l| l.strip_prefix("chorus_member_clock_offset_ms{node=\""))
        .filter_map(|l| l.split_whitespace().nth(1)?.parse().ok())
        .collect();
    assert_eq!(offsets.len(), 2, "{metrics}");
    assert!(offsets.iter().all(|o| o.abs() < 1_000), "{offsets:?}");
    let listed: Value = serde_json::from_slice(&a.cli(&["members", "--json"]).stdout).unwrap();
    assert!(
        listed["members"]
            .as_array()
            .unwrap()
            .iter()
            .all(|m| m["clock_offset_ms"]
                .as_i64()
                .is_some_and(|o| o.abs() < 1_000)),
        "{listed}"
    );
    assert!(
        metrics
            .lines()
            .filter(|l| !l.starts_with('#'))
            .all(|l| l.starts_with("chorus_"))
    );
}

#[test]
fn watch_streams_changes_and_resumes() {
    let net = Net::new("test");
    let a = net.agent(1, &[]);
    let b = net.agent(2, &[]);
    let start = b.json("/v1/stats")["revision"].as_u64().unwrap();
    let watcher = Command::new(BIN)
        .args([
            "watch",
            "cfg/",
            "--json",
            "--count",
            "3",
            "--from",
            &start.to_string(),
        ])
        .env("CHORUS_AGENT", b.url())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    a.cli(&["put", "other/x", "ignored"]);
    a.cli(&["put", "cfg/one", "1"]);
    a.cli(&["put", "cfg/two", "2"]);
    wait_until("cfg/two on b", Duration::from_secs(20), || {
        b.cli(&["get", "cfg/two"]).status.success()
    });
    a.cli(&["del", "cfg/one"]);
    let out = wait_output(watcher, Duration::from_secs(30));
    assert!(out.status.success(), "{out:?}");
    let events: Vec<Value> = stdout(&out)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let keys: Vec<(&str, bool)> = events
        .iter()
        .map(|e| (e["key"].as_str().unwrap(), e["deleted"].as_bool().unwrap()))
        .collect();
    assert_eq!(
        keys,
        [("cfg/one", false), ("cfg/two", false), ("cfg/one", true)]
    );
    // Resuming after the first event replays the other two (via Last-Event-ID over raw HTTP,
    // reading until both arrived).
    let first = events[0]["revision"].as_u64().unwrap();
    let mut s = TcpStream::connect(b.http).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET /v1/watch?prefix=cfg/ HTTP/1.1\r\nHost: {}\r\nLast-Event-ID: {first}\r\n\r\n",
        b.http
    )
    .unwrap();
    let mut got = String::new();
    let mut buf = [0u8; 4096];
    let deadline = Instant::now() + Duration::from_secs(10);
    while got.matches("data:").count() < 2 {
        assert!(Instant::now() < deadline, "resumed watch incomplete: {got}");
        let n = s.read(&mut buf).unwrap();
        assert!(n > 0, "stream closed: {got}");
        got.push_str(&String::from_utf8_lossy(&buf[..n]));
    }
    assert!(got.contains("text/event-stream"));
    assert!(
        got.contains("event: put") && got.contains("event: delete"),
        "{got}"
    );
    assert!(!got.contains("other/x"));
}

#[test]
fn sync_dir_mirrors_files_and_runs_the_hook() {
    let net = Net::new("test");
    let dir = temp_dir("sync");
    let mirror = dir.path().join("etc");
    let marker = dir.path().join("hook-runs");
    std::fs::create_dir_all(&mirror).unwrap();
    std::fs::write(mirror.join("not-mine.txt"), "user file").unwrap();
    let hook = format!("echo \"$CHORUS_PREFIX\" >> '{}'", marker.display());
    let writer = net.agent(1, &[]);
    let m = mirror.display().to_string();
    let _mirrored = net.agent(
        2,
        &[
            "--sync-dir",
            &m,
            "--prefix",
            "cfg/",
            "--on-change",
            &hook,
            "--debounce-ms",
            "200",
        ],
    );

    writer.cli(&["put", "cfg/app.conf", "port = 1"]);
    writer.cli(&["put", "cfg/sub/db.conf", "url = x"]);
    writer.cli(&["put", "cfg/../escape", "nope"]);
    writer.cli(&["put", "elsewhere/x", "nope"]);
    wait_until("files written", Duration::from_secs(20), || {
        read(&mirror.join("app.conf")).as_deref() == Some("port = 1")
            && read(&mirror.join("sub/db.conf")).as_deref() == Some("url = x")
    });
    wait_until("the hook ran", Duration::from_secs(20), || {
        read(&marker).is_some_and(|t| !t.is_empty())
    });
    assert_eq!(read(&marker).unwrap().lines().next(), Some("cfg/"));
    assert!(!dir.path().join("escape").exists() && !mirror.join("escape").exists());

    let runs_before = read(&marker).unwrap().lines().count();
    writer.cli(&["put", "cfg/app.conf", "port = 2"]);
    writer.cli(&["del", "cfg/sub/db.conf"]);
    wait_until(
        "change and removal mirrored",
        Duration::from_secs(20),
        || {
            read(&mirror.join("app.conf")).as_deref() == Some("port = 2")
                && !mirror.join("sub").exists()
        },
    );
    wait_until("the hook ran again", Duration::from_secs(20), || {
        read(&marker).unwrap().lines().count() > runs_before
    });
    assert_eq!(
        read(&mirror.join("not-mine.txt")).as_deref(),
        Some("user file")
    );
    let leftovers: Vec<String> = std::fs::read_dir(&mirror)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains("tmp"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
}

#[test]
fn bad_http_input_gets_a_json_4xx() {
    let net = Net::new("test");
    let a = net.agent(1, &[]);
    let cases: Vec<(&str, String, Vec<u8>, u16)> = vec![
        ("GET", "/v1/kv/%FF%FE".into(), vec![], 400),
        ("PUT", "/v1/kv/%C3%28".into(), b"x".to_vec(), 400),
        ("GET", "/v1/kv?prefix=%zz".into(), vec![], 400),
        ("GET", "/v1/kv?prefix=%FF".into(), vec![], 400),
        ("GET", "/v1/kv?bogus=1".into(), vec![], 400),
        ("GET", "/v1/watch?from=abc".into(), vec![], 400),
        ("PUT", "/v1/kv/".into(), b"x".to_vec(), 400),
        ("PUT", "/v1/kv/big".into(), vec![b'x'; 2 * 1024 * 1024], 413),
        ("PUT", "/v1/kv/biggish".into(), vec![b'x'; 900 * 1024], 413),
        (
            "PUT",
            format!("/v1/kv/{}", "k".repeat(5000)),
            b"x".to_vec(),
            400,
        ),
        ("GET", "/v1/kv/absent".into(), vec![], 404),
        ("DELETE", "/v1/kv/absent".into(), vec![], 404),
        ("POST", "/v1/kv/x".into(), b"x".to_vec(), 405),
        ("GET", "/v2/nothing".into(), vec![], 404),
    ];
    for (method, path, body, expected) in cases {
        let (status, resp) = http(a.http, method, &path, &[], &body);
        let short: String = path.chars().take(40).collect();
        assert_eq!(
            status,
            expected,
            "{method} {short}: {}",
            String::from_utf8_lossy(&resp)
        );
        let json: Value = serde_json::from_slice(&resp).unwrap_or_else(|e| {
            panic!(
                "{method} {short}: not JSON ({e}): {}",
                String::from_utf8_lossy(&resp)
            )
        });
        assert!(
            json["error"].as_str().is_some_and(|e| !e.is_empty()),
            "{json}"
        );
    }
    let (status, _) = http(
        a.http,
        "GET",
        "/v1/watch?prefix=a",
        &[("Last-Event-ID", "x")],
        b"",
    );
    assert_eq!(status, 400);
    // Keys with slashes and escapes round-trip; the agent is still serving.
    let (status, _) = http(a.http, "PUT", "/v1/kv/a/b%20c/d", &[], b"v");
    assert_eq!(status, 200);
    let (status, body) = http(a.http, "GET", "/v1/kv/a/b%20c/d", &[], b"");
    assert_eq!((status, body.as_slice()), (200, b"v".as_slice()));
    let list = a.json("/v1/kv?prefix=a%2Fb");
    assert_eq!(list["entries"][0]["key"], "a/b c/d");
}

#[test]
fn an_unkeyed_agent_off_the_loopback_refuses_to_start_and_says_how_to_fix_it() {
    let (_, group) = random_group();
    let group = group.to_string();
    let http = local_http().to_string();
    // An interface that does not exist: were the check missing, the node would fail to start
    // on it, so this test never sends a datagram either way.
    let base = [
        "agent",
        "--group",
        &group,
        "--iface",
        "no-such-if0",
        "--http",
        &http,
    ];
    let run = |extra: &[&str]| {
        let child = Command::new(BIN)
            .args(base)
            .args(extra)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let out = wait_output(child, Duration::from_secs(30));
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let (code, err) = run(&[]);
    assert_eq!(code, Some(2), "{err}");
    for fix in ["chorus keygen", "--key-file", "--insecure", "no-such-if0"] {
        assert!(err.contains(fix), "the refusal does not say {fix:?}: {err}");
    }
    // --insecure gets past the check; the node then fails on the interface, and says that.
    let (code, err) = run(&["--insecure"]);
    assert_eq!(code, Some(2), "{err}");
    assert!(!err.contains("chorus keygen"), "{err}");
    assert!(err.contains("no-such-if0"), "{err}");
}

#[test]
fn a_tokenless_api_answers_only_to_its_own_names() {
    let net = Net::new("test");
    let a = net.agent(1, &["--http-allow-host", "chorus.test"]);
    let port = a.http.port();
    for (host, expected) in [
        (format!("127.0.0.1:{port}"), 200),
        (format!("localhost:{port}"), 200),
        (format!("[::1]:{port}"), 200),
        (format!("chorus.test:{port}"), 200),
        // A page on evil.example, its name rebound to 127.0.0.1 (DNS rebinding).
        (format!("evil.example:{port}"), 403),
        (format!("localhost:{}", port.wrapping_add(1)), 403),
    ] {
        let (status, _) = http(a.http, "GET", "/v1/stats", &[("Host", &host)], b"");
        assert_eq!(status, expected, "Host: {host}");
    }
}

#[test]
fn sigterm_shuts_down_gracefully_without_losing_acknowledged_writes() {
    let net = Net::new("test");
    let mut a = net.agent(1, &[]);
    let b = net.agent(2, &[]);
    wait_until("two members", Duration::from_secs(20), || {
        a.json("/v1/members")["members"]
            .as_array()
            .is_some_and(|l| l.len() == 2)
    });
    for i in 0..20 {
        assert!(a.cli(&["put", &format!("last/{i}"), "v"]).status.success());
    }
    let pid = a.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(s) = a.child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "agent ignored SIGTERM:\n{}",
            a.log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}: {}", a.log_text());
    assert!(a.log_text().contains("agent stopped"));
    wait_until(
        "every acknowledged write on b",
        Duration::from_secs(20),
        || b.json("/v1/kv?prefix=last/")["count"] == 20,
    );
}

#[test]
fn demo_converges() {
    let child = Command::new(BIN)
        .args([
            "demo",
            "--nodes",
            "3",
            "--keys",
            "30",
            "--loss",
            "0.1",
            "--timeout",
            "60",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(150));
    let text = stdout(&out);
    assert!(
        out.status.success(),
        "{}\n{}",
        text,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("converged: 4 nodes hold the same"), "{text}");
    assert!(text.contains("NAKs"), "{text}");
}

#[test]
fn doctor_passes_on_the_loopback() {
    let out = Command::new(BIN)
        .args(["doctor", "--json"])
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(out.status.success(), "{report}");
    assert_eq!(report["ok"], true);
    let out = Command::new(BIN)
        .args(["doctor", "--iface", "no-such-if0"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(stdout(&out).contains("FAIL"));
}
