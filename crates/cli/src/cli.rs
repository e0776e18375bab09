//! Command-line definitions (clap derive).

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Default address of the agent's HTTP API that client commands talk to.
pub const DEFAULT_AGENT_URL: &str = "http://127.0.0.1:7480";

/// Chorus: a key-value store kept identical on every node by reliable multicast.
#[derive(Debug, Parser)]
#[command(name = "chorus", version, about, long_about = None)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands of the `chorus` binary.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a node with a local HTTP API (long-running).
    Agent(Box<AgentArgs>),
    /// Write a key (VALUE, `-` or nothing for stdin, or --file).
    Put(PutArgs),
    /// Read a key; exit code 1 when absent.
    Get(KeyArgs),
    /// Delete a key; exit code 1 when absent.
    Del(KeyArgs),
    /// List the keys under a prefix.
    Ls(LsArgs),
    /// Follow the changes under a prefix (server-sent events) until interrupted.
    Watch(WatchArgs),
    /// Show the members of the cluster as the agent sees them.
    Members(ClientOpts),
    /// Show the agent's counters.
    Stats(ClientOpts),
    /// Start a small cluster on this machine (loopback multicast, injected loss) and show it converge.
    Demo(DemoArgs),
    /// Measure throughput and latency against raw UDP multicast on the loopback.
    Bench(BenchArgs),
    /// Check that multicast works on this host and explain what to fix when it does not.
    Doctor(DoctorArgs),
    /// Write a new cluster key file (mode 0600) for `chorus agent --key-file`.
    Keygen(KeygenArgs),
    /// Play a hostile peer against agents on the loopback (testing; see docs/security.md).
    Hostile(crate::hostile::HostileArgs),
    /// Render a template once against a running agent (see docs/templates.md).
    Template(TemplateArgs),
    /// Save the agent's store to a file, or restore one into the cluster (docs/operations.md).
    Snapshot(SnapshotArgs),
    /// Print the live keys under a prefix in `consul kv export` format.
    Export(ExportArgs),
    /// Write the keys of a `consul kv export` file.
    Import(ImportArgs),
}

/// `chorus snapshot`.
#[derive(Debug, Args)]
pub struct SnapshotArgs {
    /// Save or restore.
    #[command(subcommand)]
    pub command: SnapshotCommand,
}

/// `chorus snapshot save|restore`.
#[derive(Debug, Subcommand)]
pub enum SnapshotCommand {
    /// Write every entry and tombstone of the agent's store, consistent and checksummed, to FILE
    /// (mode 0600, replaced atomically).
    Save {
        /// The snapshot file.
        file: PathBuf,
        /// Client options.
        #[command(flatten)]
        opts: ClientOpts,
    },
    /// Merge FILE into the cluster by version: entries older than what the cluster holds are
    /// skipped.
    Restore {
        /// The snapshot file (`-` for stdin).
        file: PathBuf,
        /// Re-stamp every entry with a new version, so the snapshot wins over newer writes.
        #[arg(long)]
        force_newer: bool,
        /// Client options.
        #[command(flatten)]
        opts: ClientOpts,
    },
}

