//! Helpers shared by the end-to-end tests of the `chorus` binary: a guard for a running
//! `chorus agent`, temporary directories, a loopback multicast group of one's own, and a
//! minimal HTTP/1.1 client. Each test binary uses part of it.

#![allow(dead_code, clippy::unwrap_used)]

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The binary under test.
pub const BIN: &str = env!("CARGO_BIN_EXE_chorus");

/// A running `chorus agent`; SIGKILLed on drop unless it already exited.
pub struct Agent {
    pub child: Child,
    pub http: SocketAddr,
    pub log: PathBuf,
}

impl Agent {
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// `kill -9`: `Child::kill` sends SIGKILL on Unix; waits until the process is gone.
    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        let status = self.child.wait().unwrap();
        assert!(!status.success(), "a SIGKILLed agent cannot exit cleanly");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!(
            "chorus-cli-{tag}-{}-{:016x}",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A random value (for a cluster name) and a loopback multicast group derived from it that no
/// other test uses: 239.255.x.y on a port in 20 000..50 000.
pub fn random_group() -> (u64, SocketAddrV4) {
    let r: u64 = rand::random();
    let b = r.to_le_bytes();
    let group = SocketAddrV4::new(
        Ipv4Addr::new(239, 255, b[0], b[1].max(1)),
        20_000 + u16::from_le_bytes([b[2], b[3]]) % 30_000,
    );
    (r, group)
}

pub fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The arguments of `chorus agent` as node `node` of `cluster` on loopback multicast group
/// `group` (TTL 0), with its HTTP API on `http`.
#[allow(dead_code)] // not every test binary starts agents this way
pub fn loopback_agent_args(
    cluster: &str,
    group: SocketAddrV4,
    node: u64,
    http: SocketAddr,
) -> Vec<String> {
    [
        "agent",
        "--cluster",
        cluster,
        "--group",
        &group.to_string(),
        "--iface",
        "127.0.0.1",
        "--ttl",
        "0",
        "--node-id",
        &node.to_string(),
        "--http",
        &http.to_string(),
    ]
    .iter()
    .map(|s| (*s).to_string())
    .collect()
}

/// Starts `chorus` with `args` (an `agent` command whose HTTP API listens on `http`), logging
/// to a temp file, and waits (at most 20 s) until the API answers.
pub fn spawn_agent(args: &[String], http: SocketAddr) -> Agent {
    spawn_agent_of(BIN, args, http)
}

/// [`spawn_agent`] with another `chorus` binary (e.g. a release build).
pub fn spawn_agent_of(bin: &str, args: &[String], http: SocketAddr) -> Agent {
    let log = std::env::temp_dir().join(format!(
        "chorus-cli-agent-{:016x}.log",
        rand::random::<u64>()
    ));
    let file = std::fs::File::create(&log).unwrap();
    let child = Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(file.try_clone().unwrap())
        .stderr(file)
        .spawn()
        .unwrap();
    let mut agent = Agent { child, http, log };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Ok(Some(status)) = agent.child.try_wait() {
            panic!("agent exited early ({status}):\n{}", agent.log_text());
        }
        if matches!(try_http(http, "GET", "/v1/stats", &[], b""), Ok((200, _))) {
            return agent;
        }
        assert!(
            Instant::now() < deadline,
            "agent never answered:\n{}",
            agent.log_text()
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// One raw HTTP/1.1 request (Connection: close); returns status and body (de-chunked), or the
/// I/O error (a writer sees those when the agent is killed under it).
pub fn try_http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<(u16, Vec<u8>)> {
    let mut s = TcpStream::connect(addr)?;
    s.set_read_timeout(Some(Duration::from_secs(10)))?;
    s.set_nodelay(true)?;
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())?;
    // The server may answer (413) before reading a large body; a failed write is fine then.
    let _ = s.write_all(body);
    let mut resp = Vec::new();
    let _ = s.read_to_end(&mut resp);
    let head_end = resp
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or_else(|| std::io::Error::other("response without a complete head"))?;
    let head = String::from_utf8_lossy(&resp[..head_end]).to_ascii_lowercase();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("no status in {head:?}")))?;
    let mut body = resp[head_end + 4..].to_vec();
    if head.contains("transfer-encoding: chunked") {
        body = dechunk(&body);
    }
    Ok((status, body))
}

/// [`try_http`] that panics on an I/O error.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> (u16, Vec<u8>) {
    try_http(addr, method, path, headers, body).unwrap_or_else(|e| panic!("{method} {path}: {e}"))
}

fn dechunk(mut data: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(line_end) = data.windows(2).position(|w| w == b"\r\n") {
        let size =
            usize::from_str_radix(std::str::from_utf8(&data[..line_end]).unwrap().trim(), 16)
                .unwrap_or(0);
        if size == 0 {
            break;
        }
        let start = line_end + 2;
        out.extend_from_slice(&data[start..(start + size).min(data.len())]);
        data = &data[(start + size + 2).min(data.len())..];
    }
    out
}
