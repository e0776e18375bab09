//! Backup and restore (`chorus snapshot save|restore`), and export and import in
//! `consul kv export`'s format (`chorus export|import`). docs/operations.md is the how-to.
//!
//! - A **snapshot** holds every entry *and tombstone* of the agent's store with its version,
//!   flags and owner, consistent at one revision ([`format`]: JSON lines, a versioned header,
//!   a CRC-32 trailer). A restore merges it by version, as if a peer had sent it: what the
//!   cluster holds that is newer wins, and the cluster converges on what the snapshot adds.
//!   `--force-newer` instead re-stamps every entry with a new version, so the snapshot wins.
//! - An **export** holds the live values and flags only, as Consul's, so data moves between
//!   Consul and Chorus both ways. An import writes the keys as ordinary writes, in batches
//!   within the node's limits.
//! - Every file is checked whole (format, checksum, limits, keys twice) before anything is
//!   applied, on the client and again by the agent: bad input is an error that changes nothing.
//!
//! Rooms: [`format`] (the snapshot file), [`consul`] (the export file), [`server`] (the
//! agent's endpoints); this module holds the client commands.

mod consul;
mod format;
mod server;

use std::io::{Read as _, Write as _};
use std::path::Path;

use anyhow::{Context, bail};
use serde_json::Value;

pub use self::server::{export, get_snapshot, import, put_snapshot};

use self::format::RecordLimits;
use crate::cli::{ExportArgs, ImportArgs, SnapshotArgs, SnapshotCommand};
use crate::client::{Client, Outcome, print_json};

/// Largest snapshot or import the agent accepts in one request, and the client reads.
pub const MAX_FILE: usize = 256 * 1024 * 1024;

/// Reads FILE, or stdin for `-`, at most [`MAX_FILE`] bytes.
fn read_input(path: &Path) -> anyhow::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    let limit = u64::try_from(MAX_FILE).unwrap_or(u64::MAX) + 1;
    if path.as_os_str() == "-" {
        std::io::stdin()
            .take(limit)
            .read_to_end(&mut bytes)
            .context("cannot read stdin")?;
    } else {
        std::fs::File::open(path)
            .and_then(|f| f.take(limit).read_to_end(&mut bytes))
            .with_context(|| format!("cannot read {}", path.display()))?;
    }
    if bytes.len() > MAX_FILE {
        bail!("{} is larger than {MAX_FILE} bytes", path.display());
    }
    Ok(bytes)
}

/// `chorus snapshot save|restore`.
///
/// # Errors
/// An agent that cannot be reached or refuses, a file that cannot be read or written, or a
/// snapshot that is not valid (nothing is written or restored then).
pub fn snapshot(args: &SnapshotArgs) -> anyhow::Result<Outcome> {
    match &args.command {
        SnapshotCommand::Save { file, opts } => {
            let client = Client::new(&opts.agent);
            let reply = client.get_large("/v1/snapshot")?.ok()?;
            // The agent's answer is checked before it replaces anything: a connection cut
            // short leaves no file.
            let (header, records) = format::decode(&reply.body, RecordLimits::default())
                .context("the agent sent a snapshot that does not check out")?;
            crate::template::write_atomic(file, &reply.body, 0o600)?;
            let tombstones = records.iter().filter(|r| r.value.is_none()).count();
            let summary = serde_json::json!({
                "file": file.display().to_string(),
                "entries": records.len(),
                "tombstones": tombstones,
                "revision": header.revision,
                "node_id": header.node_id,
                "bytes": reply.body.len(),
            });
            if opts.json {
                print_json(&summary)?;
            } else {
                println!(
                    "saved {} entries ({tombstones} tombstones) of node {} at revision {} to {}",
                    records.len(),
                    header.node_id,
                    header.revision,
                    file.display()
                );
            }
        }
        SnapshotCommand::Restore {
            file,
            force_newer,
            opts,
        } => {
            let bytes = read_input(file)?;
            format::decode(&bytes, RecordLimits::default()).with_context(|| {
                format!(
                    "{} is not a valid snapshot; nothing restored",
                    file.display()
                )
            })?;
            let path = if *force_newer {
                "/v1/snapshot?force-newer"
            } else {
                "/v1/snapshot"
            };
            let report = Client::new(&opts.agent)
                .put_large(path, &bytes)?
                .ok()?
                .json()?;
            if opts.json {
                print_json(&report)?;
            } else {
                let n = |name: &str| report.get(name).and_then(Value::as_u64).unwrap_or(0);
                println!(
                    "restored {} of {} entries ({} skipped: the cluster holds newer versions)",
                    n("applied"),
                    n("entries"),
                    n("skipped_older")
                );
            }
        }
    }
    Ok(Outcome::Ok)
}

/// `chorus export [PREFIX]`: the live keys under PREFIX to stdout, as `consul kv export`.
///
/// # Errors
/// An agent that cannot be reached or refuses.
pub fn export_cmd(args: &ExportArgs) -> anyhow::Result<Outcome> {
    let path = format!(
        "/v1/export?prefix={}",
        crate::client::encode(&args.prefix, false)
    );
    let reply = Client::new(&args.opts.agent).get_large(&path)?.ok()?;
    let mut out = std::io::stdout().lock();
    out.write_all(&reply.body)?;
    out.flush()?;
    Ok(Outcome::Ok)
}

/// `chorus import FILE`: writes the keys of a `consul kv export` file (`-` for stdin).
///
/// # Errors
/// A file that is not a valid export (nothing is written then), or an agent that cannot be
/// reached or refuses.
pub fn import_cmd(args: &ImportArgs) -> anyhow::Result<Outcome> {
    let bytes = read_input(&args.file)?;
    let pairs = consul::parse_export(&bytes, RecordLimits::default()).with_context(|| {
        format!(
            "{} is not a valid consul kv export; nothing imported",
            args.file.display()
        )
    })?;
    let report = Client::new(&args.opts.agent)
        .put_large("/v1/import", &bytes)?
        .ok()?
        .json()?;
    if args.opts.json {
        print_json(&report)?;
    } else {
        let batches = report.get("batches").and_then(Value::as_u64).unwrap_or(0);
        println!("imported {} keys in {batches} batches", pairs.len());
    }
    Ok(Outcome::Ok)
}
