//! `PUT /v1/txn`: Consul's KV transactions, applied as one Chorus batch with their checks
//! in the same atomic step.
//!
//! The body is Consul's: a JSON array of at most [`MAX_OPS`] operations
//! `{"KV": {"Verb", "Key", "Value" (base64), "Flags", "Index"}}` with the verbs `set`, `cas`,
//! `get`, `get-tree`, `check-index`, `check-not-exists`, `delete`, `delete-tree` and
//! `delete-cas`. The answer is 200 with `{"Results": [{"KV": entry}], "Errors": null}`, or
//! 409 with `{"Results": null, "Errors": [{"OpIndex", "What"}]}` when a check fails (nothing
//! is written then).
//!
//! The operations are evaluated in order over the agent's view with the transaction's own
//! earlier writes laid over it. What an operation found in the store (a `cas` index, a
//! `get`'s entry, a key's absence) becomes a [`Check`] of the batch, so the writes apply only
//! if the store still holds exactly that when the batch is applied; if it moved in between,
//! the transaction is evaluated again (a few times). `get-tree` is read from the view and is
//! not re-checked. A transaction without writes reads only.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry as Slot;
use std::sync::Arc;
use std::time::Duration;

use axum::body::{Body, Bytes};
use axum::extract::rejection::BytesRejection;
use axum::extract::{RawQuery, State};
use axum::http::StatusCode;
use axum::response::Response;
use base64::Engine as _;
use chorus::{Check, Entry, Expect, Node, Op, PutMeta, Version};
use futures_util::StreamExt;
use serde::Deserialize;
use serde_json::{Value, json};

use super::kv::{answer, dir_entry, dir_json};
use super::{Consul, Query, body_error, condition_failed, index, not_supported_sessions};
use crate::http::ApiError;

/// Most operations in one transaction (Consul's limit).
pub const MAX_OPS: usize = 64;
/// How many times a transaction is evaluated again when the store moved under it.
const TRIES: usize = 3;

/// One operation of the body: only `KV` is served.
#[derive(Debug, Deserialize)]
struct TxnOp {
    #[serde(rename = "KV", alias = "kv", alias = "Kv")]
    kv: Option<KvOp>,
    #[serde(flatten)]
    other: BTreeMap<String, Value>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KvOp {
    #[serde(rename = "Verb", alias = "verb")]
    verb: String,
    #[serde(rename = "Key", alias = "key", default)]
    key: String,
    #[serde(rename = "Value", alias = "value", default)]
    value: Option<String>,
    #[serde(rename = "Flags", alias = "flags", default)]
    flags: u64,
    #[serde(rename = "Index", alias = "index", default)]
    index: u64,
    #[serde(rename = "Session", alias = "session", default)]
    session: String,
    #[serde(rename = "Namespace", alias = "namespace", default)]
    namespace: Option<String>,
    #[serde(rename = "Partition", alias = "partition", default)]
    partition: Option<String>,
}

/// A parsed operation.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verb {
    Set {
        value: Bytes,
        flags: u64,
    },
    Cas {
        value: Bytes,
        flags: u64,
        index: u64,
    },
    Get,
    GetTree,
    CheckIndex {
        index: u64,
    },
    CheckNotExists,
    Delete,
    DeleteTree,
    DeleteCas {
        index: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Operation {
    verb: Verb,
    key: String,
}

/// Parses the body.
///
/// # Errors
/// 400 for JSON that is not a list of KV operations, a bad verb or base64, session verbs
/// (501); 413 beyond [`MAX_OPS`].
fn parse(body: &[u8]) -> Result<Vec<Operation>, ApiError> {
    let ops: Vec<TxnOp> = serde_json::from_slice(body)
        .map_err(|e| ApiError::bad_request(format!("failed to parse the transaction: {e}")))?;
    if ops.len() > MAX_OPS {
        return Err(ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "transaction contains too many operations ({} > {MAX_OPS})",
                ops.len()
            ),
        ));
    }
    ops.into_iter()
        .enumerate()
        .map(|(i, op)| {
            let kv = match (op.kv, op.other.keys().next()) {
                (Some(kv), None) => kv,
                (_, Some(other)) => {
                    return Err(ApiError::bad_request(format!(
                        "operation {i}: only KV operations are served here, not {other:?}"
                    )));
                }
                (None, None) => {
                    return Err(ApiError::bad_request(format!(
                        "operation {i}: expected {{\"KV\": {{...}}}}"
                    )));
                }
            };
            operation(i, kv)
        })
        .collect()
}

