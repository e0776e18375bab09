//! The dashboard at `/ui` in a real browser: three agents on loopback multicast (127.0.0.1,
//! TTL 0, a random group), headless Chromium (Debian `chromium`) against one agent's `/ui`
//! until the members table shows every node, and a screenshot under the test's temp dir; and
//! `chorus demo --ui`, which keeps its cluster running until Ctrl-C.
//!
//! Chromium loads only the agent's page: a fresh profile in the temp dir, background
//! networking, updates, sync and extensions off, and every host name but 127.0.0.1 resolving
//! to nothing. Where `chromium` is not installed the browser test says that it skips.
//! Every wait is bounded; agents are killed when their guard drops.

#![allow(clippy::unwrap_used)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use chorus_testkit::http::{request, try_request};
use chorus_testkit::net::random_u64;
use chorus_testkit::{Agent, Ready, temp_dir, wait_until};

mod common;

use common::{Api, BIN, Net, agent_command, local_http};

const TOKEN: &str = "ui-test-token";

/// The `chromium` executable on `PATH`, if any.
fn chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .flat_map(|dir| ["chromium", "chromium-browser"].map(|name| dir.join(name)))
        .find(|p| p.is_file())
}

/// Runs headless Chromium on `url` with `extra` flags and a fresh profile under `dir`; kills
/// it after `timeout`. `None` when it did not finish in time.
fn run_chromium(bin: &Path, dir: &Path, extra: &[String], url: &str) -> Option<Output> {
    let profile = dir.join(format!("profile-{:x}", random_u64()));
    let mut command = Command::new(bin);
    command
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--no-default-browser-check",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--disable-default-apps",
            "--disable-extensions",
            "--disable-breakpad",
            "--disable-domain-reliability",
            "--no-proxy-server",
            // Any name but the agent's address resolves to nothing: no request leaves this host.
            "--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let child = command.spawn().unwrap();
    wait_output(child, Duration::from_secs(45))
}

