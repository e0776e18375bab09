//! The `chorus` binary: a node agent with a local HTTP API, client commands that talk to it,
//! a self-contained demo, a benchmark and a multicast doctor.
//!
//! It does not implement replication itself: the agent runs a `chorus::Node` and exposes it;
//! everything else is a client of that HTTP API or of the loopback network.

mod agent;
mod backup;
mod bench;
mod cli;
mod client;
mod config;
mod consul;
mod demo;
mod doctor;
mod hostile;
mod http;
mod http_batch;
mod http_members;
mod keys;
mod peer;
mod server;
mod syncdir;
mod template;
mod ui;

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: buffers allocated on one runtime thread and freed on
/// another made malloc/free the largest user-space cost in the throughput profile.
#[cfg(not(test))]
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;

use crate::cli::{Cli, Command};
use crate::client::Outcome;

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(matches!(cli.command, Command::Agent(_)));
    let result = match cli.command {
        Command::Agent(args) => agent::run(&args).map(|()| Outcome::Ok),
        Command::Put(args) => client::put(&args),
        Command::Get(args) => client::get(&args),
        Command::Del(args) => client::del(&args),
        Command::Ls(args) => client::ls(&args),
        Command::Watch(args) => client::watch(&args),
        Command::Members(opts) => client::members(&opts),
        Command::Stats(opts) => client::stats(&opts),
        Command::Demo(args) => demo::run(&args).map(|()| Outcome::Ok),
        Command::Bench(args) => bench::run(&args).map(|()| Outcome::Ok),
        Command::Hostile(args) => hostile::run(&args).map(|()| Outcome::Ok),
        Command::Template(args) => template::once(&args),
        Command::Snapshot(args) => backup::snapshot(&args),
        Command::Export(args) => backup::export_cmd(&args),
        Command::Import(args) => backup::import_cmd(&args),
        Command::Keygen(args) => keys::keygen(args.path.as_deref(), args.id).map(|()| Outcome::Ok),
        Command::Doctor(args) => {
            doctor::run(&args).map(|ok| if ok { Outcome::Ok } else { Outcome::NotFound })
        }
    };
    match result {
        Ok(Outcome::Ok) => ExitCode::SUCCESS,
        Ok(Outcome::NotFound) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}

/// Logs to stderr, filtered by `RUST_LOG` (default `info` for the agent, `warn` otherwise).
fn init_tracing(agent: bool) {
    let default = if agent { "info" } else { "warn" };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(
            std::io::IsTerminal::is_terminal(&std::io::stderr())
                && std::env::var_os("NO_COLOR").is_none(),
        )
        .init();
}

/// The unit tests count what each thread allocates, so a test can bound what one call costs
/// (`http` tests: a scrape must not copy the store).
#[cfg(test)]
#[global_allocator]
static GLOBAL: chorus_testkit::alloc::Counting = chorus_testkit::alloc::Counting;