fn operation(i: usize, kv: KvOp) -> Result<Operation, ApiError> {
    for space in [&kv.namespace, &kv.partition].into_iter().flatten() {
        if !space.is_empty() && space != "default" {
            return Err(ApiError::bad_request(format!(
                "operation {i}: namespaces and partitions are not supported (only \"default\")"
            )));
        }
    }
    if !kv.session.is_empty() {
        return Err(not_supported_sessions());
    }
    let value = || -> Result<Bytes, ApiError> {
        match kv.value.as_deref() {
            None => Ok(Bytes::new()),
            Some(text) => base64::engine::general_purpose::STANDARD
                .decode(text)
                .map(Bytes::from)
                .map_err(|e| {
                    ApiError::bad_request(format!("operation {i}: Value is not base64: {e}"))
                }),
        }
    };
    let verb = match kv.verb.as_str() {
        "set" => Verb::Set {
            value: value()?,
            flags: kv.flags,
        },
        "cas" => Verb::Cas {
            value: value()?,
            flags: kv.flags,
            index: kv.index,
        },
        "get" => Verb::Get,
        "get-tree" => Verb::GetTree,
        "check-index" => Verb::CheckIndex { index: kv.index },
        "check-not-exists" => Verb::CheckNotExists,
        "delete" => Verb::Delete,
        "delete-tree" => Verb::DeleteTree,
        "delete-cas" => Verb::DeleteCas { index: kv.index },
        "lock" | "unlock" | "check-session" => return Err(not_supported_sessions()),
        other => {
            return Err(ApiError::bad_request(format!(
                "operation {i}: unknown KV verb {other:?} (served: set, cas, get, get-tree, \
                 check-index, check-not-exists, delete, delete-tree, delete-cas)"
            )));
        }
    };
    if kv.key.is_empty() && !matches!(verb, Verb::GetTree | Verb::DeleteTree) {
        return Err(ApiError::bad_request(format!(
            "operation {i}: missing key name"
        )));
    }
    Ok(Operation { verb, key: kv.key })
}

/// What the transaction knows of a key.
#[derive(Debug, Clone)]
enum Known {
    /// As the store held it when first touched (a check of the batch pins it).
    Stored(Option<Entry>),
    /// Written by an earlier operation of this transaction.
    Put { value: Bytes, flags: u64 },
    /// Deleted by an earlier operation of this transaction.
    Deleted,
}

/// One result, before the batch's revisions are known.
#[derive(Debug, Clone)]
enum Result1 {
    /// An entry as read from the store.
    Read(String, Entry, bool),
    /// What this transaction writes under a key: value and flags (its index is known once
    /// the batch is applied).
    Written {
        key: String,
        value: Bytes,
        flags: u64,
        with_value: bool,
    },
}

/// The outcome of evaluating the operations over the view.
#[derive(Debug)]
struct Plan {
    checks: Vec<Check>,
    ops: Vec<Op>,
    results: Vec<Result1>,
    /// Key of each check → the operation that made it (for a 409's `OpIndex`).
    check_ops: BTreeMap<String, usize>,
}

/// A failed operation: its index and what failed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failed {
    op: usize,
    what: String,
}