/// The output of `child`, or `None` (after killing it) when it runs past `timeout`.
fn wait_output(mut child: Child, timeout: Duration) -> Option<Output> {
    let deadline = Instant::now() + timeout;
    loop {
        if child.try_wait().unwrap().is_some() {
            return Some(child.wait_with_output().unwrap());
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The DOM of `url` after its scripts ran for `budget_ms` of virtual time.
fn dump_dom(bin: &Path, dir: &Path, url: &str, budget_ms: u64) -> Option<String> {
    let out = run_chromium(
        bin,
        dir,
        &[
            format!("--virtual-time-budget={budget_ms}"),
            "--dump-dom".into(),
        ],
        url,
    )?;
    Some(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The `<tbody>` of the members table in a dumped DOM.
fn members_body(dom: &str) -> &str {
    let table = dom.find("<table id=\"members\"").map_or("", |i| &dom[i..]);
    let start = table.find("<tbody>").map_or(table.len(), |i| i + 7);
    let end = table.find("</tbody>").unwrap_or(table.len()).max(start);
    &table[start..end]
}

fn shows_every_node(dom: &str, ids: &[u64]) -> bool {
    let body = members_body(dom);
    ids.iter()
        .all(|id| body.contains(&format!("<tr data-node-id=\"{id}\"")))
}

/// `GET path` of an agent with the test's token.
fn get_with_token(agent: &Agent, path: &str) -> (u16, Vec<u8>) {
    let auth = format!("Bearer {TOKEN}");
    request(agent.http, "GET", path, &[("Authorization", &auth)], b"")
}

fn member_ids_with_token(agent: &Agent) -> Vec<u64> {
    let (status, body) = get_with_token(agent, "/v1/members");
    if status != 200 {
        return Vec::new();
    }
    let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
    let mut ids: Vec<u64> = v["members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|m| m["node_id"].as_u64())
        .collect();
    ids.sort_unstable();
    ids
}

#[test]
fn the_dashboard_shows_every_member_in_headless_chromium() {
    let Some(browser) = chromium() else {
        eprintln!(
            "skipping: chromium is not installed (Debian package `chromium`; .ci/run installs it)"
        );
        return;
    };
    let dir = temp_dir("ui");
    let net = Net::new("ui");
    // Node 1, whose dashboard is opened, has a bearer token: the page must send it.
    let http = local_http();
    let args = net.args(1, http, &["--http-token", TOKEN]);
    let first = Agent::spawn_until(agent_command(BIN, &args), http, Ready::Listening);
    let second = net.agent(2, &[]);
    let third = net.agent(3, &[]);
    wait_until("three members", Duration::from_secs(30), || {
        member_ids_with_token(&first) == [1, 2, 3]
            && second.member_ids() == [1, 3]
            && third.member_ids() == [1, 2]
    });
    let (status, _) = request(
        second.http,
        "PUT",
        "/v1/kv/app/greeting",
        &[],
        b"hello from node 2",
    );
    assert_eq!(status, 200);
    wait_until("the key reached node 1", Duration::from_secs(20), || {
        get_with_token(&first, "/v1/kv/app/greeting").0 == 200
    });

    // Without a token the page asks for one (and shows no member).
    let url = format!("{}/ui", first.url());
    let dom = dump_dom(&browser, dir.path(), &url, 3000).expect("chromium did not finish");
    assert!(
        dom.contains("<section id=\"login\" class=\"card\">"),
        "no token prompt: {dom}"
    );
    assert!(
        !shows_every_node(&dom, &[1]),
        "members shown without a token"
    );

    // With the token (handed over in the fragment, which is never sent to the server), the
    // members table fills; the agents are polled every second, so retry for a while.
    let with_token = format!("{url}#token={TOKEN}");
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut last = String::new();
    let mut attempts = 0;
    while Instant::now() < deadline {
        attempts += 1;
        if let Some(dom) = dump_dom(&browser, dir.path(), &with_token, 5000) {
            if shows_every_node(&dom, &[1, 2, 3]) {
                last = dom;
                break;
            }
            last = dom;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        shows_every_node(&last, &[1, 2, 3]),
        "after {attempts} attempts the members table lacks a node: {}",
        members_body(&last)
    );
    assert!(members_body(&last).contains("data-state=\"self\""));
    assert!(last.contains("app/greeting"), "key browser: {last}");
    eprintln!("members table complete after {attempts} chromium run(s)");

    let shot = dir.path().join("dashboard.png");
    let out = run_chromium(
        &browser,
        dir.path(),
        &[
            "--virtual-time-budget=5000".into(),
            "--window-size=1280,900".into(),
            format!("--screenshot={}", shot.display()),
        ],
        &with_token,
    )
    .expect("chromium did not finish the screenshot");
    let png = std::fs::read(&shot).unwrap_or_else(|e| {
        panic!(
            "no screenshot at {} ({e}): {}",
            shot.display(),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 10_000);
    eprintln!("screenshot: {} ({} bytes)", shot.display(), png.len());
    if let Some(keep) = std::env::var_os("CHORUS_UI_SCREENSHOT") {
        std::fs::copy(&shot, &keep).unwrap();
        eprintln!("screenshot copied to {}", Path::new(&keep).display());
    }
    drop((first, second, third));
}

#[test]
fn the_dashboard_needs_no_token_for_its_files_and_keeps_the_host_check() {
    let net = Net::new("ui");
    let open = net.agent(1, &[]);
    let (status, body) = open.get("/ui");
    assert_eq!(status, 200);
    assert!(String::from_utf8_lossy(&body).contains("/ui/app.js"));
    let port = open.http.port();
    for path in ["/ui", "/ui/app.js"] {
        let host = format!("evil.example:{port}");
        let (status, _) = request(open.http, "GET", path, &[("Host", &host)], b"");
        assert_eq!(status, 403, "{path} answered a rebound name");
    }

    let http = local_http();
    let args = net.args(2, http, &["--http-token", TOKEN]);
    let closed = Agent::spawn_until(agent_command(BIN, &args), http, Ready::Listening);
    let (status, _) = request(closed.http, "GET", "/ui/api.js", &[], b"");
    assert_eq!(status, 200, "the page's files hold no secret");
    let (status, _) = request(closed.http, "GET", "/v1/members", &[], b"");
    assert_eq!(status, 401);
}

/// Lines of a child's stdout, read on a thread.
fn lines_of(child: &mut Child) -> mpsc::Receiver<String> {
    let out = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn wait_status(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().unwrap() {
            return Some(status);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    None
}

/// Stops the demo (and so its agents) if the test fails before it did.
struct Demo(Child);

impl Demo {
    fn interrupt(&self) {
        let pid = nix::unistd::Pid::from_raw(i32::try_from(self.0.id()).unwrap());
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGINT);
    }
}

impl Drop for Demo {
    fn drop(&mut self) {
        if matches!(self.0.try_wait(), Ok(None)) {
            self.interrupt();
            if wait_status(&mut self.0, Duration::from_secs(15)).is_none() {
                let _ = self.0.kill();
                let _ = self.0.wait();
            }
        }
    }
}

#[test]
fn demo_ui_keeps_the_cluster_running_until_ctrl_c() {
    let child = Command::new(BIN)
        .args([
            "demo", "--nodes", "2", "--keys", "10", "--loss", "0", "--ui",
        ])
        .args(["--seed", &random_u64().to_string()])
        .env_remove("CHORUS_KEY_FILE")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut demo = Demo(child);
    let lines = lines_of(&mut demo.0);
    let stderr = demo.0.stderr.take().unwrap();
    let stderr = std::thread::spawn(move || {
        let mut text = String::new();
        let _ = std::io::Read::read_to_string(&mut BufReader::new(stderr), &mut text);
        text
    });
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut urls = Vec::new();
    let mut seen = Vec::new();
    // Two nodes and the late joiner.
    while urls.len() < 3 {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = lines
            .recv_timeout(left)
            .unwrap_or_else(|_| panic!("no dashboard URLs within 120 s; stdout so far: {seen:#?}"));
        if let Some((_, url)) = line.trim().split_once(": http://") {
            urls.push(format!("http://{url}"));
        }
        seen.push(line);
    }
    assert!(
        seen.iter().any(|l| l.starts_with("converged:")),
        "{seen:#?}"
    );
    let mut addrs = Vec::new();
    for url in &urls {
        let rest = url.strip_prefix("http://").unwrap();
        let (addr, path) = rest.split_once('/').unwrap();
        assert_eq!(path, "ui", "{url}");
        let addr: std::net::SocketAddr = addr.parse().unwrap();
        assert!(addr.ip().is_loopback(), "{url}");
        let (status, body) = request(addr, "GET", "/ui", &[], b"");
        assert_eq!(status, 200, "{url}");
        assert!(String::from_utf8_lossy(&body).contains("Chorus"));
        addrs.push(addr);
    }
    // The cluster is still there a while after it converged.
    std::thread::sleep(Duration::from_secs(1));
    for addr in &addrs {
        assert_eq!(request(*addr, "GET", "/v1/stats", &[], b"").0, 200);
    }

    // Ctrl-C: the demo stops every node and exits cleanly.
    demo.interrupt();
    let status = wait_status(&mut demo.0, Duration::from_secs(30)).expect("demo still running");
    let stderr = stderr.join().unwrap();
    assert!(status.success(), "demo exited with {status}: {stderr}");
    assert!(stderr.contains("SIGINT: stopping the 3 nodes"), "{stderr}");
    for addr in &addrs {
        assert!(
            try_request(*addr, "GET", "/v1/stats", &[], b"").is_err(),
            "node on {addr} still answers after the demo stopped"
        );
    }
}
