//! `chorus demo`: a cluster of real `chorus agent` processes on this machine, over loopback
//! multicast (TTL 0) with injected receive loss, driven over their HTTP APIs.
//!
//! It writes from several nodes, kills one with SIGKILL and restarts it, adds a late joiner,
//! shows live progress on stderr until every store holds the same entries (full dumps compared,
//! versions included), then prints a summary. Nothing leaves this host.

use std::collections::BTreeMap;
use std::io::{IsTerminal, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use serde_json::Value;

use crate::cli::DemoArgs;
use crate::client::Client;

/// A node's store: key → (value, version).
type Dump = BTreeMap<String, (String, String)>;

/// Prefix of every key the demo writes.
const PREFIX: &str = "demo/";

/// One agent child process; killed when dropped.
struct AgentProc {
    index: usize,
    http: SocketAddr,
    client: Client,
    child: Option<Child>,
    args: Vec<String>,
    log: PathBuf,
}

impl AgentProc {
    fn spawn(
        index: usize,
        args: Vec<String>,
        http: SocketAddr,
        log: PathBuf,
    ) -> anyhow::Result<Self> {
        let mut p = Self {
            index,
            http,
            client: Client::new(&format!("http://{http}")),
            child: None,
            args,
            log,
        };
        p.start()?;
        Ok(p)
    }

    fn start(&mut self) -> anyhow::Result<()> {
        let exe = std::env::current_exe().context("cannot find the chorus executable")?;
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .with_context(|| format!("cannot open {}", self.log.display()))?;
        let child = Command::new(exe)
            .args(&self.args)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("cannot start a chorus agent")?;
        self.child = Some(child);
        Ok(())
    }

    /// SIGKILL: no goodbye, no flush — a crash.
    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Fails when the process has exited.
    fn check_alive(&mut self) -> anyhow::Result<()> {
        if let Some(c) = &mut self.child
            && let Ok(Some(status)) = c.try_wait()
        {
            let tail = std::fs::read_to_string(&self.log).unwrap_or_default();
            let tail: Vec<&str> = tail.lines().rev().take(10).collect();
            bail!(
                "node {} exited ({status}); last log lines:\n{}",
                self.index,
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        Ok(())
    }

    fn wait_ready(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            self.check_alive()?;
            if self.client.get("/v1/stats").is_ok_and(|r| r.status == 200) {
                return Ok(());
            }
            if Instant::now() > deadline {
                bail!(
                    "node {} did not answer on http://{} within {timeout:?}",
                    self.index,
                    self.http
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn dump(&self) -> anyhow::Result<Dump> {
        let list = self.client.list(PREFIX)?;
        let mut out = Dump::new();
        for e in list
            .get("entries")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let field = |n: &str| {
                e.get(n)
                    .and_then(Value::as_str)
                    .unwrap_or_default()
                    .to_string()
            };
            out.insert(field("key"), (field("value"), field("version")));
        }
        Ok(out)
    }

    fn counters(&self) -> BTreeMap<String, u64> {
        let Ok(reply) = self.client.get("/v1/stats") else {
            return BTreeMap::new();
        };
        let Ok(v) = serde_json::from_slice::<Value>(&reply.body) else {
            return BTreeMap::new();
        };
        v.get("counters")
            .and_then(Value::as_object)
            .map(|m| {
                m.iter()
                    .filter_map(|(k, v)| v.as_u64().map(|v| (k.clone(), v)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

impl Drop for AgentProc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Sum of the counters named `name` or ending in `_name`.
pub fn counter(counters: &BTreeMap<String, u64>, name: &str) -> u64 {
    let suffix = format!("_{name}");
    counters
        .iter()
        .filter(|(k, _)| *k == name || k.ends_with(&suffix))
        .map(|(_, v)| *v)
        .sum()
}

/// A free TCP port on 127.0.0.1 (bound and released; the agent binds it right after).
fn free_port() -> anyhow::Result<u16> {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).context("cannot find a free port")?;
    Ok(l.local_addr()?.port())
}

/// The expected final state after the demo's writes, and the write plan.
#[derive(Debug, Default)]
pub struct Plan {
    /// Writes in order: (node index, key, value or None for delete).
    pub writes: Vec<(usize, String, Option<String>)>,
    /// Indexes of writes preceded by a short pause, so that a later write of a key never shares
    /// the millisecond of the earlier one (last-writer-wins then follows the demo's order).
    pub pauses: Vec<usize>,
}

impl Plan {
    /// The key → value state that the writes leave, applied in order.
    pub fn expected(&self) -> BTreeMap<String, String> {
        let mut m = BTreeMap::new();
        for (_, k, v) in &self.writes {
            match v {
                Some(v) => m.insert(k.clone(), v.clone()),
                None => m.remove(k),
            };
        }
        m
    }
}

/// Writes one plan step; every write must succeed (the targets are alive).
fn apply(nodes: &[AgentProc], plan: &Plan, index: usize) -> anyhow::Result<()> {
    if plan.pauses.contains(&index) {
        std::thread::sleep(Duration::from_millis(20));
    }
    let (n, key, value) = &plan.writes[index];
    let node = &nodes[*n];
    let reply = match value {
        Some(v) => node.client.put_key(key, v.as_bytes())?,
        None => node.client.delete_key(key)?,
    };
    if !(200..300).contains(&reply.status) {
        bail!(
            "node {n}: write of {key} answered {}: {}",
            reply.status,
            String::from_utf8_lossy(&reply.body)
        );
    }
    Ok(())
}

/// Live progress: one line per node, redrawn in place on a terminal.
struct Progress {
    tty: bool,
    drawn: usize,
    last_plain: Option<Instant>,
}

impl Progress {
    fn show(&mut self, lines: &[String], last: bool) {
        let mut err = std::io::stderr().lock();
        if self.tty {
            if self.drawn > 0 {
                let _ = write!(err, "\x1b[{}A", self.drawn);
            }
            for l in lines {
                let _ = writeln!(err, "\x1b[2K{l}");
            }
            self.drawn = lines.len();
        } else if last
            || self
                .last_plain
                .is_none_or(|t| t.elapsed() > Duration::from_secs(2))
        {
            self.last_plain = Some(Instant::now());
            for l in lines {
                let _ = writeln!(err, "{l}");
            }
        }
    }
}

/// `chorus demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    if args.nodes < 2 {
        bail!("--nodes must be at least 2");
    }
    if !(0.0..0.9).contains(&args.loss) {
        bail!("--loss must be in 0.0..0.9");
    }
    let seed = args.seed.unwrap_or_else(rand::random);
    let g = seed.to_le_bytes();
    let group = SocketAddr::from((
        Ipv4Addr::new(239, 255, g[0], g[1].max(1)),
        20_000 + u16::from_le_bytes([g[2], g[3]]) % 30_000,
    ));
    let cluster = format!("demo-{seed:016x}");
    let dir = std::env::temp_dir().join(format!("chorus-demo-{seed:016x}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    eprintln!(
        "chorus demo: {} nodes + 1 late joiner on {group} (loopback, TTL 0), {:.0} % receive loss, seed {seed}",
        args.nodes,
        args.loss * 100.0
    );
    eprintln!("agent logs in {}", dir.display());

    let mut next_port = args.base_port;
    let spawn = |index: usize, next_port: &mut Option<u16>| -> anyhow::Result<AgentProc> {
        let port = match next_port {
            Some(p) => {
                let port = *p;
                *p = p.wrapping_add(1);
                port
            }
            None => free_port()?,
        };
        let http = SocketAddr::from((Ipv4Addr::LOCALHOST, port));
        let mut agent_args: Vec<String> = vec![
            "agent".into(),
            "--cluster".into(),
            cluster.clone(),
            "--group".into(),
            group.to_string(),
            "--iface".into(),
            "127.0.0.1".into(),
            "--ttl".into(),
            "0".into(),
            "--node-id".into(),
            (index + 1).to_string(),
            "--http".into(),
            http.to_string(),
        ];
        if args.loss > 0.0 {
            agent_args.extend([
                "--loss".into(),
                args.loss.to_string(),
                "--loss-seed".into(),
                seed.wrapping_add(index as u64).to_string(),
            ]);
        }
        AgentProc::spawn(
            index,
            agent_args,
            http,
            dir.join(format!("node-{}.log", index + 1)),
        )
    };

    let started = Instant::now();
    let mut nodes = Vec::new();
    for i in 0..args.nodes {
        nodes.push(spawn(i, &mut next_port)?);
    }
    for n in &mut nodes {
        n.wait_ready(Duration::from_secs(15))?;
    }
    eprintln!(
        "{} nodes up after {:.1} s",
        nodes.len(),
        started.elapsed().as_secs_f64()
    );

    // The plan: writes from every node but the victim, overwrites from other nodes, deletes.
    let victim = args.nodes - 1;
    let writers: Vec<usize> = (0..args.nodes).filter(|&i| i != victim).collect();
    let keys = args.keys.max(4);
    let mut plan = Plan::default();
    for k in 0..keys {
        let node = writers[k % writers.len()];
        plan.writes.push((
            node,
            format!("{PREFIX}key-{k:05}"),
            Some(format!("value {k} from node {}", node + 1)),
        ));
    }
    for k in (0..keys).step_by(10) {
        let node = writers[(k + 1) % writers.len()];
        plan.writes.push((
            node,
            format!("{PREFIX}key-{k:05}"),
            Some(format!("value {k} rewritten by node {}", node + 1)),
        ));
    }
    let overwrites_start = keys;
    let deletes_start = plan.writes.len();
    // Deleted through the node that wrote the key (it surely holds it; DELETE of an absent
    // key is a 404). No key deleted here was overwritten (k = 5 mod 20 is never 0 mod 10).
    for k in (5..keys).step_by(20) {
        let node = writers[k % writers.len()];
        plan.writes
            .push((node, format!("{PREFIX}key-{k:05}"), None));
    }
    plan.pauses = vec![overwrites_start, deletes_start];
    let third = plan.writes.len() / 3;

    // Phase 1: a third of the writes with everyone up.
    for i in 0..third {
        apply(&nodes, &plan, i)?;
    }
    // Phase 2: the victim crashes (SIGKILL), writes go on, it comes back.
    eprintln!("killing node {} (SIGKILL)", victim + 1);
    nodes[victim].kill();
    for i in third..2 * third {
        apply(&nodes, &plan, i)?;
    }
    eprintln!("restarting node {}", victim + 1);
    nodes[victim].start()?;
    nodes[victim].wait_ready(Duration::from_secs(15))?;
    // Phase 3: the rest of the writes, and a late joiner that starts with an empty store.
    for i in 2 * third..plan.writes.len() {
        apply(&nodes, &plan, i)?;
    }
    let late = args.nodes;
    eprintln!("adding late joiner node {}", late + 1);
    nodes.push(spawn(late, &mut next_port)?);
    nodes[late].wait_ready(Duration::from_secs(15))?;
    let writes_done = Instant::now();

    let expected = plan.expected();
    let mut progress = Progress {
        tty: std::io::stderr().is_terminal(),
        drawn: 0,
        last_plain: None,
    };
    let deadline = writes_done + Duration::from_secs(args.timeout);
    let converged_after = loop {
        for n in &mut nodes {
            n.check_alive()?;
        }
        let dumps: Vec<anyhow::Result<Dump>> = nodes.iter().map(AgentProc::dump).collect();
        let reference = dumps.first().and_then(|d| d.as_ref().ok());
        let mut lines = vec![format!(
            "{:<6} {:>6} {:>9} {:>8} {:>8}  {:.1} s",
            "node",
            "keys",
            "expected",
            "naks",
            "repairs",
            writes_done.elapsed().as_secs_f64()
        )];
        let mut all_ok = true;
        for (n, dump) in nodes.iter().zip(&dumps) {
            let c = n.counters();
            let (count, right) = match dump {
                Ok(d) => {
                    let values: BTreeMap<&String, &String> =
                        d.iter().map(|(k, (v, _))| (k, v)).collect();
                    let matches = values.len() == expected.len()
                        && values.iter().all(|(k, v)| expected.get(*k) == Some(*v));
                    (d.len().to_string(), matches && Some(d) == reference)
                }
                Err(_) => ("?".into(), false),
            };
            all_ok &= right;
            lines.push(format!(
                "{:<6} {:>6} {:>9} {:>8} {:>8}  {}",
                n.index + 1,
                count,
                expected.len(),
                counter(&c, "naks_sent"),
                counter(&c, "repairs_sent"),
                if right { "in agreement" } else { "catching up" }
            ));
        }
        progress.show(&lines, all_ok);
        if all_ok {
            break writes_done.elapsed();
        }
        if Instant::now() > deadline {
            bail!(
                "the stores did not agree within {} s (logs in {}); try a lower --loss or a higher --timeout",
                args.timeout,
                dir.display()
            );
        }
        std::thread::sleep(Duration::from_millis(250));
    };

    let totals: Vec<BTreeMap<String, u64>> = nodes.iter().map(AgentProc::counters).collect();
    let sum = |name: &str| totals.iter().map(|c| counter(c, name)).sum::<u64>();
    let out = format!(
        "converged: {} nodes hold the same {} keys (full dumps, versions included)\n\
         writes:    {} ({} puts/overwrites, {} deletes) from {} nodes; node {} killed and restarted; node {} joined late\n\
         messages:  {} sent, {} delivered\n\
         loss:      {:.0} % injected on receive, {} NAKs sent, {} repairs sent, {} lost\n\
         time:      {:.2} s from the last write to agreement ({:.1} s in all)\n",
        nodes.len(),
        expected.len(),
        plan.writes.len(),
        plan.writes.iter().filter(|w| w.2.is_some()).count(),
        plan.writes.iter().filter(|w| w.2.is_none()).count(),
        writers.len(),
        victim + 1,
        late + 1,
        sum("messages_sent"),
        sum("messages_delivered"),
        args.loss * 100.0,
        sum("naks_sent"),
        sum("repairs_sent"),
        sum("lost_messages"),
        converged_after.as_secs_f64(),
        started.elapsed().as_secs_f64(),
    );
    print!("{out}");
    if args.ui {
        let signal = serve_dashboards(&mut nodes)?;
        eprintln!("{signal}: stopping the {} nodes", nodes.len());
        stop_all(&mut nodes, STOP_TIMEOUT);
    }
    drop(nodes);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

/// How long a node may take to leave (goodbye, flush) after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(5);

/// `--ui`: prints every node's dashboard URL and keeps the cluster running until SIGINT
/// (Ctrl-C) or SIGTERM; returns the signal's name. Fails when a node exits meanwhile.
fn serve_dashboards(nodes: &mut [AgentProc]) -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    runtime.block_on(async {
        // Watched before the URLs are printed: a Ctrl-C right after them is a clean stop.
        let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
        let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
        let mut out = std::io::stdout().lock();
        writeln!(
            out,
            "dashboards (the cluster keeps running; Ctrl-C stops it):"
        )?;
        for n in nodes.iter() {
            writeln!(out, "  node {}: {}", n.index + 1, dashboard_url(n.http))?;
        }
        out.flush()?;
        drop(out);
        let mut tick = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = int.recv() => return Ok("SIGINT"),
                _ = term.recv() => return Ok("SIGTERM"),
                _ = tick.tick() => {
                    for n in nodes.iter_mut() {
                        n.check_alive()?;
                    }
                }
            }
        }
    })
}

/// The dashboard of the agent whose HTTP API is on `http`.
pub fn dashboard_url(http: SocketAddr) -> String {
    format!("http://{http}/ui")
}

/// SIGTERM to every node (each says goodbye and flushes), then waits for them; a node still
/// running after `timeout` is killed.
fn stop_all(nodes: &mut [AgentProc], timeout: Duration) {
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;
    for n in nodes.iter() {
        if let Some(pid) = n.child.as_ref().and_then(|c| i32::try_from(c.id()).ok()) {
            // ESRCH: it already exited (a Ctrl-C on the terminal reaches the nodes too).
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
    }
    let deadline = Instant::now() + timeout;
    for n in nodes.iter_mut() {
        let Some(mut child) = n.child.take() else {
            continue;
        };
        loop {
            match child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    eprintln!(
                        "node {} did not stop within {timeout:?}; killing it",
                        n.index + 1
                    );
                    let _ = child.kill();
                    let _ = child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(20)),
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn plan_expected_applies_in_order() {
        let plan = Plan {
            writes: vec![
                (0, "a".into(), Some("1".into())),
                (1, "b".into(), Some("2".into())),
                (1, "a".into(), Some("3".into())),
                (0, "b".into(), None),
            ],
            pauses: vec![],
        };
        let e = plan.expected();
        assert_eq!(e.len(), 1);
        assert_eq!(e["a"], "3");
    }

    #[test]
    fn counter_matches_suffixes() {
        let mut c = BTreeMap::new();
        c.insert("protocol_naks_sent".to_string(), 3);
        c.insert("naks_sent".to_string(), 1);
        c.insert("naks_sent_total_other".to_string(), 100);
        assert_eq!(counter(&c, "naks_sent"), 4);
    }
}
