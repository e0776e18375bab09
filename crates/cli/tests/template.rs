//! Templates rendered from a live cluster: agents on loopback multicast (127.0.0.1, TTL 0, a
//! random group per test), `--template` in the agent and `chorus template --once`. Every wait
//! is bounded; agents are killed when their guard drops.

#![allow(clippy::unwrap_used)]

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use chorus_testkit::{Agent, temp_dir, wait_until};
use serde_json::Value;

mod common;

use common::{Api, BIN, Net};

const WAIT: Duration = Duration::from_secs(20);

fn read(path: &Path) -> Option<String> {
    std::fs::read_to_string(path).ok()
}

fn lines(path: &Path) -> usize {
    read(path).map_or(0, |t| t.lines().count())
}

/// The `templates` section of `/v1/stats`.
fn templates(agent: &Agent) -> Value {
    agent.json("/v1/stats")["templates"].clone()
}

fn figure(agent: &Agent, name: &str) -> u64 {
    templates(agent)[name]
        .as_u64()
        .unwrap_or_else(|| panic!("no template figure {name}"))
}

/// `chorus ARGS` against `agent`, with a bounded run time.
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

#[test]
fn a_write_on_one_agent_renders_the_template_on_the_other_and_runs_its_command_once_per_change() {
    let net = Net::new("tmpl");
    let dir = temp_dir("tmpl");
    let src = dir.path().join("app.conf.tmpl");
    let dest = dir.path().join("app.conf");
    let marker = dir.path().join("runs");
    std::fs::write(
        &src,
        "# rendered by chorus\n\
         url = {{ key(\"app/db/url\") }}\n\
         pool = {{ key_or_default(\"app/db/pool\", \"5\") }}\n\
         {% for h in ls(\"app/hosts\") %}\n\
         host {{ h.key }} {{ h.value }}\n\
         {% endfor %}\n",
    )
    .unwrap();
    let spec = format!(
        "{}:{}:echo \"$CHORUS_TEMPLATE_DESTINATION\" >> '{}'",
        src.display(),
        dest.display(),
        marker.display()
    );
    let writer = net.agent(1, &[]);
    let rendering = net.agent(2, &["--template", &spec, "--template-wait-ms", "50:500"]);
    wait_until("the two agents see each other", WAIT, || {
        writer.member_ids() == [2] && rendering.member_ids() == [1]
    });

    // A missing key: the rendering fails (counted, with the line), nothing is written, and
    // nothing runs; the key is a dependency all the same.
    wait_until("the first rendering failed", WAIT, || {
        figure(&rendering, "errors") >= 1
    });
    let last = templates(&rendering)["each"][0]["last_error"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        last.contains("line 2") && last.contains("app/db/url"),
        "{last}"
    );
    assert!(!dest.exists());

    writer.put("app/db/url", "postgres://db1/app");
    wait_until("rendered on the other agent", WAIT, || {
        read(&dest).is_some_and(|t| t.contains("url = postgres://db1/app"))
    });
    assert_eq!(
        read(&dest).unwrap(),
        "# rendered by chorus\nurl = postgres://db1/app\npool = 5\n"
    );
    wait_until("the command ran", WAIT, || lines(&marker) == 1);
    assert_eq!(read(&marker).unwrap().trim(), dest.display().to_string());

    // The same value again: a new version of a key the template read, rendered again, but
    // the output is identical: the file is not rewritten and the command does not run.
    let unchanged = figure(&rendering, "unchanged");
    writer.put("app/db/url", "postgres://db1/app");
    wait_until("the identical rendering", WAIT, || {
        figure(&rendering, "unchanged") > unchanged
    });
    // A key the template never read: no rendering at all.
    let renders = figure(&rendering, "renders");
    writer.put("unrelated/x", "1");
    wait_until("the unrelated write arrived", WAIT, || {
        rendering.value("unrelated/x").is_some()
    });
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(figure(&rendering, "renders"), renders);
    assert_eq!(lines(&marker), 1, "identical output ran the command");

    // A burst under a prefix `ls` read: one rendering, one command run.
    for (i, ip) in ["10.0.0.1", "10.0.0.2", "10.0.0.3"].iter().enumerate() {
        writer.put(&format!("app/hosts/h{i}"), ip);
    }
    writer.put("app/hosts/deeper/not-direct", "x");
    wait_until("the hosts rendered", WAIT, || {
        read(&dest).is_some_and(|t| t.contains("host h2 10.0.0.3"))
    });
    assert!(
        !read(&dest).unwrap().contains("deeper"),
        "ls lists direct children only"
    );
    wait_until("the command ran again", WAIT, || lines(&marker) == 2);
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(lines(&marker), 2, "a debounced burst runs the command once");

    // The key goes away: the rendering fails, the last good file stays, the error is counted.
    let good = read(&dest).unwrap();
    let errors = figure(&rendering, "errors");
    writer.delete("app/db/url");
    wait_until("the failed rendering", WAIT, || {
        figure(&rendering, "errors") > errors
    });
    assert_eq!(
        read(&dest).unwrap(),
        good,
        "a failed rendering keeps the last good file"
    );
    assert_eq!(lines(&marker), 2);
    let (_, metrics) = rendering.get("/metrics");
    let metrics = String::from_utf8(metrics).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("chorus_template_errors ") && l != "chorus_template_errors 0"),
        "{metrics}"
    );

    // Back again: rendered, the error cleared.
    writer.put("app/db/url", "postgres://db2/app");
    wait_until("rendered after the error", WAIT, || {
        read(&dest).is_some_and(|t| t.contains("db2"))
    });
    wait_until("the error cleared", WAIT, || {
        templates(&rendering)["each"][0]["last_error"].is_null()
    });
    wait_until("the command ran a third time", WAIT, || lines(&marker) == 3);
}

