//! Client commands: talk to a running agent over its HTTP API (blocking, ureq).

use std::io::{BufRead, BufReader, Read, Write};
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use serde_json::Value;

use crate::cli::{ClientOpts, KeyArgs, LsArgs, PutArgs, WatchArgs};

/// How a client command ended when it did not fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Done (exit code 0).
    Ok,
    /// The key was absent (exit code 1).
    NotFound,
}

/// Time allowed for one request (not for `watch`, which streams).
const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest response body read into memory.
const MAX_RESPONSE: u64 = 256 * 1024 * 1024;

/// A thin blocking client for the agent's HTTP API.
#[derive(Clone)]
pub struct Client {
    base: String,
    agent: ureq::Agent,
    streaming: ureq::Agent,
    /// `Bearer TOKEN` from `CHORUS_HTTP_TOKEN`, for an agent started with `--http-token`.
    authorization: Option<String>,
}

/// A response: status, headers of interest, body.
pub struct Reply {
    /// HTTP status code.
    pub status: u16,
    /// `X-Chorus-Revision` when present.
    pub revision: Option<String>,
    /// `X-Chorus-Version` when present.
    pub version: Option<String>,
    /// The body.
    pub body: Vec<u8>,
}

impl Reply {
    /// The body parsed as JSON.
    pub(crate) fn json(&self) -> anyhow::Result<Value> {
        serde_json::from_slice(&self.body).context("agent sent invalid JSON")
    }

    /// The agent's `{"error": ...}` message, or the raw body.
    pub(crate) fn error_message(&self) -> String {
        match serde_json::from_slice::<Value>(&self.body) {
            Ok(v) => match v.get("error").and_then(Value::as_str) {
                Some(msg) => msg.to_string(),
                None => v.to_string(),
            },
            Err(_) => String::from_utf8_lossy(&self.body).into_owned(),
        }
    }

    /// Fails unless the status is 2xx.
    pub(crate) fn ok(self) -> anyhow::Result<Self> {
        if (200..300).contains(&self.status) {
            Ok(self)
        } else {
            Err(anyhow!(
                "agent answered {}: {}",
                self.status,
                self.error_message()
            ))
        }
    }
}

impl Client {
    /// A client of the agent at `base` (e.g. `http://127.0.0.1:7480`).
    pub fn new(base: &str) -> Self {
        let make = |timeout: Option<Duration>| -> ureq::Agent {
            ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(timeout)
                .timeout_connect(Some(Duration::from_secs(5)))
                // The agent closes a connection idle for its header timeout (10 s): never
                // reuse one that may be about to close.
                .max_idle_age(crate::server::HEADER_TIMEOUT / 2)
                .build()
                .into()
        };
        Self {
            base: base.trim_end_matches('/').to_string(),
            agent: make(Some(REQUEST_TIMEOUT)),
            streaming: make(None),
            authorization: std::env::var("CHORUS_HTTP_TOKEN")
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| format!("Bearer {t}")),
        }
    }

    /// URL of a key.
    fn key_url(&self, key: &str) -> String {
        format!("{}/v1/kv/{}", self.base, encode(key, true))
    }

    fn finish(
        &self,
        result: Result<ureq::http::Response<ureq::Body>, ureq::Error>,
    ) -> anyhow::Result<Reply> {
        let mut resp =
            result.with_context(|| format!("cannot reach the agent at {}", self.base))?;
        let header = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        let status = resp.status().as_u16();
        let revision = header("x-chorus-revision");
        let version = header("x-chorus-version");
        let body = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE)
            .read_to_vec()
            .context("cannot read the agent's answer")?;
        Ok(Reply {
            status,
            revision,
            version,
            body,
        })
    }

    /// Adds the bearer token, if any.
    fn auth<B>(&self, req: ureq::RequestBuilder<B>) -> ureq::RequestBuilder<B> {
        match &self.authorization {
            Some(value) => req.header("authorization", value),
            None => req,
        }
    }

    /// `GET path` (path starts with `/`).
    pub fn get(&self, path: &str) -> anyhow::Result<Reply> {
        self.finish(
            self.auth(self.agent.get(format!("{}{path}", self.base)))
                .call(),
        )
    }

    /// `GET /v1/kv/{key}`.
    pub fn get_key(&self, key: &str) -> anyhow::Result<Reply> {
        self.finish(self.auth(self.agent.get(self.key_url(key))).call())
    }

    /// `PUT /v1/kv/{key}`.
    pub fn put_key(&self, key: &str, value: &[u8]) -> anyhow::Result<Reply> {
        self.finish(self.auth(self.agent.put(self.key_url(key))).send(value))
    }

    /// `DELETE /v1/kv/{key}`.
    pub fn delete_key(&self, key: &str) -> anyhow::Result<Reply> {
        self.finish(self.auth(self.agent.delete(self.key_url(key))).call())
    }

    /// `GET path` without the per-request timeout (a snapshot of a large store).
    pub fn get_large(&self, path: &str) -> anyhow::Result<Reply> {
        self.finish(
            self.auth(self.streaming.get(format!("{}{path}", self.base)))
                .call(),
        )
    }

    /// `PUT path` with `body`, without the per-request timeout (a restore or an import).
    pub fn put_large(&self, path: &str, body: &[u8]) -> anyhow::Result<Reply> {
        self.finish(
            self.auth(self.streaming.put(format!("{}{path}", self.base)))
                .send(body),
        )
    }

    /// `GET /v1/kv?prefix=P`, parsed.
    pub fn list(&self, prefix: &str) -> anyhow::Result<Value> {
        self.get(&format!("/v1/kv?prefix={}", encode(prefix, false)))?
            .ok()?
            .json()
    }
}

