//! Multi-host proof in Linux network namespaces (docs/testing.md, "netns suite").
//!
//! Every scenario builds its own private lab with `tests/netns/lab.sh`: one namespace per node,
//! all of them plugged into a bridge that lives in a namespace of its own, so nothing is created
//! in, or sent from, the namespace the test runs in. Each node namespace runs a real
//! `chorus agent` process; its HTTP API listens on 127.0.0.1 *inside* that namespace and the test
//! reaches it over TCP connections opened from a thread that entered the namespace (`setns`).
//! Loss and partitions are kernel iptables rules inside the node namespaces; crashes are SIGKILL.
//! Every scenario ends by comparing full store dumps (`GET /v1/kv?prefix=`) of every node.
//!
//! The suite needs root, `ip`, `iptables` and `python3`; without them each test prints
//! `SKIP netns: ...` and passes, unless `CHORUS_NETNS_REQUIRED=1` is set (CI as root), which
//! turns the skip into a failure. Scenarios run one at a time (a process-wide lock): the machine
//! has two cores and five agents per scenario already keep them busy.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use nix::sched::{CloneFlags, setns};
use serde_json::Value;

/// IPv4 group every multicast scenario uses (administratively scoped, TTL 1, lab bridge only).
const GROUP_V4: &str = "239.255.77.1:7400";
/// IPv6 group (site-local scope `ff15::/16`).
const GROUP_V6: &str = "[ff15::77]:7400";
/// Subnet broadcast address of the lab bridge.
const BROADCAST: &str = "10.77.0.255:7400";
/// Data port in peers mode.
const PEER_PORT: u16 = 7400;
/// Where each agent's HTTP API listens, inside its own namespace.
const HTTP_ADDR: &str = "127.0.0.1:7480";
/// Cluster name of the scenarios.
const CLUSTER: &str = "netns-lab";

/// One scenario at a time: they share the two cores of the machine.
static SERIAL: Mutex<()> = Mutex::new(());

// ---------------------------------------------------------------------------------------------
// Lab: namespaces, iptables, agents
// ---------------------------------------------------------------------------------------------

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn lab_script() -> PathBuf {
    repo_root().join("tests/netns/lab.sh")
}

fn udp_tool() -> PathBuf {
    repo_root().join("tests/netns/udp_tool.py")
}

