//! [`Agent`]: a guard for a child process that serves an HTTP API (a `chorus agent`), with
//! its stdout and stderr in a log file; SIGKILLed when the guard drops.

use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tempfile::TempPath;

/// How long [`Agent::spawn`] waits for the API to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(20);

/// When a freshly spawned agent counts as ready.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Ready {
    /// `GET` of this path answers 200 (a `chorus agent`: `/v1/stats`).
    Answers(&'static str),
    /// Its HTTP port accepts TCP connections (an API that refuses requests without a token).
    Listening,
}

impl Ready {
    fn reached(self, http: SocketAddr) -> bool {
        match self {
            Ready::Answers(path) => matches!(
                crate::http::try_request(http, "GET", path, &[], b""),
                Ok((200, _))
            ),
            Ready::Listening => TcpStream::connect(http).is_ok(),
        }
    }
}

/// What a `chorus agent` answers once it runs.
pub const AGENT_READY: Ready = Ready::Answers("/v1/stats");

/// A running agent process; killed (and its log file removed) on drop unless it already
/// exited.
#[derive(Debug)]
pub struct Agent {
    /// The process.
    pub child: Child,
    /// Where its HTTP API listens.
    pub http: SocketAddr,
    log: TempPath,
}

impl Agent {
    /// Spawns `command` (stdin closed, stdout and stderr to a fresh log file) and waits, at
    /// most [`READY_TIMEOUT`], until it is [`AGENT_READY`] on `http`.
    ///
    /// # Panics
    /// If the log file cannot be made, the process cannot be spawned, exits early, or its API
    /// does not answer in time; the message holds its log.
    pub fn spawn(command: Command, http: SocketAddr) -> Agent {
        Agent::spawn_until(command, http, AGENT_READY)
    }

    /// [`Agent::spawn`], ready when `ready` holds.
    ///
    /// # Panics
    /// As [`Agent::spawn`].
    pub fn spawn_until(mut command: Command, http: SocketAddr, ready: Ready) -> Agent {
        let file = tempfile::Builder::new()
            .prefix("chorus-agent-")
            .suffix(".log")
            .tempfile()
            .unwrap_or_else(|e| panic!("cannot create an agent log file: {e}"));
        let out = file
            .as_file()
            .try_clone()
            .unwrap_or_else(|e| panic!("cannot dup the agent log file: {e}"));
        let (err, log) = file.into_parts();
        let child = command
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot spawn {command:?}: {e}"));
        let mut agent = Agent { child, http, log };
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(Some(status)) = agent.child.try_wait() {
                panic!("agent exited early ({status}):\n{}", agent.log_text());
            }
            if ready.reached(http) {
                return agent;
            }
            assert!(
                Instant::now() < deadline,
                "agent never answered on {http}:\n{}",
                agent.log_text()
            );
            std::thread::sleep(Duration::from_millis(25));
        }
    }

    /// `http://ADDR` of the API.
    #[must_use]
    pub fn url(&self) -> String {
        format!("http://{}", self.http)
    }

    /// The log file.
    #[must_use]
    pub fn log_path(&self) -> &Path {
        &self.log
    }

    /// Everything the process wrote so far (empty if the log cannot be read).
    #[must_use]
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Whether the process still runs.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// `kill -9` (`Child::kill` sends SIGKILL on Unix); waits until the process is gone.
    ///
    /// # Panics
    /// If the signal cannot be sent, or the process then reports a clean exit.
    pub fn kill9(&mut self) {
        self.child
            .kill()
            .unwrap_or_else(|e| panic!("kill -9 {}: {e}", self.child.id()));
        let status = self
            .child
            .wait()
            .unwrap_or_else(|e| panic!("wait {}: {e}", self.child.id()));
        assert!(!status.success(), "a SIGKILLed agent cannot exit cleanly");
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use std::net::{Ipv4Addr, TcpListener};

    use super::*;

    #[test]
    fn an_agent_that_exits_early_panics_with_its_log() {
        let unused = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .and_then(|l| l.local_addr())
            .unwrap_or_else(|e| panic!("{e}"));
        let mut command = Command::new("sh");
        command.args(["-c", "echo booting; exit 3"]);
        let err = std::thread::spawn(move || Agent::spawn(command, unused))
            .join()
            .err()
            .and_then(|e| e.downcast_ref::<String>().cloned())
            .unwrap_or_default();
        assert!(
            err.contains("exited early") && err.contains("booting"),
            "{err}"
        );
    }
}