/// Percent-encodes everything but unreserved characters (and `/` when `keep_slash`).
pub fn encode(s: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        let keep = b.is_ascii_alphanumeric()
            || matches!(b, b'-' | b'_' | b'.' | b'~')
            || (keep_slash && b == b'/');
        if keep {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// Prints a JSON value, pretty, to stdout.
pub(crate) fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    serde_json::to_writer_pretty(&mut out, value)?;
    writeln!(out)?;
    Ok(())
}

/// The value of an entry as text (binary values are summarised).
fn entry_text(entry: &Value) -> String {
    if let Some(v) = entry.get("value").and_then(Value::as_str) {
        return v.to_string();
    }
    if let Some(b64) = entry.get("value_base64").and_then(Value::as_str) {
        return format!("<binary, {} bytes>", b64.len() / 4 * 3);
    }
    String::new()
}

/// `chorus put`.
pub fn put(args: &PutArgs) -> anyhow::Result<Outcome> {
    let value = match (&args.file, args.value.as_deref()) {
        (Some(path), _) => {
            std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?
        }
        (None, Some(v)) if v != "-" => v.as_bytes().to_vec(),
        (None, _) => {
            let mut buf = Vec::new();
            std::io::stdin()
                .read_to_end(&mut buf)
                .context("cannot read the value from stdin")?;
            buf
        }
    };
    let reply = Client::new(&args.opts.agent)
        .put_key(&args.key, &value)?
        .ok()?;
    if args.opts.json {
        print_json(&reply.json()?)?;
    }
    Ok(Outcome::Ok)
}

/// `chorus get`.
pub fn get(args: &KeyArgs) -> anyhow::Result<Outcome> {
    let reply = Client::new(&args.opts.agent).get_key(&args.key)?;
    if reply.status == 404 {
        eprintln!("{}: not found", args.key);
        return Ok(Outcome::NotFound);
    }
    let reply = reply.ok()?;
    if args.opts.json {
        let mut obj = serde_json::Map::new();
        obj.insert("key".into(), Value::from(args.key.clone()));
        match std::str::from_utf8(&reply.body) {
            Ok(text) => obj.insert("value".into(), Value::from(text)),
            Err(_) => obj.insert(
                "value_base64".into(),
                Value::from(base64::Engine::encode(
                    &base64::engine::general_purpose::STANDARD,
                    &reply.body,
                )),
            ),
        };
        if let Some(rev) = reply
            .revision
            .as_deref()
            .and_then(|r| r.parse::<u64>().ok())
        {
            obj.insert("revision".into(), Value::from(rev));
        }
        if let Some(version) = &reply.version {
            obj.insert("version".into(), Value::from(version.clone()));
        }
        print_json(&Value::Object(obj))?;
    } else {
        let mut out = std::io::stdout().lock();
        out.write_all(&reply.body)?;
        if !reply.body.ends_with(b"\n") && std::io::IsTerminal::is_terminal(&out) {
            writeln!(out)?;
        }
    }
    Ok(Outcome::Ok)
}

/// `chorus del`.
pub fn del(args: &KeyArgs) -> anyhow::Result<Outcome> {
    let reply = Client::new(&args.opts.agent).delete_key(&args.key)?;
    if reply.status == 404 {
        eprintln!("{}: not found", args.key);
        return Ok(Outcome::NotFound);
    }
    let reply = reply.ok()?;
    if args.opts.json {
        print_json(&reply.json()?)?;
    }
    Ok(Outcome::Ok)
}

/// `chorus ls`.
pub fn ls(args: &LsArgs) -> anyhow::Result<Outcome> {
    let list = Client::new(&args.opts.agent).list(&args.prefix)?;
    if args.opts.json {
        print_json(&list)?;
        return Ok(Outcome::Ok);
    }
    let entries = list
        .get("entries")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("agent answer has no entries"))?;
    let mut out = std::io::stdout().lock();
    for entry in entries {
        let key = entry.get("key").and_then(Value::as_str).unwrap_or("?");
        writeln!(out, "{key}\t{}", entry_text(entry))?;
    }
    Ok(Outcome::Ok)
}