/// Why namespaces cannot be made here, or `None` when they can.
fn lab_unavailable() -> Option<String> {
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
fn run(cmd: &mut Command) -> Output {
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
enum Transport {
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
struct AgentSpec {
    cluster: String,
    transport: Transport,
    /// Cluster key file; `None` runs the agent with `--insecure`.
    keys: Option<PathBuf>,
}

impl AgentSpec {
    fn new(transport: Transport) -> AgentSpec {
        AgentSpec {
            cluster: CLUSTER.to_owned(),
            transport,
            keys: None,
        }
    }
}

/// A running `chorus agent` inside a node namespace.
struct Agent {
    spec: AgentSpec,
    child: Child,
    http: Option<Http>,
}

/// A private lab; dropping it kills its agents and deletes its namespaces.
struct Lab {
    name: String,
    dir: PathBuf,
    agents: BTreeMap<u8, Agent>,
    nodes: BTreeSet<u8>,
    started: Instant,
    _serial: MutexGuard<'static, ()>,
}

impl Lab {
    /// Builds lab `tag` with nodes `1..=nodes`, or returns `None` (after printing why) when
    /// namespaces cannot be made on this machine.
    fn new(tag: &str, nodes: u8) -> Option<Lab> {
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
    fn log(&self, msg: &str) {
        eprintln!(
            "[{:>6.1}s {}] {msg}",
            self.started.elapsed().as_secs_f64(),
            self.name
        );
    }

    fn ns(&self, node: u8) -> String {
        format!("{}-n{node}", self.name)
    }

    fn addr(node: u8) -> String {
        format!("10.77.0.{node}")
    }

    /// Adds node namespace `node` (a late joiner or an attacker).
    fn add_node(&mut self, node: u8) {
        run(Command::new(lab_script()).args(["add", &self.name, &node.to_string()]));
        self.nodes.insert(node);
    }

    /// Runs `program args` inside node `node`'s namespace and waits for it.
    fn exec(&self, node: u8, program: &str, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(node), program])
            .args(args)
            .stdin(Stdio::null()))
    }

    /// Appends an iptables (or ip6tables) rule in node `node`'s namespace.
    fn iptables(&self, node: u8, tool: &str, rule: &str) {
        let args: Vec<&str> = rule.split_whitespace().collect();
        self.exec(node, tool, &args);
    }

    /// Drops `probability` of the UDP datagrams arriving on eth0 of every listed node.
    /// Returns how many datagrams the INPUT DROP rules it replaced had dropped, on all nodes.
    fn set_loss(&self, nodes: &[u8], probability: f64) -> u64 {
        let mut dropped = 0;
        for &node in nodes {
            for tool in ["iptables", "ip6tables"] {
                dropped += self.kernel_drops(node, tool);
                self.exec(node, tool, &["-F", "INPUT"]);
                if probability > 0.0 {
                    self.iptables(
                        node,
                        tool,
                        &format!(
                            "-A INPUT -i eth0 -p udp -m statistic --mode random \
                             --probability {probability} -j DROP"
                        ),
                    );
                }
            }
        }
        self.log(&format!(
            "receive loss {:.0} % on nodes {nodes:?} (the rules replaced had dropped \
             {dropped} datagrams)",
            probability * 100.0
        ));
        dropped
    }

    /// Packets dropped so far by the INPUT DROP rules of `node` (`tool`: iptables, ip6tables).
    fn kernel_drops(&self, node: u8, tool: &str) -> u64 {
        let out = self.exec(node, tool, &["-L", "INPUT", "-v", "-x", "-n"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.split_whitespace().nth(2) == Some("DROP"))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Cuts `a` from `b` in both directions (every packet, by source address).
    fn partition(&self, a: &[u8], b: &[u8]) {
        for (side, other) in [(a, b), (b, a)] {
            for &node in side {
                for &peer in other {
                    self.iptables(
                        node,
                        "iptables",
                        &format!("-A INPUT -s {} -j DROP", Lab::addr(peer)),
                    );
                }
            }
        }
        self.log(&format!("partition {a:?} | {b:?}"));
    }

    /// Removes every INPUT and OUTPUT rule of the listed nodes.
    fn heal(&self, nodes: &[u8]) {
        for &node in nodes {
            for tool in ["iptables", "ip6tables"] {
                self.exec(node, tool, &["-F", "INPUT"]);
                self.exec(node, tool, &["-F", "OUTPUT"]);
            }
        }
        self.log(&format!("healed nodes {nodes:?}"));
    }

    /// Command line of an agent on `node`.
    fn agent_args(&self, node: u8, spec: &AgentSpec) -> Vec<String> {
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
    fn start_agent(&mut self, node: u8, spec: AgentSpec) {
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
    fn connect(&mut self, node: u8) -> io::Result<()> {
        let ns = self.ns(node);
        let agent = self.agents.get_mut(&node).ok_or_else(|| {
            io::Error::new(io::ErrorKind::NotFound, format!("no agent on node {node}"))
        })?;
        if let Some(status) = agent.child.try_wait()? {
            return Err(io::Error::other(format!(
                "agent on node {node} exited: {status}"
            )));
        }
        let mut http = Http::connect(&ns)?;
        http.request("GET", "/v1/members", b"")?;
        agent.http = Some(http);
        Ok(())
    }

    /// SIGKILLs `node`'s agent and returns how it was started.
    fn kill9(&mut self, node: u8) -> AgentSpec {
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
    fn stop_agent(&mut self, node: u8) {
        self.kill9(node);
    }

    /// Asserts that every agent process is still running.
    fn assert_alive(&mut self) {
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
    fn log_tail(&self, node: u8) -> String {
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
    fn http(&mut self, node: u8, method: &str, path: &str, body: &[u8]) -> (u16, Vec<u8>) {
        for attempt in 0..2 {
            let agent = self
                .agents
                .get_mut(&node)
                .unwrap_or_else(|| panic!("no agent on node {node}"));
            if let Some(http) = agent.http.as_mut() {
                match http.request(method, path, body) {
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
    fn get_json(&mut self, node: u8, path: &str) -> Value {
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
    fn dump(&mut self, node: u8) -> Store {
        Store::from_json(&self.get_json(node, "/v1/kv?prefix="))
            .unwrap_or_else(|e| panic!("node {node}: store dump: {e}"))
    }

    /// Counters of `node` (`/v1/stats`) flattened to `name → value`.
    fn stats(&mut self, node: u8) -> BTreeMap<String, u64> {
        let mut out = BTreeMap::new();
        flatten_counters("", &self.get_json(node, "/v1/stats"), &mut out);
        out
    }

    /// Writes `writes` (key, value) pairs through `node`, pipelined; returns the version of
    /// each write as the API reported it.
    fn put_many(&mut self, node: u8, writes: &[(String, String)]) -> Vec<Version> {
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
    fn delete(&mut self, node: u8, key: &str) {
        let (status, body) = self.http(node, "DELETE", &format!("/v1/kv/{key}"), b"");
        assert!(
            status < 300 || status == 404,
            "node {node}: DELETE {key}: {status} {}",
            String::from_utf8_lossy(&body)
        );
    }

    /// Waits until every listed node holds exactly `expected` (keys and values), and all of
    /// them the same versions; panics with a diff after `timeout`.
    fn await_stores(
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
    fn await_health(&mut self, node: u8, timeout: Duration) {
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
    fn await_members(&mut self, nodes: &[u8], timeout: Duration) {
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

    /// Runs the python UDP tool inside `node`'s namespace, returns its JSON summary.
    fn udp_tool(&self, node: u8, args: &[&str]) -> Value {
        let child = self.spawn_udp_tool(node, args);
        finish_udp_tool(child, args)
    }

    /// Starts the python UDP tool inside `node`'s namespace (every subcommand ends by itself
    /// within its `--timeout`/`--max-seconds`); see [`finish_udp_tool`].
    fn spawn_udp_tool(&self, node: u8, args: &[&str]) -> Child {
        Command::new("ip")
            .args(["netns", "exec", &self.ns(node), "python3"])
            .arg(udp_tool())
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn udp_tool {args:?}: {e}"))
    }
}

/// Waits for a [`Lab::spawn_udp_tool`] child and returns its JSON summary.
fn finish_udp_tool(child: Child, args: &[&str]) -> Value {
    let out = child
        .wait_with_output()
        .unwrap_or_else(|e| panic!("udp_tool {args:?}: {e}"));
    assert!(
        out.status.success(),
        "udp_tool {args:?} failed ({}): {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "udp_tool {args:?}: bad output ({e}): {}",
            String::from_utf8_lossy(&out.stdout)
        )
    })
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

// ---------------------------------------------------------------------------------------------
// HTTP/1.1 over a TCP connection opened inside a namespace
// ---------------------------------------------------------------------------------------------

/// A keep-alive HTTP/1.1 connection to an agent inside a namespace.
struct Http {
    reader: BufReader<TcpStream>,
}

impl Http {
    /// Connects to [`HTTP_ADDR`] in namespace `ns`: a short-lived thread enters the namespace
    /// (`setns` only moves the calling thread) and the socket it creates stays there.
    fn connect(ns: &str) -> io::Result<Http> {
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
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(Duration::from_secs(30)))?;
        stream.set_write_timeout(Some(Duration::from_secs(30)))?;
        Ok(Http {
            reader: BufReader::new(stream),
        })
    }

    fn write_request(buf: &mut Vec<u8>, method: &str, path: &str, body: &[u8]) {
        let _ = write!(
            buf,
            "{method} {path} HTTP/1.1\r\nHost: {HTTP_ADDR}\r\nContent-Length: {}\r\n\r\n",
            body.len()
        );
        buf.extend_from_slice(body);
    }

    /// One request, one response.
    fn request(&mut self, method: &str, path: &str, body: &[u8]) -> io::Result<(u16, Vec<u8>)> {
        let mut buf = Vec::new();
        Http::write_request(&mut buf, method, path, body);
        self.reader.get_mut().write_all(&buf)?;
        self.read_response()
    }

    /// `method` on every (path, body), pipelined in windows so neither side's buffers fill.
    fn pipeline(
        &mut self,
        method: &str,
        requests: &[(String, Vec<u8>)],
    ) -> io::Result<Vec<(u16, Vec<u8>)>> {
        const WINDOW: usize = 64;
        let mut responses = Vec::with_capacity(requests.len());
        for window in requests.chunks(WINDOW) {
            let mut buf = Vec::new();
            for (path, body) in window {
                Http::write_request(&mut buf, method, path, body);
            }
            self.reader.get_mut().write_all(&buf)?;
            for _ in window {
                responses.push(self.read_response()?);
            }
        }
        Ok(responses)
    }

    fn read_line(&mut self) -> io::Result<String> {
        let mut line = String::new();
        if self.reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "connection closed",
            ));
        }
        Ok(line.trim_end().to_owned())
    }

    fn read_response(&mut self) -> io::Result<(u16, Vec<u8>)> {
        let status_line = self.read_line()?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| io::Error::other(format!("bad status line {status_line:?}")))?;
        let mut length = None;
        let mut chunked = false;
        loop {
            let line = self.read_line()?;
            if line.is_empty() {
                break;
            }
            let Some((name, value)) = line.split_once(':') else {
                continue;
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                length = value.parse::<usize>().ok();
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                chunked = value.eq_ignore_ascii_case("chunked");
            }
        }
        let mut body = Vec::new();
        if chunked {
            loop {
                let size_line = self.read_line()?;
                let size = usize::from_str_radix(size_line.split(';').next().unwrap_or(""), 16)
                    .map_err(|e| io::Error::other(format!("bad chunk size {size_line:?}: {e}")))?;
                if size == 0 {
                    // Trailers, then the empty line.
                    while !self.read_line()?.is_empty() {}
                    break;
                }
                let start = body.len();
                body.resize(start + size, 0);
                self.reader.read_exact(&mut body[start..])?;
                self.read_line()?;
            }
        } else if let Some(length) = length {
            body.resize(length, 0);
            self.reader.read_exact(&mut body)?;
        }
        Ok((status, body))
    }
}

// ---------------------------------------------------------------------------------------------
// Store dumps, versions, counters
// ---------------------------------------------------------------------------------------------

/// A version as the API reports it: `(hlc physical ms, hlc logical, node id)`, ordered like the
/// replication layer orders versions (the larger wins).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
struct Version(u64, u64, u64);

impl Version {
    /// Accepts `"PHYS.LOGICAL@NODE"` or `{"hlc": u64 | "PHYS.LOGICAL", "node": u64}`.
    fn from_json(value: &Value) -> Result<Version, String> {
        match value {
            Value::String(text) => {
                let (hlc, node) = text
                    .split_once('@')
                    .ok_or_else(|| format!("version {text:?} has no '@'"))?;
                let node = node.parse().map_err(|e| format!("version {text:?}: {e}"))?;
                let (phys, logical) = split_hlc(hlc)?;
                Ok(Version(phys, logical, node))
            }
            Value::Object(map) => {
                let node = map
                    .get("node")
                    .and_then(Value::as_u64)
                    .ok_or_else(|| format!("version {value} has no node"))?;
                match map.get("hlc") {
                    Some(Value::Number(n)) => {
                        let hlc = n.as_u64().ok_or_else(|| format!("bad hlc in {value}"))?;
                        Ok(Version(hlc >> 16, hlc & 0xffff, node))
                    }
                    Some(Value::String(s)) => {
                        let (phys, logical) = split_hlc(s)?;
                        Ok(Version(phys, logical, node))
                    }
                    _ => Err(format!("version {value} has no hlc")),
                }
            }
            other => Err(format!("unknown version format {other}")),
        }
    }

    /// The version in the body of a PUT response (JSON with a `version` field, or a version).
    fn from_put_response(body: &[u8]) -> Result<Version, String> {
        let json: Value = serde_json::from_slice(body).map_err(|e| {
            format!(
                "PUT response is not JSON ({e}): {}",
                String::from_utf8_lossy(body)
            )
        })?;
        Version::from_json(json.get("version").unwrap_or(&json))
    }
}

fn split_hlc(text: &str) -> Result<(u64, u64), String> {
    let (phys, logical) = text.split_once('.').unwrap_or((text, "0"));
    Ok((
        phys.parse().map_err(|e| format!("hlc {text:?}: {e}"))?,
        logical.parse().map_err(|e| format!("hlc {text:?}: {e}"))?,
    ))
}

/// One node's store: key → (value, version).
#[derive(Debug, PartialEq, Eq)]
struct Store {
    entries: BTreeMap<String, (String, Version)>,
}

impl Store {
    /// Parses the `GET /v1/kv?prefix=` listing: an array (or `{"entries": [...]}`) of objects
    /// with `key`, `value` and `version`.
    fn from_json(json: &Value) -> Result<Store, String> {
        let list = json
            .as_array()
            .or_else(|| json.get("entries").and_then(Value::as_array))
            .ok_or_else(|| format!("listing is not an array: {}", truncate(json)))?;
        let mut entries = BTreeMap::new();
        for item in list {
            let key = item
                .get("key")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry without key: {item}"))?;
            let value = item
                .get("value")
                .and_then(Value::as_str)
                .ok_or_else(|| format!("entry without string value: {item}"))?;
            let version = Version::from_json(
                item.get("version")
                    .ok_or_else(|| format!("entry without version: {item}"))?,
            )?;
            entries.insert(key.to_owned(), (value.to_owned(), version));
        }
        Ok(Store { entries })
    }

    fn values(&self) -> BTreeMap<String, String> {
        self.entries
            .iter()
            .map(|(k, (v, _))| (k.clone(), v.clone()))
            .collect()
    }
}

fn truncate(json: &Value) -> String {
    let text = json.to_string();
    text.chars().take(300).collect()
}

/// What differs between the dumps and `expected` (empty when all agree); a few lines at most.
fn store_problems(dumps: &[(u8, Store)], expected: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    for (node, store) in dumps {
        let values = store.values();
        let missing: Vec<&String> = expected
            .keys()
            .filter(|k| !values.contains_key(*k))
            .collect();
        let extra: Vec<&String> = values
            .keys()
            .filter(|k| !expected.contains_key(*k))
            .collect();
        let wrong: Vec<&String> = expected
            .iter()
            .filter(|(k, v)| values.get(*k).is_some_and(|got| got != *v))
            .map(|(k, _)| k)
            .collect();
        if !missing.is_empty() || !extra.is_empty() || !wrong.is_empty() {
            let _ = writeln!(
                out,
                "node {node}: {} keys, {} missing (first {:?}), {} unexpected (first {:?}), \
                 {} wrong values (first {:?})",
                values.len(),
                missing.len(),
                missing.first(),
                extra.len(),
                extra.first(),
                wrong.len(),
                wrong.first().map(|k| (k, &values[*k], &expected[*k]))
            );
        }
    }
    if out.is_empty()
        && let Some((first_node, first)) = dumps.first()
    {
        for (node, store) in &dumps[1..] {
            if store != first {
                let differing = first
                    .entries
                    .iter()
                    .find(|(k, e)| store.entries.get(*k) != Some(e))
                    .map(|(k, e)| (k.clone(), e.clone(), store.entries.get(k).cloned()));
                let _ = writeln!(
                    out,
                    "node {node} and node {first_node} hold the same values but different \
                     versions, e.g. {differing:?}"
                );
            }
        }
    }
    out
}

/// Node ids listed by `GET /v1/members` (an array, or `{"members": [...]}`, of objects with
/// `node_id`).
fn member_ids(json: &Value) -> BTreeSet<u64> {
    json.as_array()
        .or_else(|| json.get("members").and_then(Value::as_array))
        .map(|list| {
            list.iter()
                .filter(|m| m.get("state").and_then(Value::as_str) != Some("left"))
                .filter_map(|m| m.get("node_id").and_then(Value::as_u64))
                .collect()
        })
        .unwrap_or_default()
}

/// Flattens nested JSON counters into `a.b.c → n`.
fn flatten_counters(prefix: &str, json: &Value, out: &mut BTreeMap<String, u64>) {
    match json {
        Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() {
                    k.clone()
                } else {
                    format!("{prefix}.{k}")
                };
                flatten_counters(&name, v, out);
            }
        }
        Value::Array(list) => {
            // `[{"name": .., "value": ..}]` or `[[name, value]]`.
            for item in list {
                let pair = match item {
                    Value::Object(m) => m
                        .get("name")
                        .and_then(Value::as_str)
                        .zip(m.get("value").and_then(Value::as_u64)),
                    Value::Array(p) if p.len() == 2 => p[0].as_str().zip(p[1].as_u64()),
                    _ => None,
                };
                if let Some((name, value)) = pair {
                    out.insert(name.to_owned(), value);
                }
            }
        }
        Value::Number(n) => {
            if let Some(v) = n.as_u64() {
                out.insert(prefix.to_owned(), v);
            }
        }
        _ => {}
    }
}

/// Sum over `stats` of the counters whose name contains every one of `words`.
fn counter_sum(stats: &BTreeMap<String, u64>, words: &[&str]) -> u64 {
    stats
        .iter()
        .filter(|(name, _)| words.iter().all(|w| name.contains(w)))
        .map(|(_, v)| v)
        .sum()
}

/// Counter `name` (as listed under `counters` by `/v1/stats`); absent counts as 0.
fn counter(stats: &BTreeMap<String, u64>, name: &str) -> u64 {
    stats
        .get(&format!("counters.{name}"))
        .or_else(|| stats.get(name))
        .copied()
        .unwrap_or(0)
}

/// Every reason the protocol layer drops a datagram for, as counter names.
const DROP_COUNTERS: [&str; 14] = [
    "protocol_truncated",
    "protocol_oversized",
    "protocol_bad_magic",
    "protocol_wrong_version",
    "protocol_bad_checksum",
    "protocol_wrong_cluster",
    "protocol_unauthenticated",
    "protocol_malformed",
    "protocol_unknown_frame",
    "protocol_own_datagrams",
    "protocol_node_id_conflict",
    "protocol_stale_incarnation",
    "protocol_buffer_full",
    "protocol_after_close",
];

// ---------------------------------------------------------------------------------------------
// Workloads
// ---------------------------------------------------------------------------------------------

/// A writer thread's result: node, its connection back, the responses.
type WriterResult = (u8, Http, io::Result<Vec<(u16, Vec<u8>)>>);

/// Writes in flight: one thread per writer node, each on that node's connection.
struct Writes {
    writers: Vec<u8>,
    total: usize,
    start: Instant,
    threads: Vec<thread::JoinHandle<WriterResult>>,
}

impl Writes {
    /// Starts writing `total` distinct keys `prefix/<writer>/<i>`, split between the writers,
    /// all writers at the same time; records them in `expected`.
    fn start(
        lab: &mut Lab,
        writers: &[u8],
        prefix: &str,
        total: usize,
        expected: &mut BTreeMap<String, String>,
    ) -> Writes {
        let mut threads = Vec::new();
        for (j, &writer) in writers.iter().enumerate() {
            let count = total / writers.len() + usize::from(j < total % writers.len());
            let writes: Vec<(String, String)> = (0..count)
                .map(|i| {
                    (
                        format!("{prefix}/{writer}/{i:06}"),
                        format!("{prefix}-value-{writer}-{i}"),
                    )
                })
                .collect();
            expected.extend(writes.iter().cloned());
            let mut http = lab
                .agents
                .get_mut(&writer)
                .and_then(|a| a.http.take())
                .unwrap_or_else(|| panic!("node {writer}: not connected"));
            threads.push(thread::spawn(move || {
                let requests: Vec<(String, Vec<u8>)> = writes
                    .into_iter()
                    .map(|(k, v)| (format!("/v1/kv/{k}"), v.into_bytes()))
                    .collect();
                let result = http.pipeline("PUT", &requests);
                (writer, http, result)
            }));
        }
        Writes {
            writers: writers.to_vec(),
            total,
            start: Instant::now(),
            threads,
        }
    }

    /// Whether every writer is done.
    fn is_finished(&self) -> bool {
        self.threads.iter().all(thread::JoinHandle::is_finished)
    }

    /// Waits for the writers (each request is bounded by the connection's 30 s timeouts) and
    /// asserts that every write was accepted.
    fn finish(self, lab: &mut Lab) {
        for handle in self.threads {
            let (writer, http, result) = handle
                .join()
                .unwrap_or_else(|_| panic!("writer thread panicked"));
            let responses = result.unwrap_or_else(|e| panic!("node {writer}: writes failed: {e}"));
            for (status, body) in &responses {
                assert!(
                    *status < 300,
                    "node {writer}: PUT answered {status}: {}",
                    String::from_utf8_lossy(body)
                );
            }
            if let Some(agent) = lab.agents.get_mut(&writer) {
                agent.http = Some(http);
            }
        }
        let secs = self.start.elapsed().as_secs_f64();
        lab.log(&format!(
            "{} writes from nodes {:?} in {secs:.1}s ({:.0}/s)",
            self.total,
            self.writers,
            self.total as f64 / secs.max(1e-3)
        ));
    }
}

/// [`Writes::start`] then [`Writes::finish`].
fn write_from(
    lab: &mut Lab,
    writers: &[u8],
    prefix: &str,
    total: usize,
    expected: &mut BTreeMap<String, String>,
) {
    Writes::start(lab, writers, prefix, total, expected).finish(lab);
}

/// Prints the interesting counters of every listed node.
fn report_counters(lab: &mut Lab, nodes: &[u8], words: &[&str]) {
    for &node in nodes {
        let stats = lab.stats(node);
        let shown: Vec<String> = stats
            .iter()
            .filter(|(name, v)| **v > 0 && words.iter().any(|w| name.contains(w)))
            .map(|(name, v)| format!("{name}={v}"))
            .collect();
        lab.log(&format!("node {node} counters: {}", shown.join(" ")));
    }
}

// ---------------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------------

/// The lab itself, without Chorus: IPv4 and IPv6 multicast and subnet broadcast cross the
/// bridge between namespaces, and an iptables rule really blocks multicast. When this fails,
/// the scenarios below cannot tell anything about Chorus.
#[test]
fn lab_plumbing() {
    let Some(lab) = Lab::new("plumbing", 3) else {
        return;
    };
    let probe = |group: &str, expect: u64| {
        let recv_args = ["recv", "--group", group, "--count", "5", "--timeout", "3"];
        let receivers: Vec<Child> = [2u8, 3]
            .iter()
            .map(|&node| lab.spawn_udp_tool(node, &recv_args))
            .collect();
        thread::sleep(Duration::from_millis(500));
        lab.udp_tool(1, &["send", "--group", group, "--count", "5"]);
        for receiver in receivers {
            // `recv` exits 1 when fewer than --count arrived; the summary says how many.
            let out = receiver
                .wait_with_output()
                .unwrap_or_else(|e| panic!("udp_tool recv: {e}"));
            let summary: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
                panic!(
                    "udp_tool recv: bad output ({e}): {}",
                    String::from_utf8_lossy(&out.stdout)
                )
            });
            let got = summary.get("received").and_then(Value::as_u64);
            assert_eq!(got, Some(expect), "{group}: datagrams received");
        }
        lab.log(&format!(
            "{group}: {expect} of 5 datagrams at each receiver"
        ));
    };
    probe(GROUP_V4, 5);
    probe(GROUP_V6, 5);
    probe(BROADCAST, 5);
    for node in [2u8, 3] {
        lab.iptables(node, "iptables", "-A INPUT -d 224.0.0.0/4 -j DROP");
    }
    probe(GROUP_V4, 0);
}

/// Five nodes on IPv4 multicast; 10 % and then 30 % kernel loss on every receiver; 2000 writes
/// from three writers. Every store ends identical and holds every write.
#[test]
fn scenario_loss() {
    let Some(mut lab) = Lab::new("loss", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();

    lab.set_loss(&nodes, 0.10);
    write_from(&mut lab, &[1, 2, 3], "loss10", 1000, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(90));

    let dropped_10 = lab.set_loss(&nodes, 0.30);
    write_from(&mut lab, &[1, 2, 3], "loss30", 1000, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(120));
    assert_eq!(expected.len(), 2000);

    let dropped_30 = lab.set_loss(&nodes, 0.0);
    assert!(
        dropped_10 > 0 && dropped_30 > dropped_10,
        "the kernel dropped {dropped_10} datagrams at 10 % and {dropped_30} at 30 %"
    );
    let naks: u64 = nodes
        .iter()
        .map(|&n| counter_sum(&lab.stats(n), &["nak"]))
        .sum();
    report_counters(
        &mut lab,
        &nodes,
        &["nak", "repair", "retrans", "lost", "sync"],
    );
    assert!(naks > 0, "30 % loss yet no NAK counted anywhere");
}

/// Five nodes, partition {1,2} | {3,4,5}, independent and conflicting writes on both sides;
/// after healing every node holds the last-writer-wins result.
#[test]
fn scenario_partition() {
    let Some(mut lab) = Lab::new("partition", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    let (side_a, side_b) = ([1u8, 2], [3u8, 4, 5]);
    // The writer of each side in the conflicts below.
    let (writer_a, writer_b) = (2u8, 5u8);
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 3], "base", 200, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));

    lab.partition(&side_a, &side_b);
    let mut view_a = expected.clone();
    let mut view_b = expected.clone();
    write_from(&mut lab, &[1], "side-a", 200, &mut view_a);
    write_from(&mut lab, &[4], "side-b", 200, &mut view_b);

    // The same 100 keys written on both sides, alternating which side writes first, the second
    // write 3 ms after the first. All namespaces share one clock, so the later write carries
    // the higher version: half the keys must go to each side.
    let mut put_versions: BTreeMap<(String, u8), Version> = BTreeMap::new();
    let mut later_write = BTreeMap::new();
    for i in 0..100 {
        let key = format!("conflict/{i:03}");
        let order = if i % 2 == 0 {
            [writer_a, writer_b]
        } else {
            [writer_b, writer_a]
        };
        for (n, writer) in order.into_iter().enumerate() {
            let value = format!("{}-{i}", if writer == writer_a { "a" } else { "b" });
            if n == 1 {
                thread::sleep(Duration::from_millis(3));
                later_write.insert(key.clone(), value.clone());
            }
            let version = lab.put_many(writer, &[(key.clone(), value.clone())])[0];
            put_versions.insert((key.clone(), writer), version);
            if writer == writer_a {
                view_a.insert(key.clone(), value);
            } else {
                view_b.insert(key.clone(), value);
            }
        }
    }
    // Deletes racing rewrites: on base/1/0..9 side A deletes and side B rewrites 5 ms later;
    // on base/1/10..19 side B rewrites and side A deletes 5 ms later. All namespaces share one
    // clock, so the later operation must win in both cases, tombstones included.
    let mut rewrite_wins = BTreeMap::new();
    let mut delete_wins = BTreeSet::new();
    for i in 0..20 {
        let key = format!("base/1/{i:06}");
        let value = format!("rewritten-by-b-{i}");
        if i < 10 {
            lab.delete(writer_a, &key);
            thread::sleep(Duration::from_millis(5));
            lab.put_many(writer_b, &[(key.clone(), value.clone())]);
            rewrite_wins.insert(key.clone(), value.clone());
        } else {
            lab.put_many(writer_b, &[(key.clone(), value.clone())]);
            thread::sleep(Duration::from_millis(5));
            lab.delete(writer_a, &key);
            delete_wins.insert(key.clone());
        }
        view_a.remove(&key);
        view_b.insert(key, value);
    }
    lab.await_stores(&side_a, &view_a, Duration::from_secs(30));
    lab.await_stores(&side_b, &view_b, Duration::from_secs(30));

    // Each side's dump reports the version its own PUT returned.
    let dump_a = lab.dump(side_a[0]);
    let dump_b = lab.dump(side_b[0]);
    for ((key, writer), version) in &put_versions {
        let dump = if *writer == writer_a {
            &dump_a
        } else {
            &dump_b
        };
        assert_eq!(
            dump.entries.get(key).map(|e| e.1),
            Some(*version),
            "{key}: the dump disagrees with the version PUT returned"
        );
    }
    // The expected result after healing: per key, the entry with the highest version of the two
    // sides; the delete races as decided above.
    let mut merged = BTreeMap::new();
    let keys: BTreeSet<&String> = dump_a.entries.keys().chain(dump_b.entries.keys()).collect();
    for key in keys {
        let winner = match (dump_a.entries.get(key), dump_b.entries.get(key)) {
            (Some(a), Some(b)) => std::cmp::max_by_key(a, b, |e| e.1),
            (Some(only), None) | (None, Some(only)) => only,
            (None, None) => continue,
        };
        merged.insert(key.clone(), winner.0.clone());
    }
    for key in &delete_wins {
        merged.remove(key);
    }
    for (key, value) in &rewrite_wins {
        assert_eq!(
            merged.get(key),
            Some(value),
            "{key}: the later rewrite wins"
        );
    }
    let a_wins = (0..100)
        .filter(|i| merged.get(&format!("conflict/{i:03}")) == Some(&format!("a-{i}")))
        .count();
    lab.log(&format!(
        "conflicts by highest version: side A wins {a_wins} keys, side B {}",
        100 - a_wins
    ));
    for (key, value) in &later_write {
        assert_eq!(
            merged.get(key),
            Some(value),
            "{key}: the later write must carry the higher version"
        );
    }
    assert_eq!(
        a_wins, 50,
        "the sides alternate, so each must win half the keys"
    );

    lab.heal(&nodes);
    lab.await_stores(&nodes, &merged, Duration::from_secs(60));
    report_counters(&mut lab, &nodes, &["digests", "entries", "recover", "lost"]);
}

/// `kill -9` a node while two writers stream, restart it while they still do: it resyncs. Then 50 000 keys and a late
/// joiner that catches all of them up.
#[test]
fn scenario_restart_and_late_join() {
    let Some(mut lab) = Lab::new("restart", 4) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1], "before", 300, &mut expected);
    // Two writers stream 10 000 writes; node 3 dies in the middle and comes back while they
    // are still writing.
    let stream = Writes::start(&mut lab, &[1, 2], "stream", 10_000, &mut expected);
    thread::sleep(Duration::from_millis(300));
    let spec = lab.kill9(3);
    thread::sleep(Duration::from_millis(300));
    lab.start_agent(3, spec);
    assert!(
        !stream.is_finished(),
        "the writers finished before node 3 was back: not a mid-stream restart"
    );
    stream.finish(&mut lab);
    write_from(&mut lab, &[1], "after", 300, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    lab.await_health(3, Duration::from_secs(30));

    let bulk = 50_000 - expected.len();
    write_from(&mut lab, &[1, 2], "bulk", bulk, &mut expected);
    assert_eq!(expected.len(), 50_000);
    lab.await_stores(&nodes, &expected, Duration::from_secs(120));
    lab.add_node(5);
    let joined = Instant::now();
    lab.start_agent(5, AgentSpec::new(Transport::V4));
    lab.await_health(5, Duration::from_secs(120));
    let held = lab.dump(5).entries.len();
    lab.log(&format!(
        "node 5 reports in sync holding {held} of {} keys",
        expected.len()
    ));
    // /v1/health is what a load balancer or a deploy script waits for: 200 must mean the
    // late joiner already holds the cluster's state.
    assert_eq!(
        held,
        expected.len(),
        "node 5 answered /v1/health 200 before it held every key"
    );
    lab.await_stores(&[1, 2, 3, 4, 5], &expected, Duration::from_secs(120));
    lab.log(&format!(
        "late joiner holds all {} keys {:.1}s after it started",
        expected.len(),
        joined.elapsed().as_secs_f64()
    ));
    report_counters(&mut lab, &[5], &["digests", "entries", "requests", "lost"]);
}

/// The same cluster over IPv6 multicast (`ff15::77`), with 10 % loss.
#[test]
fn scenario_ipv6() {
    let Some(mut lab) = Lab::new("ipv6", 5) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4, 5];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V6));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    lab.set_loss(&nodes, 0.10);
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 4], "v6", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    let dropped = lab.set_loss(&nodes, 0.0);
    assert!(
        dropped > 0,
        "ip6tables dropped nothing: the loss did not apply"
    );
}

/// Keys by default off the loopback: on eth0, an agent with neither a key nor `--insecure`
/// refuses to start and says how to make a key; agents given a key made by `chorus keygen`
/// form the cluster and replicate.
#[test]
fn scenario_keys_by_default() {
    let Some(mut lab) = Lab::new("keys", 2) else {
        return;
    };
    let out = Command::new("ip")
        .args(["netns", "exec", &lab.ns(1), env!("CARGO_BIN_EXE_chorus")])
        .args(["agent", "--cluster", CLUSTER, "--http", HTTP_ADDR])
        .args(["--group", GROUP_V4, "--iface", "eth0", "--ttl", "1"])
        .stdin(Stdio::null())
        .output()
        .unwrap_or_else(|e| panic!("run an unkeyed agent: {e}"));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(2),
        "unkeyed agent on eth0: {stderr}"
    );
    for fix in ["chorus keygen", "--key-file", "--insecure"] {
        assert!(
            stderr.contains(fix),
            "the refusal does not say {fix:?}: {stderr}"
        );
    }
    lab.log("unkeyed agent on eth0 refused");

    let key = lab.dir.join("cluster.key");
    run(Command::new(env!("CARGO_BIN_EXE_chorus"))
        .arg("keygen")
        .arg(&key));
    let nodes = [1u8, 2];
    for node in nodes {
        let mut spec = AgentSpec::new(Transport::V4);
        spec.keys = Some(key.clone());
        lab.start_agent(node, spec);
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 2], "keyed", 200, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));
}