/// Evaluates `ops` in order over `node`'s view.
fn plan(node: &Node, ops: &[Operation]) -> Result<Plan, Failed> {
    let mut known: BTreeMap<String, Known> = BTreeMap::new();
    let mut checks = Vec::new();
    let mut check_ops = BTreeMap::new();
    let mut results = Vec::new();
    // The entry of `key` as the transaction sees it (reading the store on first touch).
    fn look<'a>(node: &Node, known: &'a mut BTreeMap<String, Known>, key: &str) -> &'a mut Known {
        known
            .entry(key.to_owned())
            .or_insert_with(|| Known::Stored(node.get(key)))
    }
    let mut pin = |key: &str, expect: Expect, op: usize, checks: &mut Vec<Check>| {
        // One check per key: the first touch is the only one that reads the store.
        if let std::collections::btree_map::Entry::Vacant(slot) = check_ops.entry(key.to_owned()) {
            slot.insert(op);
            checks.push(Check {
                key: key.to_owned(),
                expect,
            });
        }
    };
    for (i, op) in ops.iter().enumerate() {
        let fail = |what: String| Failed { op: i, what };
        let key = op.key.as_str();
        match &op.verb {
            Verb::Set { value, flags } => {
                known.insert(
                    key.to_owned(),
                    Known::Put {
                        value: value.clone(),
                        flags: *flags,
                    },
                );
                results.push(written(key, value, *flags, false));
            }
            Verb::Cas {
                value,
                flags,
                index: want,
            } => {
                match look(node, &mut known, key) {
                    Known::Stored(entry) => {
                        let found = entry.as_ref().map(|e| index::of_revision(e.revision));
                        match (found, *want) {
                            (None, 0) => pin(key, Expect::Absent, i, &mut checks),
                            (Some(found), want) if found == want => {
                                pin(key, revision_of(want), i, &mut checks);
                            }
                            (found, want) => {
                                return Err(fail(cas_mismatch(key, found, want)));
                            }
                        }
                    }
                    Known::Deleted if *want == 0 => {}
                    Known::Deleted | Known::Put { .. } => {
                        return Err(fail(format!(
                            "failed to set key {key:?}: index {want} does not match the \
                             transaction's own earlier write"
                        )));
                    }
                }
                known.insert(
                    key.to_owned(),
                    Known::Put {
                        value: value.clone(),
                        flags: *flags,
                    },
                );
                results.push(written(key, value, *flags, false));
            }
            Verb::Get | Verb::CheckIndex { .. } => {
                let with_value = op.verb == Verb::Get;
                match look(node, &mut known, key).clone() {
                    Known::Stored(Some(entry)) => {
                        if let Verb::CheckIndex { index: want } = op.verb {
                            let found = index::of_revision(entry.revision);
                            if found != want {
                                return Err(fail(format!(
                                    "current modify index {found} of key {key:?} is not {want}"
                                )));
                            }
                        }
                        pin(key, Expect::Revision(entry.revision), i, &mut checks);
                        results.push(Result1::Read(key.to_owned(), entry, with_value));
                    }
                    Known::Stored(None) | Known::Deleted => {
                        return Err(fail(format!("key {key:?} doesn't exist")));
                    }
                    Known::Put { value, flags } if with_value => {
                        results.push(written(key, &value, flags, true));
                    }
                    Known::Put { .. } => {
                        return Err(fail(format!(
                            "key {key:?} was written by this transaction: its index is not \
                             known before it is applied"
                        )));
                    }
                }
            }
            Verb::CheckNotExists => match look(node, &mut known, key) {
                Known::Stored(None) => pin(key, Expect::Absent, i, &mut checks),
                Known::Deleted => {}
                Known::Stored(Some(_)) | Known::Put { .. } => {
                    return Err(fail(format!("key {key:?} exists")));
                }
            },
            Verb::Delete => {
                known.insert(key.to_owned(), Known::Deleted);
            }
            Verb::DeleteCas { index: want } => match look(node, &mut known, key) {
                // As Consul: deleting an absent key succeeds, whatever the index.
                Known::Stored(None) => pin(key, Expect::Absent, i, &mut checks),
                Known::Deleted => {}
                Known::Stored(Some(entry)) => {
                    let found = index::of_revision(entry.revision);
                    if found != *want {
                        return Err(fail(cas_mismatch(key, Some(found), *want)));
                    }
                    pin(key, revision_of(*want), i, &mut checks);
                    known.insert(key.to_owned(), Known::Deleted);
                }
                Known::Put { .. } => {
                    return Err(fail(format!(
                        "failed to delete key {key:?}: index {want} does not match the \
                         transaction's own earlier write"
                    )));
                }
            },
            Verb::GetTree => {
                let mut tree: BTreeMap<String, Result1> = node
                    .scan(key)
                    .into_iter()
                    .map(|(k, e)| (k.clone(), Result1::Read(k, e, true)))
                    .collect();
                for (k, state) in known.range(key.to_owned()..) {
                    if !k.starts_with(key) {
                        break;
                    }
                    match state {
                        Known::Put { value, flags } => {
                            tree.insert(k.clone(), written(k, value, *flags, true));
                        }
                        Known::Deleted | Known::Stored(None) => {
                            tree.remove(k);
                        }
                        Known::Stored(Some(_)) => {}
                    }
                }
                results.extend(tree.into_values());
            }
            Verb::DeleteTree => {
                let mut doomed: Vec<String> = node.scan(key).into_iter().map(|(k, _)| k).collect();
                doomed.extend(
                    known
                        .range(key.to_owned()..)
                        .take_while(|(k, _)| k.starts_with(key))
                        .map(|(k, _)| k.clone()),
                );
                for k in doomed {
                    known.insert(k, Known::Deleted);
                }
            }
        }
    }
    // The writes: each key's final state, once (a batch writes a key at most once). A delete
    // of a key the store does not hold writes nothing.
    let ops = known
        .into_iter()
        .filter_map(|(key, state)| match state {
            Known::Put { value, flags } => Some(Op::put_with(
                key,
                value,
                PutMeta {
                    flags,
                    owned: false,
                },
            )),
            Known::Deleted if node.get(&key).is_some() => Some(Op::delete(key)),
            Known::Deleted | Known::Stored(_) => None,
        })
        .collect();
    Ok(Plan {
        checks,
        ops,
        results,
        check_ops,
    })
}

