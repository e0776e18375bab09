//! The lab: a private network of node namespaces on a bridge (made by `tests/netns/lab.sh`),
//! a `chorus agent` in each, HTTP to each agent from inside its namespace, store dumps,
//! counters and bounded waits; dropping it kills its agents and deletes its namespaces.
//! (What the kernel of a namespace is told, iptables and the probe tool: `kernel`.)

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io;
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use chorus_testkit::http::Connection;
use nix::sched::{CloneFlags, setns};
use serde_json::Value;

use crate::store::{Store, Version, flatten_counters, member_ids, store_problems};

/// IPv4 group every multicast scenario uses (administratively scoped, TTL 1, lab bridge only).
pub(crate) const GROUP_V4: &str = "239.255.77.1:7400";
/// IPv6 group (site-local scope `ff15::/16`).
pub(crate) const GROUP_V6: &str = "[ff15::77]:7400";
/// Subnet broadcast address of the lab bridge.
pub(crate) const BROADCAST: &str = "10.77.0.255:7400";
/// Data port in peers mode.
pub(crate) const PEER_PORT: u16 = 7400;
/// Where each agent's HTTP API listens, inside its own namespace.
pub(crate) const HTTP_ADDR: &str = "127.0.0.1:7480";
/// Cluster name of the scenarios.
pub(crate) const CLUSTER: &str = "netns-lab";

/// One scenario at a time: they share the two cores of the machine.
pub(crate) static SERIAL: Mutex<()> = Mutex::new(());

pub(crate) fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

pub(crate) fn lab_script() -> PathBuf {
    repo_root().join("tests/netns/lab.sh")
}

/// Why namespaces cannot be made here, or `None` when they can.
pub(crate) fn lab_unavailable() -> Option<String> {
    match Command::new(lab_script()).arg("check").output() {
        Ok(out) if out.status.success() => None,
        Ok(out) => Some(format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout).trim(),
            String::from_utf8_lossy(&out.stderr).trim()
        )),
        Err(e) => Some(format!("cannot run {}: {e}", lab_script().display())),
    }
}

/// Runs `cmd`, panics with its output when it fails.
pub(crate) fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

/// How an agent's nodes reach each other.
#[derive(Clone, Debug)]
pub(crate) enum Transport {
    /// Multicast on [`GROUP_V4`].
    V4,
    /// Multicast on [`GROUP_V6`].
    V6,
    /// Subnet broadcast [`BROADCAST`].
    Broadcast,
    /// Unicast to the listed node indices.
    Peers(Vec<u8>),
}

/// Everything needed to (re)start one agent.
#[derive(Clone, Debug)]
pub(crate) struct AgentSpec {
    pub(crate) cluster: String,
    pub(crate) transport: Transport,
    /// Cluster key file; `None` runs the agent with `--insecure`.
    pub(crate) keys: Option<PathBuf>,
}

impl AgentSpec {
    pub(crate) fn new(transport: Transport) -> AgentSpec {
        AgentSpec {
            cluster: CLUSTER.to_owned(),
            transport,
            keys: None,
        }
    }
}

/// A running `chorus agent` inside a node namespace.
pub(crate) struct Agent {
    pub(crate) spec: AgentSpec,
    pub(crate) child: Child,
    pub(crate) http: Option<Connection>,
}

