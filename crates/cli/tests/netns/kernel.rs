//! Inside a node namespace, without Chorus: commands, iptables loss and partitions, and the
//! UDP probe tool (`tests/netns/udp_tool.py`).

use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};

use serde_json::Value;

use crate::lab::{Lab, repo_root, run};

pub(crate) fn udp_tool() -> PathBuf {
    repo_root().join("tests/netns/udp_tool.py")
}

impl Lab {
    /// Runs `program args` inside node `node`'s namespace and waits for it.
    pub(crate) fn exec(&self, node: u8, program: &str, args: &[&str]) -> Output {
        run(Command::new("ip")
            .args(["netns", "exec", &self.ns(node), program])
            .args(args)
            .stdin(Stdio::null()))
    }

    /// Appends an iptables (or ip6tables) rule in node `node`'s namespace.
    pub(crate) fn iptables(&self, node: u8, tool: &str, rule: &str) {
        let args: Vec<&str> = rule.split_whitespace().collect();
        self.exec(node, tool, &args);
    }

    /// Drops `probability` of the UDP datagrams arriving on eth0 of every listed node.
    /// Returns how many datagrams the INPUT DROP rules it replaced had dropped, on all nodes.
    pub(crate) fn set_loss(&self, nodes: &[u8], probability: f64) -> u64 {
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
    pub(crate) fn kernel_drops(&self, node: u8, tool: &str) -> u64 {
        let out = self.exec(node, tool, &["-L", "INPUT", "-v", "-x", "-n"]);
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|line| line.split_whitespace().nth(2) == Some("DROP"))
            .filter_map(|line| line.split_whitespace().next()?.parse::<u64>().ok())
            .sum()
    }

    /// Cuts `a` from `b` in both directions (every packet, by source address).
    pub(crate) fn partition(&self, a: &[u8], b: &[u8]) {
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
    pub(crate) fn heal(&self, nodes: &[u8]) {
        for &node in nodes {
            for tool in ["iptables", "ip6tables"] {
                self.exec(node, tool, &["-F", "INPUT"]);
                self.exec(node, tool, &["-F", "OUTPUT"]);
            }
        }
        self.log(&format!("healed nodes {nodes:?}"));
    }

    /// Runs the python UDP tool inside `node`'s namespace, returns its JSON summary.
    pub(crate) fn udp_tool(&self, node: u8, args: &[&str]) -> Value {
        let child = self.spawn_udp_tool(node, args);
        finish_udp_tool(child, args)
    }

    /// Starts the python UDP tool inside `node`'s namespace (every subcommand ends by itself
    /// within its `--timeout`/`--max-seconds`); see [`finish_udp_tool`].
    pub(crate) fn spawn_udp_tool(&self, node: u8, args: &[&str]) -> Child {
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
pub(crate) fn finish_udp_tool(child: Child, args: &[&str]) -> Value {
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