#[test]
fn template_once_renders_against_an_agent_and_reports_a_failure_with_its_line() {
    let net = Net::new("tmpl");
    let dir = temp_dir("tmpl-once");
    let agent = net.agent(1, &[]);
    agent.put("svc/web/port", "8080");
    agent.put("svc/web/hosts/a", "10.1.0.1");
    agent.put("svc/web/hosts/b", "10.1.0.2");
    agent.put("svc/web/hosts/b/weight", "3");

    let src = dir.path().join("web.tmpl");
    let dest = dir.path().join("web.conf");
    std::fs::write(
        &src,
        "listen {{ key('svc/web/port') }}\n\
         {% for e in tree('svc/web/hosts') %}\n\
         {{ e.key }}={{ e.value }}\n\
         {% endfor %}\n\
         node {{ node().id }} of {{ members()|length }}\n\
         debug={{ key_or_default('svc/web/debug', 'off') }}\n",
    )
    .unwrap();
    let spec = format!("{}:{}", src.display(), dest.display());
    let out = cli(&agent, &["template", &spec, "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let expected = "listen 8080\na=10.1.0.1\nb=10.1.0.2\nb/weight=3\nnode 1 of 1\ndebug=off\n";
    assert_eq!(read(&dest).unwrap(), expected);

    // To stdout; and a command runs only when the file changed.
    let out = cli(
        &agent,
        &["template", &format!("{}:-", src.display()), "--once"],
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), expected);
    let marker = dir.path().join("ran");
    let with_cmd = format!("{spec}:touch '{}'", marker.display());
    let out = cli(&agent, &["template", &with_cmd, "--once"]);
    assert!(out.status.success());
    assert!(!marker.exists(), "identical output ran the command");
    agent.put("svc/web/port", "9090");
    let out = cli(&agent, &["template", &with_cmd, "--once"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(marker.exists());

    // A missing key: an error naming the line and the key; the file keeps its content.
    let good = read(&dest).unwrap();
    let broken = dir.path().join("broken.tmpl");
    std::fs::write(&broken, "a\nb\nc={{ key('svc/web/missing') }}\n").unwrap();
    let out = cli(
        &agent,
        &[
            "template",
            &format!("{}:{}", broken.display(), dest.display()),
            "--once",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 3") && stderr.contains("svc/web/missing"),
        "{stderr}"
    );
    assert_eq!(read(&dest).unwrap(), good);

    // A syntax error: the line too.
    std::fs::write(&broken, "ok\n{% for x in %}\n").unwrap();
    let out = cli(
        &agent,
        &[
            "template",
            &format!("{}:{}", broken.display(), dest.display()),
            "--once",
        ],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("line 2"), "{stderr}");

    // Without --once it says what to do instead.
    let out = cli(&agent, &["template", &spec]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--template"));
}

#[test]
fn config_file_templates_render_members_and_a_command_that_overruns_is_killed() {
    let net = Net::new("tmpl");
    let dir = temp_dir("tmpl-config");
    let src = dir.path().join("members.tmpl");
    let dest = dir.path().join("members.txt");
    std::fs::write(
        &src,
        "{% for m in members() %}\n{{ m.id }} {{ m.ip }} {{ m.state }}\n{% endfor %}\n",
    )
    .unwrap();
    let config = dir.path().join("agent.toml");
    std::fs::write(
        &config,
        format!(
            "[[template]]\nsource = \"{}\"\ndestination = \"{}\"\ncommand = \"sleep 30\"\n\
             wait_min_ms = 50\ncommand_timeout_ms = 300\n",
            src.display(),
            dest.display()
        ),
    )
    .unwrap();
    let config = config.display().to_string();
    let first = net.agent(1, &["--config", &config]);
    // (Which address a node shows for itself depends on its socket: not asserted here.)
    wait_until("rendered alone", WAIT, || {
        read(&dest).is_some_and(|t| {
            t.lines().count() == 1 && t.starts_with("1 ") && t.ends_with(" self\n")
        })
    });
    wait_until("the command was killed", WAIT, || {
        figure(&first, "command_timeouts") >= 1
    });
    // A new member renders the file again.
    let _second = net.agent(2, &[]);
    wait_until("the new member rendered", WAIT, || {
        read(&dest).is_some_and(|t| t.contains("2 127.0.0.1 alive"))
    });

    // A template that does not parse stops the agent at start, naming the line.
    std::fs::write(&src, "{{ ok }}\n\n{% if %}\n").unwrap();
    let http = common::local_http();
    let out = Command::new(BIN)
        .args(net.args(3, http, &["--config", &config]))
        .env_remove("CHORUS_KEY_FILE")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("line 3"), "{stderr}");
}