/// A private lab; dropping it kills its agents and deletes its namespaces.
pub(crate) struct Lab {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) agents: BTreeMap<u8, Agent>,
    pub(crate) nodes: BTreeSet<u8>,
    pub(crate) started: Instant,
    pub(crate) _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds lab `tag` with nodes `1..=nodes`, or returns `None` (after printing why) when
    /// namespaces cannot be made on this machine.
    pub(crate) fn new(tag: &str, nodes: u8) -> Option<Lab> {
        let serial = SERIAL
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Some(why) = lab_unavailable() {
            assert!(
                std::env::var("CHORUS_NETNS_REQUIRED").as_deref() != Ok("1"),
                "CHORUS_NETNS_REQUIRED=1 but network namespaces are unavailable: {why}"
            );
            eprintln!("SKIP netns {tag}: network namespaces unavailable here: {why}");
            return None;
        }
        run(Command::new(lab_script()).arg("clean-stale"));
        let name = format!("chorus-{}-{tag}", std::process::id());
        let dir = std::env::temp_dir().join(&name);
        // A directory left by an aborted run of the same pid is stale too.
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap_or_else(|e| panic!("mkdir {}: {e}", dir.display()));
        run(Command::new(lab_script())
            .args(["up", &name, &nodes.to_string()])
            .stdin(Stdio::null()));
        let lab = Lab {
            name,
            dir,
            agents: BTreeMap::new(),
            nodes: (1..=nodes).collect(),
            started: Instant::now(),
            _serial: serial,
        };
        lab.log(&format!(
            "lab {} up: {nodes} node namespaces, logs in {}",
            lab.name,
            lab.dir.display()
        ));
        Some(lab)
    }

    /// Prints a progress line prefixed with the time since the lab came up.
    pub(crate) fn log(&self, msg: &str) {
        eprintln!(
            "[{:>6.1}s {}] {msg}",
            self.started.elapsed().as_secs_f64(),
            self.name
        );
    }

    pub(crate) fn ns(&self, node: u8) -> String {
        format!("{}-n{node}", self.name)
    }

    pub(crate) fn addr(node: u8) -> String {
        format!("10.77.0.{node}")
    }

    /// Adds node namespace `node` (a late joiner or an attacker).
    pub(crate) fn add_node(&mut self, node: u8) {
        run(Command::new(lab_script()).args(["add", &self.name, &node.to_string()]));
        self.nodes.insert(node);
    }

    /// Command line of an agent on `node`.
    pub(crate) fn agent_args(&self, node: u8, spec: &AgentSpec) -> Vec<String> {
        let mut args: Vec<String> = [
            "agent",
            "--cluster",
            &spec.cluster,
            "--node-id",
            &node.to_string(),
            "--http",
            HTTP_ADDR,
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        match &spec.keys {
            // Off the loopback an agent without a key refuses to start unless told otherwise:
            // the lab bridge reaches nothing but the lab, and the hostile scenario plays
            // against an unkeyed node on purpose.
            None => args.push("--insecure".to_owned()),
            Some(file) => args.extend(["--key-file".to_owned(), file.display().to_string()]),
        }
        // --iface and --ttl only mean something (and are only accepted) with multicast.
        let multicast =
            |group: &str| ["--group", group, "--iface", "eth0", "--ttl", "1"].map(str::to_owned);
        match &spec.transport {
            Transport::V4 => args.extend(multicast(GROUP_V4)),
            Transport::V6 => args.extend(multicast(GROUP_V6)),
            Transport::Broadcast => {
                args.extend(["--broadcast".to_owned(), BROADCAST.to_owned()]);
            }
            Transport::Peers(peers) => {
                let list: Vec<String> = peers
                    .iter()
                    .filter(|&&p| p != node)
                    .map(|&p| format!("{}:{PEER_PORT}", Lab::addr(p)))
                    .collect();
                args.extend([
                    "--peers".to_owned(),
                    list.join(","),
                    "--bind".to_owned(),
                    format!("{}:{PEER_PORT}", Lab::addr(node)),
                ]);
            }
        }
        args
    }

    /// Starts an agent on `node` and waits until its HTTP API answers.
    pub(crate) fn start_agent(&mut self, node: u8, spec: AgentSpec) {
        assert!(self.nodes.contains(&node), "node {node} has no namespace");
        assert!(
            !self.agents.contains_key(&node),
            "node {node} already runs an agent"
        );
        let log_path = self.dir.join(format!("n{node}.log"));
        let log = File::options()
            .create(true)
            .append(true)
            .open(&log_path)
            .unwrap_or_else(|e| panic!("open {}: {e}", log_path.display()));
        let err_log = log
            .try_clone()
            .unwrap_or_else(|e| panic!("dup {}: {e}", log_path.display()));
        let args = self.agent_args(node, &spec);
        let child = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.ns(node),
                env!("CARGO_BIN_EXE_chorus"),
            ])
            .args(&args)
            .env("NO_COLOR", "1")
            .env(
                "RUST_LOG",
                std::env::var("CHORUS_NETNS_LOG").unwrap_or_else(|_| "info".to_owned()),
            )
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err_log)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn agent on node {node}: {e}"));
        self.log(&format!("node {node}: chorus {}", args.join(" ")));
        self.agents.insert(
            node,
            Agent {
                spec,
                child,
                http: None,
            },
        );
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            match self.connect(node) {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!(
                        "node {node}: HTTP API never answered: {e}\n{}",
                        self.log_tail(node)
                    )
                }
                Err(_) => thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Opens (or reopens) the HTTP connection to `node`'s agent.
    pub(crate) fn connect(&mut self, node: u8) -> io::Result<()> {
        let ns = self.ns(node);
        let agent = self.agents.get_mut(&node).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no agent on node {node}"))
        })?;
        if let Some(status) = agent.child.try_wait()? {
            return Err(io::Error::other(format!(
                "agent on node {node} exited: {status}"
            )));
        }
        let mut http = connect_in(&ns)?;
        http.request("GET", "/v1/members", &[], b"")?;
        agent.http = Some(http);
        Ok(())
    }

    /// SIGKILLs `node`'s agent and returns how it was started.
    pub(crate) fn kill9(&mut self, node: u8) -> AgentSpec {
        let mut agent = self
            .agents
            .remove(&node)
            .unwrap_or_else(|| panic!("no agent on node {node}"));
        // `ip netns exec` execs the agent, so the child pid is the agent itself.
        agent
            .child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 node {node}: {e}"));
        let _ = agent.child.wait();
        self.log(&format!("node {node}: kill -9"));
        agent.spec
    }

    /// Stops `node`'s agent the hard way (SIGKILL) without restarting it.
    pub(crate) fn stop_agent(&mut self, node: u8) {
        self.kill9(node);
    }

    /// Asserts that every agent process is still running.
    pub(crate) fn assert_alive(&mut self) {
        let mut dead = Vec::new();
        for (node, agent) in &mut self.agents {
            if let Ok(Some(status)) = agent.child.try_wait() {
                dead.push((*node, status));
            }
        }
        if let Some((node, status)) = dead.first() {
            let tails: Vec<String> = dead.iter().map(|(n, _)| self.log_tail(*n)).collect();
            panic!("node {node}: agent died: {status}\n{}", tails.join("\n"));
        }
    }

    /// The last lines of `node`'s agent log.
    pub(crate) fn log_tail(&self, node: u8) -> String {
        let path = self.dir.join(format!("n{node}.log"));
        let text = fs::read_to_string(&path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        let from = lines.len().saturating_sub(30);
        format!(
            "--- last lines of {} ---\n{}",
            path.display(),
            lines[from..].join("\n")
        )
    }

    /// One HTTP request to `node`'s agent, reconnecting once if the connection broke.
    pub(crate) fn http(
        &mut self,
        node: u8,
        method: &str,
        path: &str,
        body: &[u8],
    ) -> (u16, Vec<u8>) {
        for attempt in 0..2 {
            let agent = self
                .agents
                .get_mut(&node)
                .unwrap_or_else(|| panic!("no agent on node {node}"));
            if let Some(http) = agent.http.as_mut() {
                match http.request(method, path, &[], body) {
                    Ok(response) => return response,
                    Err(e) if attempt == 1 => {
                        panic!("node {node}: {method} {path}: {e}\n{}", self.log_tail(node))
                    }
                    Err(_) => agent.http = None,
                }
            }
            if let Err(e) = self.connect(node) {
                panic!(
                    "node {node}: reconnect for {method} {path}: {e}\n{}",
                    self.log_tail(node)
                );
            }
        }
        unreachable!("the second attempt returns or panics")
    }

    /// `GET path` on `node`, parsed as JSON; panics unless the status is 200.
    pub(crate) fn get_json(&mut self, node: u8, path: &str) -> Value {
        let (status, body) = self.http(node, "GET", path, b"");
        assert_eq!(
            status,
            200,
            "node {node}: GET {path}: {}",
            String::from_utf8_lossy(&body)
        );
        serde_json::from_slice(&body)
            .unwrap_or_else(|e| panic!("node {node}: GET {path}: bad JSON ({e})"))
    }

    /// The full store of `node`.
    pub(crate) fn dump(&mut self, node: u8) -> Store {
        Store::from_json(&self.get_json(node, "/v1/kv?prefix="))
            .unwrap_or_else(|e| panic!("node {node}: store dump: {e}"))
    }

    /// Counters of `node` (`/v1/stats`) flattened to `name → value`.
    pub(crate) fn stats(&mut self, node: u8) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        flatten_counters("", &self.get_json(node, "/v1/stats"), &mut out);
        out
    }

    /// Writes `writes` (key, value) pairs through `node`, pipelined; returns the version of
    /// each write as the API reported it.
    pub(crate) fn put_many(&mut self, node: u8, writes: &[(String, String)]) -> Vec<Version> {
        // A fresh connection: the agent closes one that stayed idle longer than its
        // header-read timeout, and a pipeline is not retried.
        if let Err(e) = self.connect(node) {
            panic!(
                "node {node}: connect for PUTs: {e}\n{}",
                self.log_tail(node)
            );
        }
        let agent = self
            .agents
            .get_mut(&node)
            .unwrap_or_else(|| panic!("no agent on node {node}"));
        let http = agent
            .http
            .as_mut()
            .unwrap_or_else(|| panic!("node {node}: not connected"));
        let requests: Vec<(String, Vec<u8>)> = writes
            .iter()
            .map(|(k, v)| (format!("/v1/kv/{k}"), v.as_bytes().to_vec()))
            .collect();
        let responses = http
            .pipeline("PUT", &requests)
            .unwrap_or_else(|e| panic!("node {node}: pipelined PUTs: {e}"));
        responses
            .into_iter()
            .zip(writes)
            .map(|((status, body), (key, _))| {
                assert!(
                    status == 200 || status == 201 || status == 204,
                    "node {node}: PUT {key}: {status} {}",
                    String::from_utf8_lossy(&body)
                );
                Version::from_put_response(&body)
                    .unwrap_or_else(|e| panic!("node {node}: PUT {key}: {e}"))
            })
            .collect()
    }

    /// Deletes `key` through `node`.
    pub(crate) fn delete(&mut self, node: u8, key: &str) {
        let (status, body) = self.http(node, "DELETE", &format!("/v1/kv/{key}"), b"");
        assert!(
            status < 300 || status == 404,
            "node {node}: DELETE {key}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Waits until every listed node holds exactly `expected` (keys and values), and all of
    /// them the same versions; panics with a diff after `timeout`.
    pub(crate) fn await_stores(
        &mut self,
        nodes: &[u8],
        expected: &BTreeMap<String, String>,
        timeout: Duration,
    ) {
        let start = Instant::now();
        let mut last_report = Instant::now();
        loop {
            self.assert_alive();
            let dumps: Vec<(u8, Store)> = nodes.iter().map(|&n| (n, self.dump(n))).collect();
            let problems = store_problems(&dumps, expected);
            if problems.is_empty() {
                self.log(&format!(
                    "nodes {nodes:?}: {} keys identical everywhere after {:.1}s",
                    expected.len(),
                    start.elapsed().as_secs_f64()
                ));
                return;
            }
            if start.elapsed() > timeout {
                let mut report = String::new();
                for &node in nodes {
                    let stats = self.stats(node);
                    let nonzero: Vec<String> = stats
                        .iter()
                        .filter(|(_, v)| **v > 0)
                        .map(|(k, v)| format!("{}={v}", k.trim_start_matches("counters.")))
                        .collect();
                    let health = self.http(node, "GET", "/v1/health", b"").0;
                    let _ = writeln!(
                        report,
                        "node {node}: /v1/health {health}; counters: {}\n{}",
                        nonzero.join(" "),
                        self.log_tail(node)
                    );
                }
                panic!(
                    "nodes {nodes:?} did not converge within {timeout:?}:\n{problems}\n{report}"
                );
            }
            if last_report.elapsed() > Duration::from_secs(5) {
                last_report = Instant::now();
                let counts: Vec<String> = dumps
                    .iter()
                    .map(|(n, s)| format!("n{n}={}", s.entries.len()))
                    .collect();
                self.log(&format!(
                    "waiting: {} of {} keys ({})",
                    counts.join(" "),
                    expected.len(),
                    problems.lines().next().unwrap_or("")
                ));
            }
            thread::sleep(Duration::from_millis(500));
        }
    }

    /// Waits until `GET /v1/health` on `node` answers 200.
    pub(crate) fn await_health(&mut self, node: u8, timeout: Duration) {
        let start = Instant::now();
        loop {
            let (status, _) = self.http(node, "GET", "/v1/health", b"");
            if status == 200 {
                self.log(&format!(
                    "node {node}: healthy after {:.1}s",
                    start.elapsed().as_secs_f64()
                ));
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "node {node}: /v1/health not 200 within {timeout:?} (last {status})"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }

    /// Waits until every listed node lists all of them as members.
    pub(crate) fn await_members(&mut self, nodes: &[u8], timeout: Duration) {
        let start = Instant::now();
        loop {
            let mut missing = Vec::new();
            for &node in nodes {
                let seen = member_ids(&self.get_json(node, "/v1/members"));
                for &other in nodes {
                    if !seen.contains(&u64::from(other)) {
                        missing.push((node, other));
                    }
                }
            }
            if missing.is_empty() {
                self.log(&format!(
                    "nodes {nodes:?} see each other after {:.1}s",
                    start.elapsed().as_secs_f64()
                ));
                return;
            }
            assert!(
                start.elapsed() < timeout,
                "membership incomplete after {timeout:?}: (observer, missing) {missing:?}"
            );
            thread::sleep(Duration::from_millis(250));
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let failed = thread::panicking();
        for (node, agent) in &mut self.agents {
            let _ = agent.child.kill();
            let _ = agent.child.wait();
            if failed {
                eprintln!("node {node} killed");
            }
        }
        let down = Command::new(lab_script())
            .args(["down", &self.name])
            .status();
        if !matches!(down, Ok(s) if s.success()) {
            eprintln!("lab.sh down {} failed: {down:?}", self.name);
        }
        if failed {
            eprintln!("agent logs kept in {}", self.dir.display());
        } else {
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Connects to [`HTTP_ADDR`] in namespace `ns`: a short-lived thread enters the namespace
/// (`setns` only moves the calling thread) and the socket it creates stays there. Reads and
/// writes time out after 30 s.
fn connect_in(ns: &str) -> io::Result<Connection> {
    let path = format!("/run/netns/{ns}");
    let addr: SocketAddr = HTTP_ADDR
        .parse()
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, format!("{e}")))?;
    let stream = thread::scope(|s| {
        s.spawn(|| -> io::Result<TcpStream> {
            let netns = File::open(&path)?;
            setns(&netns, CloneFlags::CLONE_NEWNET).map_err(io::Error::from)?;
            TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        })
        .join()
        .map_err(|_| io::Error::other("connect thread panicked"))?
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    stream.set_write_timeout(Some(Duration::from_secs(30)))?;
    Connection::new(stream, HTTP_ADDR)
}