fn written(key: &str, value: &Bytes, flags: u64, with_value: bool) -> Result1 {
    Result1::Written {
        key: key.to_owned(),
        value: value.clone(),
        flags,
        with_value,
    }
}

fn revision_of(consul_index: u64) -> Expect {
    match index::to_revision(consul_index) {
        Some(revision) => Expect::Revision(revision),
        None => Expect::Absent,
    }
}

fn cas_mismatch(key: &str, found: Option<u64>, want: u64) -> String {
    match found {
        None => format!("failed to apply cas to key {key:?}: it does not exist (index {want})"),
        Some(found) => {
            format!("failed to apply cas to key {key:?}: its modify index is {found}, not {want}")
        }
    }
}

/// `PUT /v1/txn`.
pub async fn handle(
    State(consul): State<Arc<Consul>>,
    RawQuery(q): RawQuery,
    body: Result<Bytes, BytesRejection>,
) -> Result<Response, ApiError> {
    Query::parse(q.as_deref(), &[])?;
    let ops = parse(&body.map_err(body_error)?)?;
    let node = &consul.node;
    let mut tries = 0;
    loop {
        tries += 1;
        let before = node.revision();
        let plan = match plan(node, &ops) {
            Ok(plan) => plan,
            Err(failed) => return Ok(conflict(index::of_revision(before), &[failed])),
        };
        if plan.ops.is_empty() {
            let results = finish(plan.results, &BTreeMap::new());
            return Ok(success(index::of_revision(before), results));
        }
        match node.batch_checked(plan.checks, plan.ops).await {
            Ok(version) => {
                let written = written_revisions(node, &plan.results, version, before).await;
                let results = finish(plan.results, &written);
                return Ok(success(index::of_revision(node.revision()), results));
            }
            Err(e) => match condition_failed(&e) {
                // The store moved between the evaluation and the batch: evaluate again.
                Some(_) if tries < TRIES => continue,
                Some(key) => {
                    let op = plan.check_ops.get(key).copied().unwrap_or(0);
                    let failed = Failed {
                        op,
                        what: format!(
                            "key {key:?} kept changing while the transaction was applied: {e}"
                        ),
                    };
                    return Ok(conflict(index::of_revision(node.revision()), &[failed]));
                }
                None => return Err(e.into()),
            },
        }
    }
}

/// The revision at which the batch wrote each key of a `Written` result: read from the
/// store, or, if another write replaced the key already, found on the change log.
async fn written_revisions(
    node: &Node,
    results: &[Result1],
    version: Version,
    before: u64,
) -> BTreeMap<String, u64> {
    let mut out = BTreeMap::new();
    for result in results {
        let Result1::Written { key, .. } = result else {
            continue;
        };
        let Slot::Vacant(slot) = out.entry(key.clone()) else {
            continue;
        };
        let revision = match node.get(key) {
            Some(e) if e.version == version => Some(e.revision),
            _ => from_change_log(node, key, version, before).await,
        };
        // Not found within a second (the log moved on): the store's revision is an index
        // at or above the write's.
        slot.insert(revision.unwrap_or_else(|| node.revision()));
    }
    out
}