/// Broadcast mode, then unicast peers with every multicast datagram dropped by iptables.
#[test]
fn scenario_broadcast_and_peers() {
    let Some(mut lab) = Lab::new("bcast", 4) else {
        return;
    };
    let nodes = [1u8, 2, 3, 4];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::Broadcast));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 3], "bcast", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
    for node in nodes {
        lab.stop_agent(node);
    }

    for node in nodes {
        lab.iptables(node, "iptables", "-A INPUT -d 224.0.0.0/4 -j DROP");
        lab.iptables(node, "iptables", "-A OUTPUT -d 224.0.0.0/4 -j DROP");
    }
    lab.log("multicast blocked on every node");
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::Peers(nodes.to_vec())));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    // The restarted agents start empty (no persistence): only the new writes are expected.
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[2, 4], "peers", 600, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(60));
}

/// Hostile datagrams from an attacker namespace: random bytes, truncated, bit-flipped and
/// replayed real frames, frames of another cluster. Agents stay up, drops are counted by
/// reason, stores do not change, the cluster still replicates afterwards.
#[test]
fn scenario_hostile() {
    const ATTACKER: u8 = 9;
    const OBSERVER: u8 = 10;
    let Some(mut lab) = Lab::new("hostile", 3) else {
        return;
    };
    let nodes = [1u8, 2, 3];
    for node in nodes {
        lab.start_agent(node, AgentSpec::new(Transport::V4));
    }
    lab.await_members(&nodes, Duration::from_secs(20));
    lab.add_node(ATTACKER);
    lab.add_node(OBSERVER);
    let capture = lab
        .dir
        .join("cluster-frames.hex")
        .to_string_lossy()
        .into_owned();
    let foreign = lab
        .dir
        .join("foreign-frames.hex")
        .to_string_lossy()
        .into_owned();

    // Real frames of the cluster, captured while it works.
    let capture_args = [
        "capture",
        "--group",
        GROUP_V4,
        "--count",
        "150",
        "--timeout",
        "10",
        "--out",
        &capture,
    ];
    let capturing = lab.spawn_udp_tool(OBSERVER, &capture_args);
    thread::sleep(Duration::from_millis(500));
    let mut expected = BTreeMap::new();
    write_from(&mut lab, &[1, 2], "before", 400, &mut expected);
    let captured = finish_udp_tool(capturing, &capture_args);
    lab.log(&format!("cluster frames: {captured}"));
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));

    // Frames of another cluster: a real agent with another --cluster, briefly. Its traffic hits
    // the cluster's group too.
    let foreign_args = [
        "capture",
        "--group",
        GROUP_V4,
        "--count",
        "30",
        "--timeout",
        "10",
        "--out",
        &foreign,
        "--from",
        "10.77.0.9",
    ];
    let capturing = lab.spawn_udp_tool(OBSERVER, &foreign_args);
    thread::sleep(Duration::from_millis(300));
    lab.start_agent(
        ATTACKER,
        AgentSpec {
            cluster: "intruder".to_owned(),
            transport: Transport::V4,
            keys: None,
        },
    );
    lab.put_many(ATTACKER, &[("intruder/key".to_owned(), "x".to_owned())]);
    let captured = finish_udp_tool(capturing, &foreign_args);
    lab.log(&format!("foreign cluster frames: {captured}"));
    lab.stop_agent(ATTACKER);

    let before: Vec<Store> = nodes.iter().map(|&n| lab.dump(n)).collect();
    let stats_before: Vec<BTreeMap<String, u64>> = nodes.iter().map(|&n| lab.stats(n)).collect();
    let sent = lab.udp_tool(
        ATTACKER,
        &[
            "attack",
            "--group",
            GROUP_V4,
            "--capture",
            &capture,
            "--foreign",
            &foreign,
            "--count",
            "3000",
            "--seed",
            "6",
        ],
    );
    lab.log(&format!("attack sent {sent}"));
    thread::sleep(Duration::from_secs(2));
    lab.assert_alive();
    for (i, &node) in nodes.iter().enumerate() {
        assert!(
            lab.dump(node) == before[i],
            "node {node}: the store changed under attack"
        );
        lab.await_health(node, Duration::from_secs(10));
        let after = lab.stats(node);
        let delta =
            |name: &str| counter(&after, name).saturating_sub(counter(&stats_before[i], name));
        let by_reason: Vec<String> = DROP_COUNTERS
            .iter()
            .chain(&["protocol_duplicates", "protocol_duplicate_fragments"])
            .filter(|name| delta(name) > 0)
            .map(|name| format!("{name}+{}", delta(name)))
            .collect();
        lab.log(&format!(
            "node {node}: during the attack {}",
            by_reason.join(" ")
        ));
        // Random bytes fail the magic, cut frames their length, flipped bits the CRC, the
        // intruder's frames the cluster id; replays are recognised as duplicates or as the
        // node's own datagrams.
        for reason in [
            "protocol_bad_magic",
            "protocol_truncated",
            "protocol_bad_checksum",
            "protocol_wrong_cluster",
        ] {
            assert!(delta(reason) > 0, "node {node}: {reason} did not grow");
        }
        let replays = delta("protocol_duplicates")
            + delta("protocol_duplicate_fragments")
            + delta("protocol_own_datagrams");
        assert!(replays > 0, "node {node}: no replayed frame recognised");
    }

    // The cluster still replicates.
    write_from(&mut lab, &[3], "after", 100, &mut expected);
    lab.await_stores(&nodes, &expected, Duration::from_secs(30));
}
