//! `chorus agent`: a long-running node with the local HTTP API and the optional directory mirror.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use chorus::{Mode, Node, Preset};
use tokio::sync::watch;

use crate::cli::AgentArgs;
use crate::config::{AgentConfig, ClusterKeys, PresetName, Transport};
use crate::server::{AllowedHosts, HEADER_TIMEOUT, ServeLimits};
use crate::syncdir::{Hook, Labelled, SyncDir, SyncSet, SyncStats};

/// How long the mirror waits for the node to be in sync (with a peer, or alone after its solo
/// delay) before writing the initial state.
const SYNC_WAIT: Duration = Duration::from_secs(10);
/// How long shutdown waits for HTTP connections and the mirror to finish.
const DRAIN: Duration = Duration::from_secs(5);

/// Runs the agent until SIGINT or SIGTERM.
///
/// # Errors
/// Bad configuration, a node that cannot start (the message says how to fix it), or an HTTP
/// address that cannot be bound.
pub fn run(args: &AgentArgs) -> anyhow::Result<()> {
    let cfg = AgentConfig::load(args)?;
    let keyring = match &cfg.keys {
        ClusterKeys::Files(files) => Some(crate::keys::load_keyring(files)?),
        ClusterKeys::LoopbackOnly => None,
        ClusterKeys::Insecure => {
            tracing::warn!(
                transport = ?cfg.transport,
                "--insecure: running without a cluster key off the loopback; any host on \
                 this network can read and write the store"
            );
            None
        }
    };
    crate::keys::check_http_exposure(cfg.http, args.http_token.as_deref())?;
    if let Some(addr) = cfg.consul_api {
        crate::consul::check_exposure(addr, args.http_token.as_deref())?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the tokio runtime")?;
    // The HTTP API gets a runtime (and an OS thread) of its own: a flood of datagrams keeps
    // the node's driver busy, and reads, which go straight to the store, must not wait
    // behind it for a worker of the node's runtime (measured: GET p99 0.8 s under a flood
    // of replication requests with one shared runtime; docs/security.md).
    let http = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .thread_name("chorus-http")
        .enable_all()
        .build()
        .context("cannot start the HTTP runtime")?;
    let result = runtime.block_on(serve(
        cfg,
        keyring,
        args.http_token.clone(),
        http.handle().clone(),
    ));
    http.shutdown_timeout(DRAIN);
    result
}

/// The node builder for a configuration.
pub fn builder(cfg: &AgentConfig) -> chorus::NodeBuilder {
    let mut b = Node::builder().cluster(&cfg.cluster);
    match &cfg.transport {
        Transport::Multicast { group, iface, ttl } => {
            b = b.group(*group);
            if !iface.is_empty() {
                b = b.interface(iface);
            }
            if let Some(ttl) = ttl {
                b = b.ttl(*ttl);
            }
        }
        Transport::Broadcast { addr } => b = b.mode(Mode::Broadcast { addr: *addr }),
        Transport::Peers { bind, peers } => {
            b = b.mode(Mode::Peers {
                bind: *bind,
                peers: peers.clone(),
            });
        }
    }
    if let Some(id) = cfg.node_id {
        b = b.node_id(chorus::NodeId(id));
    }
    if let Some(name) = &cfg.node_name {
        b = b.node_name(name);
    }
    if let Some(max) = cfg.max_members {
        b = b.max_members(max);
    }
    if let Some(bytes) = cfg.receive_budget_bytes {
        b = b.receive_budget_bytes(bytes);
    }
    match cfg.preset {
        Some(PresetName::Lan) => b = b.preset(Preset::Lan),
        Some(PresetName::Lossy) => b = b.preset(Preset::Lossy),
        None => {}
    }
    if let Some(loss) = cfg.loss {
        b = b.inject_receive_loss(loss.probability, loss.seed);
    }
    if let Some(dir) = &cfg.data_dir {
        b = b.data_dir(dir).fsync(cfg.fsync);
    }
    b
}

async fn serve(
    cfg: AgentConfig,
    keyring: Option<chorus::Keyring>,
    http_token: Option<String>,
    http: tokio::runtime::Handle,
) -> anyhow::Result<()> {
    let mut node_builder = builder(&cfg);
    if let Some(keyring) = keyring {
        node_builder = node_builder.keyring(keyring);
    }
    let node = node_builder
        .start()
        .await
        .context("cannot start the node")?;
    // Bound on the HTTP runtime, so that its readiness is driven by that runtime's reactor.
    let addr = cfg.http;
    let bound = http
        .spawn(async move { tokio::net::TcpListener::bind(addr).await })
        .await
        .unwrap_or_else(|e| Err(std::io::Error::other(e)));
    let listener = match bound {
        Ok(l) => l,
        Err(e) => {
            let _ = node.shutdown().await;
            return Err(e).with_context(|| {
                format!(
                    "cannot listen on {} for the HTTP API (another agent running? choose --http ADDR:PORT)",
                    cfg.http
                )
            });
        }
    };
    if !cfg.http.ip().is_loopback() {
        tracing::warn!(http = %cfg.http, "HTTP API is reachable from the network (bearer token required)");
    }
    tracing::info!(
        node_id = node.node_id().0,
        node_name = node.node_name().unwrap_or(""),
        cluster = cfg.cluster,
        transport = ?cfg.transport,
        http = %cfg.http,
        loss = ?cfg.loss.map(|l| l.probability),
        "agent started"
    );

    let mut sync_set = SyncSet::default();
    let mut mirrors: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    for sync in cfg.sync.clone() {
        let stats = Arc::new(SyncStats::default());
        let dir = match SyncDir::open(&sync.dir, sync.prefix.clone(), Arc::clone(&stats)) {
            Ok(dir) => dir,
            Err(e) => {
                for m in &mirrors {
                    m.abort();
                }
                let _ = node.shutdown().await;
                return Err(e)
                    .with_context(|| format!("cannot start --sync-dir {}", sync.dir.display()));
            }
        };
        sync_set.dirs.push(Labelled {
            dir: sync.dir.clone(),
            prefix: sync.prefix.clone(),
            stats,
        });
        let hook = Hook {
            command: sync.on_change,
            debounce: sync.debounce,
            timeout: sync.hook_timeout,
        };
        mirrors.push(tokio::spawn(crate::syncdir::mirror(
            node.clone(),
            dir,
            hook,
            SYNC_WAIT,
        )));
    }

    let (template_stats, template_tasks) = if cfg.templates.is_empty() {
        (None, Vec::new())
    } else {
        match crate::template::start(&node, &cfg.templates, SYNC_WAIT) {
            Ok((stats, tasks)) => (Some(stats), tasks),
            Err(e) => {
                let _ = node.shutdown().await;
                return Err(e).context("cannot start --template");
            }
        }
    };

    let (stop_tx, mut stop_rx) = watch::channel(false);
    let mut app = crate::http::router(node.clone());
    if !sync_set.dirs.is_empty() {
        app = app.layer(axum::Extension(Arc::new(sync_set)));
    }
    if let Some(stats) = template_stats {
        app = app.layer(axum::Extension(stats));
    }
    // The API behind the token (or, without one, the Host check), the dashboard at /ui.
    let app = crate::ui::guard(
        app,
        http_token.as_deref(),
        AllowedHosts::new(cfg.http, &cfg.http_allow_hosts),
    );
    let limits = ServeLimits {
        max_connections: cfg.http_max_connections,
        header_timeout: HEADER_TIMEOUT,
    };
    let consul_stop = stop_rx.clone();
    let mut server = http.spawn(async move {
        crate::server::serve(listener, app, limits, async move {
            let _ = stop_rx.wait_for(|stop| *stop).await;
        })
        .await
    });

    let mut consul = match cfg.consul_api {
        None => None,
        Some(addr) => {
            let opts = crate::consul::Options {
                addr,
                token: http_token.clone(),
                allow_hosts: cfg.http_allow_hosts.clone(),
                max_connections: cfg.http_max_connections,
            };
            match crate::consul::start(node.clone(), opts, &http, consul_stop).await {
                Ok(server) => Some(server),
                Err(e) => {
                    let _ = node.shutdown().await;
                    let _ = stop_tx.send(true);
                    return Err(e);
                }
            }
        }
    };
    let consul_ended = async {
        match consul.as_mut() {
            Some(server) => server.await,
            None => std::future::pending().await,
        }
    };

    tokio::select! {
        ended = consul_ended => {
            let _ = node.shutdown().await;
            return match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("Consul API server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("Consul API server failed"),
                Err(e) => Err(e).context("Consul API server task failed"),
            };
        }
        signal = shutdown_signal() => {
            let name = signal?;
            tracing::info!(signal = name, "shutting down: flushing and saying goodbye");
        }
        ended = &mut server => {
            let _ = node.shutdown().await;
            return match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("HTTP server stopped unexpectedly")),
                Ok(Err(e)) => Err(e).context("HTTP server failed"),
                Err(e) => Err(e).context("HTTP server task failed"),
            };
        }
    }
    // The node first: queued writes go out and a goodbye tells the peers; watch streams then
    // end, which lets the HTTP server's graceful shutdown finish.
    if let Err(e) = node.shutdown().await {
        tracing::warn!(error = %e, "node shutdown");
    }
    let _ = stop_tx.send(true);
    match tokio::time::timeout(DRAIN, server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => tracing::warn!(error = %e, "HTTP server"),
        Ok(Err(e)) => tracing::warn!(error = %e, "HTTP server task"),
        Err(_) => tracing::warn!("HTTP connections still open after {DRAIN:?}; closing them"),
    }
    if let Some(consul) = consul
        && tokio::time::timeout(DRAIN, consul).await.is_err()
    {
        tracing::warn!("Consul API connections still open after {DRAIN:?}; closing them");
    }
    // The mirrors end with the node (their watches close); each may run a last hook. They
    // share one drain period.
    let mirrors_done = futures_util::future::join_all(mirrors);
    if tokio::time::timeout(DRAIN, mirrors_done).await.is_err() {
        tracing::warn!("sync-dir hook still running after {DRAIN:?}; leaving it");
    }
    for task in template_tasks {
        if tokio::time::timeout(DRAIN, task).await.is_err() {
            tracing::warn!("a template command still running after {DRAIN:?}; leaving it");
        }
    }
    tracing::info!("agent stopped");
    Ok(())
}

/// Waits for SIGINT or SIGTERM; returns the signal's name.
async fn shutdown_signal() -> anyhow::Result<&'static str> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).context("cannot watch SIGTERM")?;
    let mut int = signal(SignalKind::interrupt()).context("cannot watch SIGINT")?;
    Ok(tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    })
}
