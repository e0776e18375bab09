//! Helpers shared by the transport's socket tests.
//!
//! The network rule holds for everything here: multicast and broadcast only over
//! the loopback (127.0.0.1, TTL 0) or inside a network namespace the test makes.

#![allow(dead_code, clippy::unwrap_used)]

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use chorus_transport::{DatagramTransport, Received};

/// How long any single test waits for a datagram that should come.
pub const TIMEOUT: Duration = Duration::from_secs(5);

/// Receives until `want` payloads (as strings) have all been seen, or `TIMEOUT`.
/// Returns everything received, duplicates included.
pub async fn recv_until_all<T: DatagramTransport>(t: &T, want: &BTreeSet<String>) -> Vec<Received> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let seen: BTreeSet<String> = out.iter().map(text).collect();
        if want.is_subset(&seen) {
            return out;
        }
        match tokio::time::timeout_at(deadline, t.recv_batch(&mut out, 64)).await {
            Ok(result) => {
                result.unwrap();
            }
            Err(_) => {
                let missing: Vec<_> = want.difference(&seen).collect();
                panic!(
                    "timed out after {TIMEOUT:?}: still missing {missing:?}; got {:?}",
                    out.iter().map(text).collect::<Vec<_>>()
                );
            }
        }
    }
}

/// Receives whatever arrives within `window`.
pub async fn recv_for<T: DatagramTransport>(t: &T, window: Duration) -> Vec<Received> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(result) = tokio::time::timeout_at(deadline, t.recv_batch(&mut out, 64)).await {
        result.unwrap();
    }
    out
}

/// A payload as text.
pub fn text(r: &Received) -> String {
    String::from_utf8_lossy(&r.payload).into_owned()
}

/// `prefix-0` .. `prefix-(n-1)`.
pub fn labels(prefix: &str, n: usize) -> BTreeSet<String> {
    (0..n).map(|i| format!("{prefix}-{i}")).collect()
}

/// Path of a helper script in `tests/python/`.
pub fn python_script(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/python")
        .join(name)
}

/// Whether `python3` runs; prints why a test is skipped when it does not.
pub fn have_python(test: &str) -> bool {
    match Command::new("python3").arg("--version").output() {
        Ok(o) if o.status.success() => true,
        _ => {
            println!("SKIPPED {test}: python3 is not installed (apt-get install python3)");
            false
        }
    }
}

/// Runs a command inside the test's network namespace and fails the test if it fails.
pub fn sh(cmd: &str) {
    let out = Command::new("sh").arg("-c").arg(cmd).output().unwrap();
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Waits (at most `TIMEOUT`) until each interface's operational state is `up`:
/// a veth's carrier comes up a moment after `ip link set up`, and until it does,
/// IPv6 sends through it fail with ENETUNREACH.
pub fn wait_until_up(interfaces: &[&str]) {
    let deadline = std::time::Instant::now() + TIMEOUT;
    for name in interfaces {
        // Not /sys/class/net: /sys still shows the parent namespace's interfaces.
        let state = || {
            let out = Command::new("ip")
                .args(["-br", "link", "show", "dev", name])
                .output()
                .unwrap();
            let text = String::from_utf8_lossy(&out.stdout).into_owned();
            text.split_whitespace()
                .nth(1)
                .unwrap_or_default()
                .to_owned()
        };
        loop {
            let now = state();
            if now == "UP" {
                break;
            }
            assert!(
                std::time::Instant::now() < deadline,
                "{name} is still `{now}` after {TIMEOUT:?}"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

const CHILD_ENV: &str = "CHORUS_TRANSPORT_NETNS_CHILD";
const CHILD_MARK: &str = "chorus-transport: running inside a private network namespace";

/// Runs `body` inside a fresh network namespace: the test binary re-executes
/// itself under `unshare --net` (as root) or `unshare --net --map-root-user`
/// (unprivileged user namespaces), filtered to this one test, with an
/// environment variable marking the child. In the child `body` runs; in the
/// parent the child's result is checked. Skips, with a printed reason, when no
/// namespace can be made.
///
/// `test` must be the test function's full name as libtest prints it.
pub fn in_netns(test: &str, body: impl FnOnce()) {
    if std::env::var(CHILD_ENV).as_deref() == Ok(test) {
        println!("{CHILD_MARK}");
        body();
        return;
    }
    let exe = std::env::current_exe().unwrap();
    let mut why = String::new();
    for flags in [&["--net"][..], &["--net", "--map-root-user"][..]] {
        let output = Command::new("unshare")
            .args(flags)
            .arg(&exe)
            .args([test, "--exact", "--nocapture", "--test-threads=1"])
            .env(CHILD_ENV, test)
            .output();
        let output = match output {
            Ok(output) => output,
            Err(e) => {
                println!("SKIPPED {test}: cannot run `unshare` ({e}); install util-linux");
                return;
            }
        };
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if stdout.contains(CHILD_MARK) {
            assert!(
                output.status.success() && stdout.contains("1 passed"),
                "{test} failed inside its network namespace:\n{stdout}\n{stderr}"
            );
            println!("{stdout}");
            return;
        }
        why = format!("`unshare {}`: {}", flags.join(" "), stderr.trim());
    }
    println!(
        "SKIPPED {test}: cannot create a network namespace (needs root, or unprivileged \
         user namespaces): {why}"
    );
}

/// A current-thread tokio runtime for namespace children.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}