async fn from_change_log(node: &Node, key: &str, version: Version, before: u64) -> Option<u64> {
    let until = node.revision();
    let mut changes = node.watch_from(key, before).await.ok()?;
    tokio::time::timeout(Duration::from_secs(1), async {
        while let Some(Ok(change)) = changes.next().await {
            if change.key == key && change.version == version {
                return Some(change.revision);
            }
            if change.revision >= until {
                break;
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
}

fn finish(results: Vec<Result1>, written: &BTreeMap<String, u64>) -> Vec<Value> {
    results
        .into_iter()
        .map(|r| {
            let entry = match r {
                Result1::Read(key, entry, with_value) => dir_entry(&key, &entry, with_value),
                Result1::Written {
                    key,
                    value,
                    flags,
                    with_value,
                } => {
                    let revision = written.get(&key).copied().unwrap_or(0);
                    dir_json(&key, flags, revision, with_value.then_some(&value[..]))
                }
            };
            json!({ "KV": entry })
        })
        .collect()
}

fn success(consul_index: u64, results: Vec<Value>) -> Response {
    let body = json!({ "Results": results, "Errors": null });
    answer(
        StatusCode::OK,
        consul_index,
        "application/json",
        Body::from(body.to_string()),
    )
}

fn conflict(consul_index: u64, failed: &[Failed]) -> Response {
    let errors: Vec<Value> = failed
        .iter()
        .map(|f| json!({ "OpIndex": f.op, "What": f.what }))
        .collect();
    let body = json!({ "Results": null, "Errors": errors });
    answer(
        StatusCode::CONFLICT,
        consul_index,
        "application/json",
        Body::from(body.to_string()),
    )
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn the_body_is_consuls() {
        let ops = parse(
            br#"[{"KV":{"Verb":"set","Key":"a","Value":"aGk=","Flags":3}},
                 {"KV":{"Verb":"cas","Key":"b","Value":"","Index":0}},
                 {"kv":{"verb":"check-index","key":"a","index":5}},
                 {"KV":{"Verb":"delete-tree","Key":""}}]"#,
        )
        .unwrap();
        assert_eq!(
            ops[0],
            Operation {
                verb: Verb::Set {
                    value: Bytes::from_static(b"hi"),
                    flags: 3
                },
                key: "a".into()
            }
        );
        assert_eq!(ops[2].verb, Verb::CheckIndex { index: 5 });
        assert_eq!(ops[3].verb, Verb::DeleteTree);
    }

    #[test]
    fn bad_bodies_are_refused() {
        let status = |body: &str| {
            axum::response::IntoResponse::into_response(parse(body.as_bytes()).unwrap_err())
                .status()
        };
        for bad in [
            "not json",
            "{}",
            r#"[{"KV":{"Verb":"set","Key":"a","Value":"%%%"}}]"#,
            r#"[{"KV":{"Verb":"explode","Key":"a"}}]"#,
            r#"[{"KV":{"Verb":"set","Key":""}}]"#,
            r#"[{"KV":{"Verb":"set","Key":"a","Bogus":1}}]"#,
            r#"[{"Node":{"Verb":"get"}}]"#,
            r#"[{}]"#,
            r#"[{"KV":{"Verb":"get","Key":"a","Namespace":"team"}}]"#,
        ] {
            assert_eq!(status(bad), StatusCode::BAD_REQUEST, "{bad}");
        }
        assert_eq!(
            status(r#"[{"KV":{"Verb":"lock","Key":"a","Session":"s"}}]"#),
            StatusCode::NOT_IMPLEMENTED
        );
        let many = format!(
            "[{}]",
            vec![r#"{"KV":{"Verb":"get","Key":"a"}}"#; MAX_OPS + 1].join(",")
        );
        assert_eq!(status(&many), StatusCode::PAYLOAD_TOO_LARGE);
    }
}
