//! [`Source`]: where a template's functions read: the agent's own node ([`NodeSource`]) or a
//! running agent over its HTTP API ([`HttpSource`], for `chorus template --once`).

use std::net::SocketAddr;

use anyhow::{Context, anyhow};
use bytes::Bytes;
use chorus::{MemberState, Node};
use serde_json::Value;

use crate::client::Client;

/// A member as templates see it (`members()`, `node()`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberView {
    /// Node id.
    pub id: u64,
    /// Node name, when the agent knows one.
    pub name: Option<String>,
    /// Address its datagrams come from.
    pub addr: SocketAddr,
    /// `self`, `alive` or `suspected`.
    pub state: String,
}

/// The reads a template makes. Called from minijinja's (synchronous) rendering.
pub trait Source: Send + Sync {
    /// The value of `key`, `None` when absent (deleted keys are absent).
    ///
    /// # Errors
    /// When the source cannot be read (the agent is unreachable).
    fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>>;

    /// Every live `(key, value)` under `prefix`, in key order.
    ///
    /// # Errors
    /// As [`Source::get`].
    fn scan(&self, prefix: &str) -> anyhow::Result<Vec<(String, Bytes)>>;

    /// The members, this node included.
    ///
    /// # Errors
    /// As [`Source::get`].
    fn members(&self) -> anyhow::Result<Vec<MemberView>>;

    /// This node.
    ///
    /// # Errors
    /// As [`Source::get`].
    fn local(&self) -> anyhow::Result<MemberView> {
        self.members()?
            .into_iter()
            .find(|m| m.state == MemberState::Local.as_str())
            .ok_or_else(|| anyhow!("the agent does not list itself among its members"))
    }
}

/// The agent's own node: reads go straight to the local store.
#[derive(Debug, Clone)]
pub struct NodeSource(pub Node);

impl Source for NodeSource {
    fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        Ok(self.0.get(key).map(|e| e.value))
    }

    fn scan(&self, prefix: &str) -> anyhow::Result<Vec<(String, Bytes)>> {
        Ok(self
            .0
            .scan(prefix)
            .into_iter()
            .map(|(k, e)| (k, e.value))
            .collect())
    }

    fn members(&self) -> anyhow::Result<Vec<MemberView>> {
        Ok(self
            .0
            .members()
            .into_iter()
            .map(|m| MemberView {
                id: m.node_id.0,
                name: None,
                addr: m.addr,
                state: m.state.as_str().to_owned(),
            })
            .collect())
    }
}

/// A running agent over its HTTP API (`CHORUS_HTTP_TOKEN` is sent when set).
#[derive(Clone)]
pub struct HttpSource(pub Client);

fn member_from_json(m: &Value) -> anyhow::Result<MemberView> {
    let field = |name: &str| m.get(name).ok_or_else(|| anyhow!("member without {name}"));
    Ok(MemberView {
        id: field("node_id")?
            .as_u64()
            .ok_or_else(|| anyhow!("member node_id is not a number"))?,
        name: m.get("name").and_then(Value::as_str).map(str::to_owned),
        addr: field("addr")?
            .as_str()
            .ok_or_else(|| anyhow!("member addr is not text"))?
            .parse()
            .context("member addr is not ADDR:PORT")?,
        state: field("state")?
            .as_str()
            .ok_or_else(|| anyhow!("member state is not text"))?
            .to_owned(),
    })
}

impl Source for HttpSource {
    fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
        let reply = self.0.get_key(key)?;
        if reply.status == 404 {
            return Ok(None);
        }
        Ok(Some(Bytes::from(reply.ok()?.body)))
    }

    fn scan(&self, prefix: &str) -> anyhow::Result<Vec<(String, Bytes)>> {
        let list = self.0.list(prefix)?;
        let entries = list
            .get("entries")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("agent answer has no entries"))?;
        entries
            .iter()
            .map(|e| {
                let key = e
                    .get("key")
                    .and_then(Value::as_str)
                    .ok_or_else(|| anyhow!("entry without a key"))?;
                let value = match (e.get("value"), e.get("value_base64")) {
                    (Some(Value::String(text)), _) => Bytes::from(text.clone()),
                    (_, Some(Value::String(b64))) => Bytes::from(
                        base64::Engine::decode(&base64::engine::general_purpose::STANDARD, b64)
                            .context("entry value_base64 is not base64")?,
                    ),
                    _ => return Err(anyhow!("entry {key:?} without a value")),
                };
                Ok((key.to_owned(), value))
            })
            .collect()
    }

    fn members(&self) -> anyhow::Result<Vec<MemberView>> {
        let answer = self.0.get("/v1/members")?.ok()?.json()?;
        answer
            .get("members")
            .and_then(Value::as_array)
            .ok_or_else(|| anyhow!("agent answer has no members"))?
            .iter()
            .map(member_from_json)
            .collect()
    }
}

#[cfg(test)]
pub mod test_support {
    //! A fixed in-memory [`Source`] for the renderer's unit tests.

    use std::collections::BTreeMap;

    use super::*;

    /// Fixed entries, and members 1 (self, 127.0.0.1) and 2 (alive, 127.0.0.2).
    pub struct Fixed {
        pub entries: BTreeMap<String, Bytes>,
    }

    impl Fixed {
        pub fn new(entries: &[(&str, &str)]) -> Fixed {
            Fixed {
                entries: entries
                    .iter()
                    .map(|(k, v)| ((*k).to_owned(), Bytes::from((*v).to_owned())))
                    .collect(),
            }
        }
    }

    impl Source for Fixed {
        fn get(&self, key: &str) -> anyhow::Result<Option<Bytes>> {
            Ok(self.entries.get(key).cloned())
        }

        fn scan(&self, prefix: &str) -> anyhow::Result<Vec<(String, Bytes)>> {
            Ok(self
                .entries
                .range(prefix.to_owned()..)
                .take_while(|(k, _)| k.starts_with(prefix))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect())
        }

        fn members(&self) -> anyhow::Result<Vec<MemberView>> {
            Ok([(1, "127.0.0.1", "self"), (2, "127.0.0.2", "alive")]
                .into_iter()
                .map(|(id, ip, state)| MemberView {
                    id,
                    name: None,
                    addr: SocketAddr::new(
                        ip.parse().unwrap_or(std::net::Ipv4Addr::LOCALHOST.into()),
                        7400,
                    ),
                    state: state.to_owned(),
                })
                .collect())
        }
    }
}