/// `chorus watch`: prints each change as it arrives.
pub fn watch(args: &WatchArgs) -> anyhow::Result<Outcome> {
    let client = Client::new(&args.opts.agent);
    let mut url = format!(
        "{}/v1/watch?prefix={}",
        client.base,
        encode(&args.prefix, false)
    );
    if let Some(from) = args.from {
        url.push_str(&format!("&from={from}"));
    }
    let resp = client
        .auth(client.streaming.get(&url))
        .header("accept", "text/event-stream")
        .call()
        .with_context(|| format!("cannot reach the agent at {}", client.base))?;
    if resp.status().as_u16() != 200 {
        let status = resp.status().as_u16();
        let reply = client.finish(Ok(resp))?;
        bail!("agent answered {status}: {}", reply.error_message());
    }
    let reader = BufReader::new(resp.into_body().into_reader());
    let mut seen = 0u64;
    let mut out = std::io::stdout();
    for line in reader.lines() {
        let line = line.context("watch stream broke")?;
        let Some(data) = line.strip_prefix("data:") else {
            continue;
        };
        let change: Value = serde_json::from_str(data.trim()).context("bad event from agent")?;
        if args.opts.json {
            writeln!(out, "{change}")?;
        } else {
            let rev = change.get("revision").and_then(Value::as_u64).unwrap_or(0);
            let key = change.get("key").and_then(Value::as_str).unwrap_or("?");
            if change.get("deleted").and_then(Value::as_bool) == Some(true) {
                writeln!(out, "{rev}\tDEL\t{key}")?;
            } else {
                writeln!(out, "{rev}\tPUT\t{key}\t{}", entry_text(&change))?;
            }
        }
        out.flush()?;
        seen += 1;
        if args.count.is_some_and(|count| seen >= count) {
            break;
        }
    }
    Ok(Outcome::Ok)
}

/// `chorus members`.
pub fn members(opts: &ClientOpts) -> anyhow::Result<Outcome> {
    let value = Client::new(&opts.agent).get("/v1/members")?.ok()?.json()?;
    if opts.json {
        print_json(&value)?;
        return Ok(Outcome::Ok);
    }
    let members = value
        .get("members")
        .and_then(Value::as_array)
        .ok_or_else(|| anyhow!("agent answer has no members"))?;
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<20} {:<24} {:<20} {:<28} STATE",
        "NODE", "NAME", "INCARNATION", "ADDRESS"
    )?;
    for m in members {
        let field = |name: &str| m.get(name).map(plain).unwrap_or_default();
        // A member without a name (yet) shows `-`.
        let name = m
            .get("name")
            .and_then(Value::as_str)
            .unwrap_or("-")
            .to_owned();
        writeln!(
            out,
            "{:<20} {:<24} {:<20} {:<28} {}",
            field("node_id"),
            name,
            field("incarnation"),
            field("addr"),
            field("state")
        )?;
    }
    Ok(Outcome::Ok)
}

/// `chorus stats`.
pub fn stats(opts: &ClientOpts) -> anyhow::Result<Outcome> {
    let value = Client::new(&opts.agent).get("/v1/stats")?.ok()?.json()?;
    if opts.json {
        print_json(&value)?;
        return Ok(Outcome::Ok);
    }
    let mut out = std::io::stdout().lock();
    if let Some(obj) = value.as_object() {
        for (name, v) in obj {
            if let Some(counters) = v.as_object().filter(|_| name == "counters") {
                for (cname, cv) in counters {
                    writeln!(out, "{cname:<40} {}", plain(cv))?;
                }
            } else {
                writeln!(out, "{name:<40} {}", plain(v))?;
            }
        }
    }
    Ok(Outcome::Ok)
}

/// A JSON scalar without quotes.
fn plain(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn encode_keeps_slashes_only_in_paths() {
        assert_eq!(encode("app/db url", true), "app/db%20url");
        assert_eq!(encode("a/b&c=d", false), "a%2Fb%26c%3Dd");
        assert_eq!(encode("é", true), "%C3%A9");
    }

    #[test]
    fn entry_text_handles_binary() {
        let v: Value = serde_json::json!({"key": "k", "value_base64": "AAEC"});
        assert_eq!(entry_text(&v), "<binary, 3 bytes>");
        let v: Value = serde_json::json!({"key": "k", "value": "hi"});
        assert_eq!(entry_text(&v), "hi");
    }
}