/// `chorus export`.
#[derive(Debug, Args)]
pub struct ExportArgs {
    /// Only keys starting with this prefix (empty: all keys).
    #[arg(default_value = "")]
    pub prefix: String,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus import`.
#[derive(Debug, Args)]
pub struct ImportArgs {
    /// A `consul kv export` file (`-` for stdin).
    pub file: PathBuf,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus template`.
#[derive(Debug, Args)]
pub struct TemplateArgs {
    /// `SRC:DEST[:CMD]`: the template file, the file written (`-` for stdout) and a command
    /// run (`sh -c`) when DEST changed.
    pub spec: String,
    /// Render once and exit (the agent's `--template` keeps a file rendered).
    #[arg(long)]
    pub once: bool,
    /// How long CMD may run before its process group is killed, in milliseconds (default 60000).
    #[arg(long)]
    pub command_timeout_ms: Option<u64>,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus keygen`.
#[derive(Debug, Args)]
pub struct KeygenArgs {
    /// Where to write the key (created, never overwritten); stdout when absent.
    pub path: Option<PathBuf>,
    /// Key id 1..65535 (default: random). Keys used together in a rotation need distinct ids.
    #[arg(long)]
    pub id: Option<u16>,
}

/// Options shared by every client command.
#[derive(Debug, Clone, Args)]
pub struct ClientOpts {
    /// URL of the agent's HTTP API.
    #[arg(long, env = "CHORUS_AGENT", default_value = DEFAULT_AGENT_URL)]
    pub agent: String,
    /// Print JSON instead of human-readable text.
    #[arg(long)]
    pub json: bool,
}

/// `chorus put`.
#[derive(Debug, Args)]
pub struct PutArgs {
    /// The key.
    pub key: String,
    /// The value; `-` or absent reads it from stdin.
    pub value: Option<String>,
    /// Read the value from this file.
    #[arg(long, conflicts_with = "value")]
    pub file: Option<PathBuf>,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus get` / `chorus del`.
#[derive(Debug, Args)]
pub struct KeyArgs {
    /// The key.
    pub key: String,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus ls`.
#[derive(Debug, Args)]
pub struct LsArgs {
    /// Only keys starting with this prefix (empty: all keys).
    #[arg(default_value = "")]
    pub prefix: String,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus watch`.
#[derive(Debug, Args)]
pub struct WatchArgs {
    /// Only changes to keys starting with this prefix.
    #[arg(default_value = "")]
    pub prefix: String,
    /// Resume after this local revision of the agent (replays what came after it).
    #[arg(long)]
    pub from: Option<u64>,
    /// Stop after this many changes (default: run until interrupted).
    #[arg(long)]
    pub count: Option<u64>,
    /// Client options.
    #[command(flatten)]
    pub opts: ClientOpts,
}

/// `chorus agent`: flags override the values of the `--config` file.
#[derive(Debug, Default, Clone, Args)]
pub struct AgentArgs {
    /// TOML configuration file (flags given on the command line win over it).
    #[arg(long, short = 'c')]
    pub config: Option<PathBuf>,
    /// Cluster name; nodes of other clusters on the same group are ignored.
    #[arg(long)]
    pub cluster: Option<String>,
    /// Multicast group and port, IPv4 or IPv6 (default 239.255.77.1:7400).
    #[arg(long)]
    pub group: Option<SocketAddr>,
    /// Interface to use, by name (`eth0`) or address (default: the loopback).
    #[arg(long)]
    pub iface: Option<String>,
    /// Node id (default: random).
    #[arg(long)]
    pub node_id: Option<u64>,
    /// Node name shown by `members`, in /v1/members, the logs and metrics labels (default:
    /// the host name); 1 to 64 bytes of printable UTF-8, need not be unique.
    #[arg(long)]
    pub node_name: Option<String>,
    /// Address of the HTTP API (default 127.0.0.1:7480).
    #[arg(long)]
    pub http: Option<SocketAddr>,
    /// Also serve Consul's KV HTTP API here (off by default): for py-consul, consul-template,
    /// envconsul and `consul kv` (docs/consul.md). Loopback only unless --http-token is set,
    /// which Consul clients then send as X-Consul-Token.
    #[arg(long, value_name = "ADDR:PORT")]
    pub consul_api: Option<SocketAddr>,
    /// Multicast TTL (default 0 on the loopback, 1 otherwise).
    #[arg(long)]
    pub ttl: Option<u32>,
    /// Use UDP broadcast to this address instead of multicast.
    #[arg(long, conflicts_with_all = ["group", "peers"])]
    pub broadcast: Option<SocketAddr>,
    /// Use unicast to this list of peers instead of multicast (comma separated).
    #[arg(long, value_delimiter = ',', conflicts_with = "group")]
    pub peers: Option<Vec<SocketAddr>>,
    /// Local address to bind in --peers mode.
    #[arg(long)]
    pub bind: Option<SocketAddr>,
    /// Tuning preset: `lan` or `lossy`.
    #[arg(long)]
    pub preset: Option<String>,
    /// Drop this share of received datagrams (0.0..1.0), for demos and tests.
    #[arg(long)]
    pub loss: Option<f64>,
    /// Seed of the injected loss (default: random).
    #[arg(long)]
    pub loss_seed: Option<u64>,
    /// Cluster key file (from `chorus keygen`, mode 0600). Repeat it (or list several, comma
    /// separated) during a key rotation: the first file's first key sends, every key is
    /// accepted. Without one, cluster traffic is neither authenticated nor encrypted.
    #[arg(long = "key-file", env = "CHORUS_KEY_FILE", value_delimiter = ',')]
    pub key_file: Vec<PathBuf>,
    /// Run without a cluster key on an interface other than the loopback, where the agent
    /// otherwise refuses to start: any host on that network can then read and write the store.
    #[arg(long, env = "CHORUS_INSECURE")]
    pub insecure: bool,
    /// Bearer token the HTTP API requires (`Authorization: Bearer TOKEN`); mandatory when
    /// --http is not a loopback address.
    #[arg(long, env = "CHORUS_HTTP_TOKEN", hide_env_values = true)]
    pub http_token: Option<String>,
    /// Another name the HTTP API answers to without a token (besides `localhost`, 127.0.0.1,
    /// [::1] and the --http address); repeat it or list several, comma separated. Requests
    /// naming any other host get 403 (a defence against DNS rebinding from a browser).
    #[arg(long = "http-allow-host", value_delimiter = ',')]
    pub http_allow_host: Vec<String>,
    /// Most HTTP connections open at once (default 256); further ones wait to be accepted.
    #[arg(long)]
    pub http_max_connections: Option<usize>,
    /// Most cluster members this node keeps (default 256); new senders beyond it are refused.
    #[arg(long)]
    pub max_members: Option<usize>,
    /// Receive budget in MiB over all senders: out-of-order data, reassemblies and per-sender
    /// state (default 64).
    #[arg(long)]
    pub receive_budget_mib: Option<usize>,
    /// Mirror the keys under PREFIX as files in DIR; repeat it for several directories. The
    /// first `:` ends DIR. With a single directory, `--sync-dir DIR --prefix PREFIX` works too
    /// (DIR is then taken whole). Prefixes of two directories must not overlap.
    #[arg(long = "sync-dir", value_name = "DIR[:PREFIX]")]
    pub sync_dir: Vec<String>,
    /// Key prefix mirrored by a single --sync-dir DIR.
    #[arg(long)]
    pub prefix: Option<String>,
    /// Shell command run (`sh -c`) once sync-dir changes settle (for every --sync-dir given).
    #[arg(long)]
    pub on_change: Option<String>,
    /// How long sync-dir changes must be quiet before --on-change runs, in milliseconds (default 300).
    #[arg(long)]
    pub debounce_ms: Option<u64>,
    /// How long --on-change may run before it is killed, in milliseconds (default 60000).
    #[arg(long)]
    pub on_change_timeout_ms: Option<u64>,
    /// Keep the store in this directory (write-ahead log + snapshots) and start from it;
    /// without it the store lives in memory.
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
    /// When writes reach the disk: `always` (default: fsync before a write is acknowledged),
    /// `interval:MS` or `never`. Needs --data-dir.
    #[arg(long)]
    pub fsync: Option<String>,
    /// Render the template file SRC into DEST, again whenever a key it read changes, and run
    /// CMD (`sh -c`) after DEST changed: `SRC:DEST[:CMD]`, repeatable (docs/templates.md).
    #[arg(long = "template")]
    pub template: Vec<String>,
    /// Debounce of the --template renderings, `MIN[:MAX]` in milliseconds: quiet for MIN, at
    /// most MAX after the first change (default 300:3000).
    #[arg(long)]
    pub template_wait_ms: Option<String>,
    /// How long a --template command may run before its process group is killed, in
    /// milliseconds (default 60000).
    #[arg(long)]
    pub template_command_timeout_ms: Option<u64>,
}

/// `chorus demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    /// Number of nodes started at first (a late joiner is added later).
    #[arg(long, default_value_t = 5)]
    pub nodes: usize,
    /// Number of keys written.
    #[arg(long, default_value_t = 200)]
    pub keys: usize,
    /// Injected receive loss on every node (0.0..1.0).
    #[arg(long, default_value_t = 0.10)]
    pub loss: f64,
    /// Seed for the group, ports and loss (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Give up when the stores do not agree after this many seconds.
    #[arg(long, default_value_t = 60)]
    pub timeout: u64,
    /// First HTTP port of the nodes (default: derived from the seed).
    #[arg(long)]
    pub base_port: Option<u16>,
    /// Keep the cluster running once it converged and print each node's dashboard URL
    /// (`http://127.0.0.1:PORT/ui`); stop it with Ctrl-C.
    #[arg(long)]
    pub ui: bool,
}

/// `chorus bench`.
#[derive(Debug, Args)]
pub struct BenchArgs {
    /// Number of receivers (default 3). With `--role send --transport chorus`: how many
    /// receiver nodes to wait for before sending, and for whose results (default 1).
    #[arg(long)]
    pub receivers: Option<usize>,
    /// Messages sent per payload size.
    #[arg(long, default_value_t = 5000)]
    pub messages: usize,
    /// Payload sizes in bytes (comma separated); with --role exactly one.
    #[arg(long, value_delimiter = ',', default_value = "64,1400,8192")]
    pub sizes: Vec<usize>,
    /// Injected receive loss on the Chorus receivers (0.0..1.0).
    #[arg(long, default_value_t = 0.0)]
    pub loss: f64,
    /// Upper bound on the time spent per measurement, in seconds.
    #[arg(long, default_value_t = 20)]
    pub max_secs: u64,
    /// Seed for the group and ports (default: random).
    #[arg(long)]
    pub seed: Option<u64>,
    /// Only measure raw UDP multicast (skip Chorus).
    #[arg(long)]
    pub raw_only: bool,
    /// Also run a peer system's own benchmark side by side, where it is installed: `ddsperf`
    /// (Cyclone DDS, Debian package cyclonedds-tools), reliable, one publisher and
    /// --receivers subscribers, in a private network namespace; says so when it is missing.
    #[arg(long, value_parser = ["ddsperf"])]
    pub peer: Option<String>,
    /// Seconds each peer measurement runs.
    #[arg(long, default_value_t = 5)]
    pub peer_secs: u64,
    /// Pace both senders at this many messages per second (latency at a moderate rate)
    /// instead of sending as fast as possible.
    #[arg(long)]
    pub rate: Option<u64>,
    /// Instead of the throughput table: write this many keys (of the first --sizes bytes) on
    /// one node, start a second node, and time until it holds them all.
    #[arg(long)]
    pub late_join: Option<usize>,
    /// Run only one side, for a measurement between two hosts or network namespaces on one
    /// machine (both sides read the same clock): `send` or `receive`. Needs --transport,
    /// --group and --interface; prints one machine-readable `RESULT key=value ...` line.
    #[arg(long, value_parser = ["send", "receive"])]
    pub role: Option<String>,
    /// With --role: `raw` (a plain UDP socket) or `chorus` (a node).
    #[arg(long, value_parser = ["raw", "chorus"], requires = "role")]
    pub transport: Option<String>,
    /// With --role: the IPv4 multicast group and port, the same on both sides.
    #[arg(long, requires = "role")]
    pub group: Option<SocketAddrV4>,
    /// With --role: the IPv4 address of the local interface to multicast on.
    #[arg(long, requires = "role")]
    pub interface: Option<Ipv4Addr>,
    /// With --role: multicast TTL (default 1).
    #[arg(long, requires = "role")]
    pub ttl: Option<u32>,
    /// With --role and chorus: the cluster name, the same on both sides (default `bench`).
    #[arg(long, requires = "role")]
    pub cluster: Option<String>,
    /// With --role receive: stop after this many milliseconds without a message once the
    /// first one arrived (default 500 for raw, 3000 for chorus).
    #[arg(long, requires = "role")]
    pub idle_ms: Option<u64>,
}

/// `chorus doctor`.
#[derive(Debug, Args)]
pub struct DoctorArgs {
    /// Interface to check, by name or address (default: the loopback).
    #[arg(long)]
    pub iface: Option<String>,
    /// Multicast group to check (default 239.255.77.1:7400; the test uses a free port).
    #[arg(long)]
    pub group: Option<SocketAddr>,
    /// TTL the agent would use (checked for sense, the probe itself always uses TTL 0).
    #[arg(long)]
    pub ttl: Option<u32>,
    /// Print JSON instead of text.
    #[arg(long)]
    pub json: bool,
}
