//! The Consul KV API (`chorus agent --consul-api`) driven by real Consul clients that nobody
//! here wrote, against two agents on the loopback:
//!
//! - py-consul, the PyPI package, from a virtual environment: `CHORUS_PY_CONSUL` names its
//!   python (`.ci/run` makes it), else `target/py-consul/bin/python` of the workspace;
//! - Debian's `python3-consul` (python-consul 0.7), with the system `/usr/bin/python3`.
//!
//! Each runs `tests/consul/kv_client.py`: put/get with flags, recurse, keys with a
//! separator, delete, cas, a blocking get on agent B woken by a write on agent A,
//! transactions (applied, and refused with 409), and the token. A client that is not
//! installed is skipped with a message saying so; the other one still runs.

#![allow(clippy::unwrap_used)]

mod common;

use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use chorus_testkit::http::request;
use chorus_testkit::{Agent, Ready, wait_until};
use common::{BIN, Net, agent_command, local_http};

const TOKEN: &str = "consul-test-token";
/// Longest run of one client script (its own waits are bounded well below).
const SCRIPT_TIMEOUT: Duration = Duration::from_secs(180);

/// An agent with its Consul API on a free loopback port, `extra` arguments after.
fn consul_agent(net: &Net, node: u64, extra: &[&str]) -> (Agent, SocketAddr) {
    let http = local_http();
    let consul = local_http();
    let consul_arg = consul.to_string();
    let mut args = vec!["--consul-api", consul_arg.as_str()];
    args.extend_from_slice(extra);
    let agent = Agent::spawn_until(
        agent_command(BIN, &net.args(node, http, &args)),
        http,
        Ready::Listening,
    );
    wait_until("the Consul API listens", Duration::from_secs(20), || {
        TcpStream::connect(consul).is_ok()
    });
    (agent, consul)
}

/// A Python interpreter with a Consul client, and what it is.
struct Client {
    name: &'static str,
    python: PathBuf,
}

/// The py-consul virtual environment's python, if there is one with py-consul in it.
fn py_consul() -> Result<Client, String> {
    let python = match std::env::var_os("CHORUS_PY_CONSUL") {
        Some(path) => PathBuf::from(path),
        None => Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target/py-consul/bin/python"),
    };
    if !python.exists() {
        return Err(format!(
            "no py-consul virtual environment at {} (set CHORUS_PY_CONSUL, or run .ci/run, or \
             `python3 -m venv target/py-consul && target/py-consul/bin/pip install py-consul`)",
            python.display()
        ));
    }
    let version = probe(
        &python,
        "import importlib.metadata as m; print(m.version('py-consul'))",
    )?;
    eprintln!("consul test: py-consul {version} ({})", python.display());
    Ok(Client {
        name: "py-consul",
        python,
    })
}

/// The system python with Debian's python3-consul.
fn debian_consul() -> Result<Client, String> {
    let python = PathBuf::from("/usr/bin/python3");
    let version = probe(
        &python,
        "import consul, sys; assert consul.__file__.startswith('/usr/lib/python3/'), \
         consul.__file__; print(consul.__version__)",
    )
    .map_err(|e| format!("{e} (install it with `apt-get install python3-consul`)"))?;
    eprintln!(
        "consul test: Debian python3-consul {version} ({})",
        python.display()
    );
    Ok(Client {
        name: "python3-consul (Debian)",
        python,
    })
}

/// Runs `code` with `python`; its first line of output, or why it failed.
fn probe(python: &Path, code: &str) -> Result<String, String> {
    let out = Command::new(python)
        .args(["-c", code])
        .stdin(Stdio::null())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", python.display()))?;
    if !out.status.success() {
        return Err(format!(
            "{} has no usable Consul client: {}",
            python.display(),
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Runs the client script (killed after [`SCRIPT_TIMEOUT`]).
fn run_script(client: &Client, a: SocketAddr, b: SocketAddr, prefix: &str) -> Output {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/consul/kv_client.py");
    let mut child = Command::new(&client.python)
        .arg(&script)
        .args([&a.to_string(), &b.to_string(), TOKEN, prefix])
        // The clients read these before their arguments.
        .env_remove("CONSUL_HTTP_ADDR")
        .env_remove("CONSUL_HTTP_TOKEN")
        .env_remove("CONSUL_HTTP_SSL")
        .env("PYTHONDONTWRITEBYTECODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {}: {e}", client.python.display()));
    let deadline = Instant::now() + SCRIPT_TIMEOUT;
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("{}: {e}", client.name))
}

#[test]
fn real_consul_clients_use_two_agents() {
    let clients: Vec<Client> = [py_consul(), debian_consul()]
        .into_iter()
        .filter_map(|found| match found {
            Ok(client) => Some(client),
            Err(why) => {
                eprintln!("consul test: SKIPPING a client: {why}");
                None
            }
        })
        .collect();
    if clients.is_empty() {
        eprintln!("consul test: SKIPPED: neither py-consul nor python3-consul is installed");
        return;
    }
    let net = Net::new("consul");
    let (agent_a, a) = consul_agent(&net, 1, &["--http-token", TOKEN]);
    let (agent_b, b) = consul_agent(&net, 2, &["--http-token", TOKEN]);
    for (i, client) in clients.iter().enumerate() {
        let out = run_script(client, a, b, &format!("client{i}"));
        let stdout = String::from_utf8_lossy(&out.stdout);
        let passed = stdout.lines().filter(|l| l.starts_with("ok: ")).count();
        eprintln!("consul test: {}: {passed} checks passed", client.name);
        assert!(
            out.status.success() && stdout.contains("all checks passed"),
            "{} failed ({}):\n{stdout}\n{}\nagent A:\n{}\nagent B:\n{}",
            client.name,
            out.status,
            String::from_utf8_lossy(&out.stderr),
            agent_a.log_text(),
            agent_b.log_text(),
        );
    }
}

#[test]
fn a_consul_api_off_the_loopback_needs_a_token() {
    let net = Net::new("consul-exposed");
    let http = local_http();
    let args = net.args(1, http, &["--consul-api", "0.0.0.0:1"]);
    let mut child = agent_command(BIN, &args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while child.try_wait().ok().flatten().is_none() && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started: {stderr}");
    assert!(
        stderr.contains("--consul-api") && stderr.contains("--http-token"),
        "{stderr}"
    );
}

#[test]
fn a_tokenless_consul_api_answers_on_the_loopback_to_its_own_names() {
    let net = Net::new("consul-local");
    let (_agent, consul) = consul_agent(&net, 1, &[]);
    let (status, body) = request(consul, "PUT", "/v1/kv/hello", &[], b"world");
    assert_eq!((status, body.as_slice()), (200, b"true".as_slice()));
    let (status, body) = request(consul, "GET", "/v1/kv/hello?raw", &[], b"");
    assert_eq!((status, body.as_slice()), (200, b"world".as_slice()));
    // A page whose name was rebound to 127.0.0.1 is refused, as on the native API.
    let (status, _) = request(
        consul,
        "GET",
        "/v1/kv/hello",
        &[("Host", &format!("evil.example:{}", consul.port()))],
        b"",
    );
    assert_eq!(status, 403);
}
