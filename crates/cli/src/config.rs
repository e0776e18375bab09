//! Agent configuration: a TOML file merged with command-line flags (flags win).

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::cli::AgentArgs;

/// Default multicast group of the agent.
pub const DEFAULT_GROUP: SocketAddr =
    SocketAddr::new(IpAddr::V4(Ipv4Addr::new(239, 255, 77, 1)), 7400);
/// Default address of the HTTP API (loopback only).
pub const DEFAULT_HTTP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), 7480);
/// Default quiet time before the sync-dir hook runs.
pub const DEFAULT_DEBOUNCE: Duration = Duration::from_millis(300);
/// Default time the sync-dir hook may run before it is killed.
pub const DEFAULT_HOOK_TIMEOUT: Duration = Duration::from_secs(60);
/// Most HTTP connections `--http-max-connections` may allow (each holds a file descriptor).
pub const MAX_HTTP_CONNECTIONS: usize = 65_536;
/// Default number of HTTP connections served at once.
pub const DEFAULT_HTTP_MAX_CONNECTIONS: NonZeroUsize = NonZeroUsize::MIN.saturating_add(255);

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
    /// The file is not valid TOML or has unknown or mistyped fields.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// The TOML error.
        source: Box<toml::de::Error>,
    },
    /// The values do not make sense together.
    #[error("invalid configuration: {0}")]
    Invalid(String),
    /// The node would talk on a network without a cluster key, and `--insecure` was not given.
    #[error(
        "refusing to run without a cluster key on {network}, which is not the loopback: any \
         host there could read every value and write any key. Make a key with \
         `chorus keygen /etc/chorus/cluster.key`, copy it to every node (mode 0600) and start \
         with --key-file /etc/chorus/cluster.key (or CHORUS_KEY_FILE); or pass --insecure \
         (`insecure = true` in the config file, CHORUS_INSECURE=1) to run without one on a \
         network you trust"
    )]
    Unkeyed {
        /// Where the node would send and receive.
        network: String,
    },
}

/// The agent's TOML file: every field optional, same names as the flags.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    cluster: Option<String>,
    group: Option<SocketAddr>,
    iface: Option<String>,
    node_id: Option<u64>,
    node_name: Option<String>,
    http: Option<SocketAddr>,
    consul_api: Option<SocketAddr>,
    ttl: Option<u32>,
    broadcast: Option<SocketAddr>,
    peers: Option<Vec<SocketAddr>>,
    bind: Option<SocketAddr>,
    preset: Option<String>,
    loss: Option<f64>,
    loss_seed: Option<u64>,
    data_dir: Option<PathBuf>,
    fsync: Option<String>,
    key_file: Option<Vec<PathBuf>>,
    insecure: Option<bool>,
    http_allow_hosts: Option<Vec<String>>,
    http_max_connections: Option<usize>,
    max_members: Option<usize>,
    receive_budget_mib: Option<usize>,
    sync: Option<FileSyncs>,
    template: Option<Vec<FileTemplate>>,
}

/// A `[[template]]` table of the TOML file.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileTemplate {
    source: PathBuf,
    destination: PathBuf,
    command: Option<String>,
    wait_min_ms: Option<u64>,
    wait_max_ms: Option<u64>,
    command_timeout_ms: Option<u64>,
}

/// The `[sync]` table of the TOML file, or its `[[sync]]` tables.
#[derive(Debug, Default)]
struct FileSyncs(Vec<FileSync>);

impl<'de> Deserialize<'de> for FileSyncs {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct OneOrMany;
        impl<'de> serde::de::Visitor<'de> for OneOrMany {
            type Value = FileSyncs;

            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a [sync] table or [[sync]] tables")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                map: A,
            ) -> Result<FileSyncs, A::Error> {
                let one = FileSync::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(FileSyncs(vec![one]))
            }

            fn visit_seq<A: serde::de::SeqAccess<'de>>(
                self,
                seq: A,
            ) -> Result<FileSyncs, A::Error> {
                Vec::<FileSync>::deserialize(serde::de::value::SeqAccessDeserializer::new(seq))
                    .map(FileSyncs)
            }
        }
        d.deserialize_any(OneOrMany)
    }
}

/// One `[sync]` / `[[sync]]` table of the TOML file.
#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSync {
    dir: Option<PathBuf>,
    prefix: Option<String>,
    on_change: Option<String>,
    debounce_ms: Option<u64>,
    on_change_timeout_ms: Option<u64>,
}

/// How the agent reaches the other nodes.
#[derive(Debug, Clone, PartialEq)]
pub enum Transport {
    /// UDP multicast to a group.
    Multicast {
        /// Group and port.
        group: SocketAddr,
        /// Interface name or address; empty for the default (the loopback).
        iface: String,
        /// Multicast TTL; `None` lets the node choose (0 on the loopback, 1 otherwise).
        ttl: Option<u32>,
    },
    /// UDP broadcast.
    Broadcast {
        /// Broadcast address and port.
        addr: SocketAddr,
    },
    /// Unicast to a fixed list of peers.
    Peers {
        /// Local address.
        bind: SocketAddr,
        /// The other nodes.
        peers: Vec<SocketAddr>,
    },
}

/// Tuning preset of the node.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PresetName {
    /// A normal LAN.
    Lan,
    /// A lossy network.
    Lossy,
}

/// Injected receive loss.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Loss {
    /// Share of received datagrams dropped, in `[0, 1)`.
    pub probability: f64,
    /// Seed of the drop decisions.
    pub seed: u64,
}

/// The directory mirror of a key prefix.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncConfig {
    /// Directory written.
    pub dir: PathBuf,
    /// Key prefix mirrored (stripped from the file names).
    pub prefix: String,
    /// Command run through `sh -c` after changes settle.
    pub on_change: Option<String>,
    /// Quiet time before the command runs.
    pub debounce: Duration,
    /// How long the command may run before it is killed.
    pub hook_timeout: Duration,
}

/// Whether the node's traffic is sealed with a cluster key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClusterKeys {
    /// Sealed with the keys of these files (at least one; the first file's first key sends).
    Files(Vec<PathBuf>),
    /// No key, and every datagram stays on this host (the loopback).
    LoopbackOnly,
    /// No key off the loopback, because `--insecure` said so.
    Insecure,
}

/// The complete, validated agent configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct AgentConfig {
    /// Cluster name.
    pub cluster: String,
    /// How the node talks to the others.
    pub transport: Transport,
    /// Node id; `None` for a random one.
    pub node_id: Option<u64>,
    /// Node name (`--node-name`, checked); `None` for the host name.
    pub node_name: Option<String>,
    /// Address of the HTTP API.
    pub http: SocketAddr,
    /// Address of the Consul KV API (`--consul-api`); `None`: not served.
    pub consul_api: Option<SocketAddr>,
    /// Names the tokenless HTTP API also answers to (`--http-allow-host`), lower case.
    pub http_allow_hosts: Vec<String>,
    /// Most HTTP connections served at once.
    pub http_max_connections: NonZeroUsize,
    /// Most members the node keeps (`--max-members`); `None` for the protocol's default.
    pub max_members: Option<NonZeroUsize>,
    /// Receive budget in bytes (`--receive-budget-mib`); `None` for the protocol's default.
    pub receive_budget_bytes: Option<usize>,
    /// The cluster key(s), or why there is none.
    pub keys: ClusterKeys,
    /// Tuning preset, if any.
    pub preset: Option<PresetName>,
    /// Injected receive loss, if any.
    pub loss: Option<Loss>,
    /// Directory mirrors (none, one or several; their prefixes do not overlap and no
    /// directory is another's or inside another's).
    pub sync: Vec<SyncConfig>,
    /// Data directory of the durable store; `None` keeps it in memory.
    pub data_dir: Option<PathBuf>,
    /// fsync policy of the data directory.
    pub fsync: chorus::Fsync,
    /// Templates rendered by the agent: the file's `[[template]]` tables, then `--template`.
    pub templates: Vec<crate::template::TemplateSpec>,
}

impl AgentConfig {
    /// Builds the configuration from the flags, reading `--config` first when given.
    ///
    /// # Errors
    /// [`ConfigError`] when the file cannot be read or parsed, or the values conflict.
    pub fn load(args: &AgentArgs) -> Result<Self, ConfigError> {
        let file = match &args.config {
            Some(path) => read_file(path)?,
            None => FileConfig::default(),
        };
        Self::merge(args, file)
    }

    /// Merges flags over a parsed file and validates the result.
    ///
    /// # Errors
    /// [`ConfigError::Invalid`] when the values conflict or are out of range.
    pub fn merge(args: &AgentArgs, file: FileConfig) -> Result<Self, ConfigError> {
        let group = args.group.or(file.group);
        let broadcast = args.broadcast.or(file.broadcast);
        let peers = args.peers.clone().or(file.peers);
        let bind = args.bind.or(file.bind);
        let iface = args.iface.clone().or(file.iface);
        let ttl = args.ttl.or(file.ttl);

        let chosen = [group.is_some(), broadcast.is_some(), peers.is_some()]
            .iter()
            .filter(|set| **set)
            .count();
        if chosen > 1 {
            return Err(ConfigError::Invalid(
                "choose one of group (multicast), broadcast and peers".into(),
            ));
        }
        let transport = if let Some(addr) = broadcast {
            Transport::Broadcast { addr }
        } else if let Some(peers) = peers {
            if peers.is_empty() {
                return Err(ConfigError::Invalid("peers is empty".into()));
            }
            let bind = bind.ok_or_else(|| {
                ConfigError::Invalid("peers mode needs --bind ADDR:PORT (the local address)".into())
            })?;
            Transport::Peers { bind, peers }
        } else {
            let group = group.unwrap_or(DEFAULT_GROUP);
            if !group.ip().is_multicast() {
                return Err(ConfigError::Invalid(format!(
                    "group {} is not a multicast address (224.0.0.0/4 or ff00::/8)",
                    group.ip()
                )));
            }
            if group.port() == 0 {
                return Err(ConfigError::Invalid("group port must not be 0".into()));
            }
            Transport::Multicast {
                group,
                iface: iface.clone().unwrap_or_default(),
                ttl,
            }
        };
        if bind.is_some() && !matches!(transport, Transport::Peers { .. }) {
            return Err(ConfigError::Invalid("bind is only used with peers".into()));
        }
        if !matches!(transport, Transport::Multicast { .. }) && (ttl.is_some() || iface.is_some()) {
            return Err(ConfigError::Invalid(
                "ttl and iface are only used with multicast".into(),
            ));
        }
        if let Some(ttl) = ttl
            && ttl > 255
        {
            return Err(ConfigError::Invalid(format!("ttl {ttl} is above 255")));
        }

        let preset = match args.preset.as_deref().or(file.preset.as_deref()) {
            None => None,
            Some("lan") => Some(PresetName::Lan),
            Some("lossy") => Some(PresetName::Lossy),
            Some(other) => {
                return Err(ConfigError::Invalid(format!(
                    "unknown preset {other:?} (expected \"lan\" or \"lossy\")"
                )));
            }
        };

        let loss = match args.loss.or(file.loss) {
            None => None,
            Some(p) if !(0.0..1.0).contains(&p) => {
                return Err(ConfigError::Invalid(format!(
                    "loss {p} is outside 0.0..1.0"
                )));
            }
            Some(0.0) => None,
            Some(probability) => Some(Loss {
                probability,
                seed: args
                    .loss_seed
                    .or(file.loss_seed)
                    .unwrap_or_else(rand::random),
            }),
        };

        let sync = sync_dirs(args, file.sync.unwrap_or_default().0)?;

        let key_files = if args.key_file.is_empty() {
            file.key_file.unwrap_or_default()
        } else {
            args.key_file.clone()
        };
        let insecure = args.insecure || file.insecure.unwrap_or(false);
        let keys = match (key_files.is_empty(), insecure) {
            (false, true) => {
                return Err(ConfigError::Invalid(
                    "--insecure and --key-file contradict each other: give one of them".into(),
                ));
            }
            (false, false) => ClusterKeys::Files(key_files),
            (true, true) => ClusterKeys::Insecure,
            (true, false) => match off_loopback(&transport) {
                None => ClusterKeys::LoopbackOnly,
                Some(network) => return Err(ConfigError::Unkeyed { network }),
            },
        };

        let mut http_allow_hosts = Vec::new();
        for name in args
            .http_allow_host
            .iter()
            .chain(file.http_allow_hosts.iter().flatten())
        {
            let host = name.trim().trim_end_matches('.').to_ascii_lowercase();
            let plain = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
            if !plain {
                return Err(ConfigError::Invalid(format!(
                    "--http-allow-host {name:?} is not a host name (letters, digits, `.`, `-`, `_`; no port)"
                )));
            }
            http_allow_hosts.push(host);
        }
        let http_max_connections = match args.http_max_connections.or(file.http_max_connections) {
            None => DEFAULT_HTTP_MAX_CONNECTIONS,
            Some(n) if n > MAX_HTTP_CONNECTIONS => {
                return Err(ConfigError::Invalid(format!(
                    "--http-max-connections {n} is above {MAX_HTTP_CONNECTIONS}"
                )));
            }
            Some(n) => NonZeroUsize::new(n).ok_or_else(|| {
                ConfigError::Invalid("--http-max-connections must be above 0".into())
            })?,
        };
        let max_members = match args.max_members.or(file.max_members) {
            None => None,
            Some(n) => Some(
                NonZeroUsize::new(n)
                    .ok_or_else(|| ConfigError::Invalid("--max-members must be above 0".into()))?,
            ),
        };
        let receive_budget_bytes = match args.receive_budget_mib.or(file.receive_budget_mib) {
            None => None,
            Some(mib) => Some(mib.checked_mul(1 << 20).filter(|&b| b > 0).ok_or_else(|| {
                ConfigError::Invalid(format!(
                    "--receive-budget-mib {mib} must be above 0 and fit in memory"
                ))
            })?),
        };

        let http = args.http.or(file.http).unwrap_or(DEFAULT_HTTP);
        let consul_api = args.consul_api.or(file.consul_api);
        if consul_api == Some(http) {
            return Err(ConfigError::Invalid(format!(
                "--consul-api {http} is the address of --http: give it a port of its own \
                 (Consul's is 8500)"
            )));
        }

        let node_name = match args.node_name.clone().or(file.node_name) {
            None => None,
            Some(name) => Some(
                chorus::NodeName::new(&name)
                    .map_err(|e| ConfigError::Invalid(format!("--node-name {name:?}: {e}")))?
                    .to_string(),
            ),
        };
        let data_dir = args.data_dir.clone().or(file.data_dir);
        let fsync = match args.fsync.clone().or(file.fsync) {
            None => chorus::Fsync::default(),
            Some(_) if data_dir.is_none() => {
                return Err(ConfigError::Invalid("--fsync needs --data-dir".into()));
            }
            Some(text) => text
                .parse()
                .map_err(|e: chorus_replication::ParseFsyncError| {
                    ConfigError::Invalid(e.to_string())
                })?,
        };

        let templates = templates(args, file.template.unwrap_or_default())?;

        Ok(Self {
            cluster: args
                .cluster
                .clone()
                .or(file.cluster)
                .unwrap_or_else(|| "chorus".to_string()),
            transport,
            node_id: args.node_id.or(file.node_id),
            node_name,
            http,
            consul_api,
            http_allow_hosts,
            http_max_connections,
            max_members,
            receive_budget_bytes,
            keys,
            preset,
            loss,
            sync,
            data_dir,
            fsync,
            templates,
        })
    }
}

/// The directory mirrors of the flags and the file.
///
/// `--sync-dir` flags replace the file's `[sync]`/`[[sync]]` list; a single `[sync]` still
/// lends its hook settings to a single `--sync-dir` (flags win field by field, as for every
/// other setting). `--on-change`, `--debounce-ms` and `--on-change-timeout-ms` apply to every
/// directory.
fn sync_dirs(args: &AgentArgs, file: Vec<FileSync>) -> Result<Vec<SyncConfig>, ConfigError> {
    let invalid = |m: String| ConfigError::Invalid(m);
    let mut entries: Vec<FileSync> = if args.sync_dir.is_empty() {
        if args.prefix.is_some() && file.len() > 1 {
            return Err(invalid(
                "--prefix overrides the prefix of a single [sync] table; this file has several \
                 [[sync]] tables"
                    .into(),
            ));
        }
        file
    } else {
        if args.prefix.is_some() && args.sync_dir.len() > 1 {
            return Err(invalid(
                "--prefix goes with a single --sync-dir; give each directory its prefix as \
                 --sync-dir DIR:PREFIX"
                    .into(),
            ));
        }
        // One [sync] table lends its hook settings to one --sync-dir.
        let lend = match (file.as_slice(), args.sync_dir.len()) {
            ([one], 1) => one.clone(),
            _ => FileSync::default(),
        };
        let mut entries = Vec::new();
        for given in &args.sync_dir {
            let (dir, prefix) = match (&args.prefix, given.split_once(':')) {
                (Some(_), _) => (given.as_str(), None),
                (None, Some((dir, prefix))) => (dir, Some(prefix.to_owned())),
                // A single [sync] table that names the prefix (the old spelling).
                (None, None) if lend.prefix.is_some() => (given.as_str(), None),
                (None, None) => {
                    return Err(invalid(format!(
                        "--sync-dir {given:?} needs a prefix: --sync-dir DIR:PREFIX (or \
                         --prefix PREFIX with a single --sync-dir)"
                    )));
                }
            };
            if dir.is_empty() {
                return Err(invalid(format!(
                    "--sync-dir {given:?} has an empty directory"
                )));
            }
            entries.push(FileSync {
                dir: Some(PathBuf::from(dir)),
                prefix: prefix.or_else(|| lend.prefix.clone()),
                ..lend.clone()
            });
        }
        entries
    };
    if entries.is_empty() {
        if args.prefix.is_some() || args.on_change.is_some() {
            return Err(invalid("--prefix and --on-change need --sync-dir".into()));
        }
        if args.on_change_timeout_ms.is_some() {
            return Err(invalid("--on-change-timeout-ms needs --sync-dir".into()));
        }
        return Ok(Vec::new());
    }
    let mut out = Vec::with_capacity(entries.len());
    for entry in &mut entries {
        let dir = entry
            .dir
            .take()
            .ok_or_else(|| invalid("a [sync] table needs `dir` (the directory written)".into()))?;
        let prefix = args.prefix.clone().or(entry.prefix.take()).ok_or_else(|| {
            invalid(format!(
                "sync dir {} needs a prefix (the keys mirrored): --sync-dir DIR:PREFIX, \
                 --prefix, or `prefix` in its [sync] table",
                dir.display()
            ))
        })?;
        out.push(SyncConfig {
            dir,
            prefix,
            on_change: args.on_change.clone().or(entry.on_change.take()),
            debounce: args
                .debounce_ms
                .or(entry.debounce_ms)
                .map(Duration::from_millis)
                .unwrap_or(DEFAULT_DEBOUNCE),
            hook_timeout: match args.on_change_timeout_ms.or(entry.on_change_timeout_ms) {
                None => DEFAULT_HOOK_TIMEOUT,
                Some(0) => {
                    return Err(invalid("--on-change-timeout-ms must be above 0".into()));
                }
                Some(ms) => Duration::from_millis(ms),
            },
        });
    }
    check_sync_dirs(&out)?;
    Ok(out)
}

/// Refuses two mirrors whose prefixes overlap (one starts with the other: a key would be
/// mirrored twice) or whose directories are the same or one inside the other (their files and
/// manifests would collide).
fn check_sync_dirs(dirs: &[SyncConfig]) -> Result<(), ConfigError> {
    let places: Vec<PathBuf> = dirs.iter().map(|s| comparable_path(&s.dir)).collect();
    for (i, a) in dirs.iter().enumerate() {
        for (j, b) in dirs.iter().enumerate().skip(i + 1) {
            if a.prefix.starts_with(&b.prefix) || b.prefix.starts_with(&a.prefix) {
                return Err(ConfigError::Invalid(format!(
                    "sync dirs {} (prefix {:?}) and {} (prefix {:?}) have overlapping prefixes: \
                     a key would be mirrored in both; give each directory a prefix that does not \
                     start another's",
                    a.dir.display(),
                    a.prefix,
                    b.dir.display(),
                    b.prefix
                )));
            }
            let (pa, pb) = (&places[i], &places[j]);
            if pa.starts_with(pb) || pb.starts_with(pa) {
                let how = if pa == pb {
                    "are the same directory"
                } else {
                    "are one inside the other"
                };
                return Err(ConfigError::Invalid(format!(
                    "sync dirs {} and {} {how}: each mirror needs a directory of its own",
                    a.dir.display(),
                    b.dir.display()
                )));
            }
        }
    }
    Ok(())
}

/// `path` made absolute and normalised (`.` and `..` resolved by name), then with symbolic
/// links resolved as far as it exists, so that two spellings of one directory compare equal.
fn comparable_path(path: &Path) -> PathBuf {
    use std::path::Component;
    let absolute = if path.is_absolute() {
        path.to_path_buf()
    } else {
        std::env::current_dir().unwrap_or_default().join(path)
    };
    let mut plain = PathBuf::new();
    for part in absolute.components() {
        match part {
            Component::CurDir => {}
            Component::ParentDir => {
                plain.pop();
            }
            other => plain.push(other),
        }
    }
    // The longest existing ancestor with its links resolved, then the rest as written.
    let mut existing = plain.as_path();
    let mut rest = Vec::new();
    loop {
        if let Ok(real) = existing.canonicalize() {
            let mut out = real;
            out.extend(rest.iter().rev());
            return out;
        }
        match (existing.parent(), existing.file_name()) {
            (Some(parent), Some(name)) => {
                rest.push(name.to_owned());
                existing = parent;
            }
            _ => return plain,
        }
    }
}

/// The templates of the file, then those of the flags; each destination written by one only.
fn templates(
    args: &AgentArgs,
    file: Vec<FileTemplate>,
) -> Result<Vec<crate::template::TemplateSpec>, ConfigError> {
    use crate::template::{DEFAULT_COMMAND_TIMEOUT, TemplateSpec, Wait};
    let invalid = ConfigError::Invalid;
    let timeout = |ms: Option<u64>| match ms {
        None => Ok(DEFAULT_COMMAND_TIMEOUT),
        Some(0) => Err(invalid("a template command timeout must be above 0".into())),
        Some(ms) => Ok(Duration::from_millis(ms)),
    };
    let mut out: Vec<TemplateSpec> = Vec::new();
    for t in file {
        let default = Wait::default();
        let min = t.wait_min_ms.map_or(default.min, Duration::from_millis);
        let max = match (t.wait_min_ms, t.wait_max_ms) {
            (_, Some(max)) => Duration::from_millis(max),
            (Some(_), None) => min.saturating_mul(10),
            (None, None) => default.max,
        };
        out.push(TemplateSpec {
            source: t.source,
            destination: t.destination,
            command: t.command.filter(|c| !c.trim().is_empty()),
            wait: Wait::new(min, max).map_err(invalid)?,
            command_timeout: timeout(t.command_timeout_ms)?,
        });
    }
    let wait = match &args.template_wait_ms {
        None => Wait::default(),
        Some(text) => Wait::parse_ms(text).map_err(invalid)?,
    };
    let command_timeout = timeout(args.template_command_timeout_ms)?;
    if args.template.is_empty()
        && (args.template_wait_ms.is_some() || args.template_command_timeout_ms.is_some())
    {
        return Err(invalid(
            "--template-wait-ms and --template-command-timeout-ms need --template".into(),
        ));
    }
    for text in &args.template {
        let (source, destination, command) = crate::template::parse_spec(text).map_err(invalid)?;
        out.push(TemplateSpec {
            source,
            destination,
            command,
            wait,
            command_timeout,
        });
    }
    for (i, t) in out.iter().enumerate() {
        if t.destination.as_os_str() == "-" {
            return Err(invalid(
                "a template of the agent needs a destination file, not stdout (-)".into(),
            ));
        }
        if out[..i].iter().any(|o| o.destination == t.destination) {
            return Err(invalid(format!(
                "two templates write {}",
                t.destination.display()
            )));
        }
    }
    Ok(out)
}

/// Where the node would send and receive when that is not only this host, or `None` when every
/// datagram stays on the loopback.
///
/// An interface name other than `lo` is looked up, and counts as the loopback only when the
/// system says it is one; a name that cannot be found counts as a network (the node would not
/// start on it anyway).
fn off_loopback(transport: &Transport) -> Option<String> {
    match transport {
        Transport::Multicast { iface, .. } => {
            let on_loopback = match chorus_transport::Interface::from(iface.as_str()) {
                _ if iface.is_empty() => true,
                chorus_transport::Interface::Addr(addr) => addr.is_loopback(),
                chorus_transport::Interface::Name(name) if name == "lo" => true,
                other => other.resolve().is_ok_and(|found| found.loopback),
            };
            (!on_loopback).then(|| format!("interface {iface}"))
        }
        Transport::Broadcast { addr } => {
            (!addr.ip().is_loopback()).then(|| format!("broadcast address {addr}"))
        }
        // A socket bound to the loopback only exchanges datagrams with this host; bound to any
        // other address (0.0.0.0 included) it hears the network, whoever the peers are.
        Transport::Peers { bind, .. } => {
            (!bind.ip().is_loopback()).then(|| format!("bind address {bind}"))
        }
    }
}

/// Reads and parses a TOML config file.
fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    parse_file(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source: Box::new(source),
    })
}

/// Parses the text of a TOML config file.
pub fn parse_file(text: &str) -> Result<FileConfig, toml::de::Error> {
    toml::from_str(text)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn merge(args: AgentArgs, toml: &str) -> Result<AgentConfig, ConfigError> {
        AgentConfig::merge(&args, parse_file(toml).unwrap())
    }

    #[test]
    fn defaults_are_loopback_multicast() {
        let cfg = merge(AgentArgs::default(), "").unwrap();
        assert_eq!(cfg.cluster, "chorus");
        assert_eq!(cfg.http, DEFAULT_HTTP);
        assert_eq!(
            cfg.transport,
            Transport::Multicast {
                group: DEFAULT_GROUP,
                iface: String::new(),
                ttl: None
            }
        );
        assert!(cfg.loss.is_none() && cfg.sync.is_empty());
    }

    #[test]
    fn flags_override_file() {
        let toml = r#"
            cluster = "from-file"
            group = "239.1.2.3:9000"
            iface = "eth0"
            insecure = true
            ttl = 2
            http = "127.0.0.1:9999"
            [sync]
            dir = "/tmp/x"
            prefix = "app/"
            debounce_ms = 50
        "#;
        let args = AgentArgs {
            cluster: Some("from-flag".into()),
            ttl: Some(0),
            ..AgentArgs::default()
        };
        let cfg = merge(args, toml).unwrap();
        assert_eq!(cfg.cluster, "from-flag");
        assert_eq!(
            cfg.transport,
            Transport::Multicast {
                group: "239.1.2.3:9000".parse().unwrap(),
                iface: "eth0".into(),
                ttl: Some(0)
            }
        );
        assert_eq!(cfg.http, "127.0.0.1:9999".parse().unwrap());
        let [sync] = cfg.sync.as_slice() else {
            panic!("{:?}", cfg.sync)
        };
        assert_eq!(sync.prefix, "app/");
        assert_eq!(sync.debounce, Duration::from_millis(50));
    }

    #[test]
    fn data_dir_and_fsync_from_file_and_flags() {
        let cfg = merge(AgentArgs::default(), "").unwrap();
        assert!(cfg.data_dir.is_none());
        let cfg = merge(
            AgentArgs::default(),
            "data_dir = \"/var/lib/chorus\"\nfsync = \"interval:200\"",
        )
        .unwrap();
        assert_eq!(cfg.data_dir, Some(PathBuf::from("/var/lib/chorus")));
        assert_eq!(
            cfg.fsync,
            chorus::Fsync::Interval(Duration::from_millis(200))
        );
        let args = AgentArgs {
            fsync: Some("never".into()),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "data_dir = \"/d\"").unwrap();
        assert_eq!(cfg.fsync, chorus::Fsync::Never);
        let bad = AgentArgs {
            data_dir: Some("/d".into()),
            fsync: Some("sometimes".into()),
            ..AgentArgs::default()
        };
        assert!(merge(bad, "").is_err());
        let alone = AgentArgs {
            fsync: Some("always".into()),
            ..AgentArgs::default()
        };
        assert!(merge(alone, "").is_err(), "--fsync needs --data-dir");
    }

    #[test]
    fn ipv6_group_is_accepted() {
        let cfg = merge(AgentArgs::default(), r#"group = "[ff15::7]:7400""#).unwrap();
        assert!(matches!(cfg.transport, Transport::Multicast { group, .. } if group.is_ipv6()));
    }

    #[test]
    fn conflicts_and_bad_values_are_refused() {
        assert!(merge(AgentArgs::default(), r#"group = "10.0.0.1:7400""#).is_err());
        assert!(
            merge(
                AgentArgs::default(),
                "broadcast = \"127.255.255.255:7400\"\ngroup = \"239.1.1.1:7400\""
            )
            .is_err()
        );
        assert!(merge(AgentArgs::default(), r#"peers = ["127.0.0.1:1"]"#).is_err());
        let loss = AgentArgs {
            loss: Some(1.5),
            ..AgentArgs::default()
        };
        assert!(merge(loss, "").is_err());
        let prefix_alone = AgentArgs {
            prefix: Some("a/".into()),
            ..AgentArgs::default()
        };
        assert!(merge(prefix_alone, "").is_err());
        assert!(merge(AgentArgs::default(), r#"preset = "fast""#).is_err());
        assert!(parse_file("unknown_field = 1").is_err());
    }

    #[test]
    fn peers_mode_needs_bind() {
        let cfg = merge(
            AgentArgs::default(),
            "peers = [\"127.0.0.1:7401\"]\nbind = \"127.0.0.1:7400\"",
        )
        .unwrap();
        assert_eq!(
            cfg.transport,
            Transport::Peers {
                bind: "127.0.0.1:7400".parse().unwrap(),
                peers: vec!["127.0.0.1:7401".parse().unwrap()]
            }
        );
    }

    #[test]
    fn off_the_loopback_an_unkeyed_agent_is_refused_with_the_fix() {
        let unkeyed = [
            "iface = \"10.0.0.7\"",
            "iface = \"no-such-if0\"",
            "broadcast = \"10.1.2.255:7400\"",
            "peers = [\"127.0.0.1:7401\"]\nbind = \"0.0.0.0:7400\"",
            "peers = [\"10.0.0.2:7400\"]\nbind = \"10.0.0.1:7400\"",
        ];
        for toml in unkeyed {
            let err = merge(AgentArgs::default(), toml).unwrap_err();
            assert!(matches!(err, ConfigError::Unkeyed { .. }), "{toml}: {err}");
            let text = err.to_string();
            for fix in ["chorus keygen", "--key-file", "--insecure"] {
                assert!(text.contains(fix), "{toml}: {text}");
            }
            // --insecure (flag or file) lets it start without a key, and says so.
            let insecure = AgentArgs {
                insecure: true,
                ..AgentArgs::default()
            };
            assert_eq!(merge(insecure, toml).unwrap().keys, ClusterKeys::Insecure);
            let cfg = merge(AgentArgs::default(), &format!("insecure = true\n{toml}")).unwrap();
            assert_eq!(cfg.keys, ClusterKeys::Insecure);
            // A key file (flag or file) is what it asks for.
            let keyed = AgentArgs {
                key_file: vec!["/k".into()],
                ..AgentArgs::default()
            };
            assert_eq!(
                merge(keyed, toml).unwrap().keys,
                ClusterKeys::Files(vec!["/k".into()])
            );
            let cfg = merge(
                AgentArgs::default(),
                &format!("key_file = [\"/f\"]\n{toml}"),
            )
            .unwrap();
            assert_eq!(cfg.keys, ClusterKeys::Files(vec!["/f".into()]));
        }
        // Everything that stays on this host needs no key.
        for toml in [
            "",
            "iface = \"127.0.0.1\"",
            "iface = \"lo\"",
            "broadcast = \"127.255.255.255:7400\"",
            "peers = [\"127.0.0.1:7401\"]\nbind = \"127.0.0.1:7400\"",
        ] {
            let cfg = merge(AgentArgs::default(), toml).unwrap();
            assert_eq!(cfg.keys, ClusterKeys::LoopbackOnly, "{toml}");
        }
        // Both at once is a contradiction, not a choice made for the user.
        let both = AgentArgs {
            insecure: true,
            key_file: vec!["/k".into()],
            ..AgentArgs::default()
        };
        assert!(matches!(merge(both, ""), Err(ConfigError::Invalid(_))));
    }

    #[test]
    fn member_and_receive_limits_from_flags_or_file() {
        let cfg = merge(AgentArgs::default(), "").unwrap();
        assert_eq!((cfg.max_members, cfg.receive_budget_bytes), (None, None));
        let cfg = merge(
            AgentArgs::default(),
            "max_members = 32\nreceive_budget_mib = 16",
        )
        .unwrap();
        assert_eq!(cfg.max_members.map(NonZeroUsize::get), Some(32));
        assert_eq!(cfg.receive_budget_bytes, Some(16 << 20));
        let args = AgentArgs {
            max_members: Some(8),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "max_members = 32").unwrap();
        assert_eq!(cfg.max_members.map(NonZeroUsize::get), Some(8), "flag wins");
        assert!(merge(AgentArgs::default(), "max_members = 0").is_err());
        assert!(merge(AgentArgs::default(), "receive_budget_mib = 0").is_err());
        assert!(
            merge(
                AgentArgs::default(),
                "receive_budget_mib = 17592186044416000"
            )
            .is_err()
        );
    }

    #[test]
    fn node_name_from_flag_or_file_is_checked() {
        assert_eq!(merge(AgentArgs::default(), "").unwrap().node_name, None);
        let cfg = merge(AgentArgs::default(), "node_name = \"web-1\"").unwrap();
        assert_eq!(cfg.node_name.as_deref(), Some("web-1"));
        let args = AgentArgs {
            node_name: Some("db 2".into()),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "node_name = \"web-1\"").unwrap();
        assert_eq!(cfg.node_name.as_deref(), Some("db 2"), "flag wins");
        for bad in ["\"\"", "\"a\\nb\"", &format!("\"{}\"", "x".repeat(65))] {
            let toml = format!("node_name = {bad}");
            assert!(
                matches!(
                    merge(AgentArgs::default(), &toml),
                    Err(ConfigError::Invalid(_))
                ),
                "{toml}"
            );
        }
    }

    #[test]
    fn http_names_and_connection_limit() {
        let cfg = merge(AgentArgs::default(), "").unwrap();
        assert!(cfg.http_allow_hosts.is_empty());
        assert_eq!(cfg.http_max_connections, DEFAULT_HTTP_MAX_CONNECTIONS);
        let args = AgentArgs {
            http_allow_host: vec!["Chorus.Internal.".into()],
            http_max_connections: Some(8),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "http_allow_hosts = [\"box-1\"]").unwrap();
        assert_eq!(cfg.http_allow_hosts, ["chorus.internal", "box-1"]);
        assert_eq!(cfg.http_max_connections.get(), 8);
        for bad in ["evil.example:80", "", "a b", "[::1]"] {
            let args = AgentArgs {
                http_allow_host: vec![bad.into()],
                ..AgentArgs::default()
            };
            assert!(merge(args, "").is_err(), "{bad:?} accepted");
        }
        assert!(merge(AgentArgs::default(), "http_max_connections = 0").is_err());
        // A semaphore that large would panic; the config refuses it first.
        assert!(
            merge(
                AgentArgs::default(),
                "http_max_connections = 4611686018427387904"
            )
            .is_err()
        );
    }

    fn sync_args(dirs: &[&str]) -> AgentArgs {
        AgentArgs {
            sync_dir: dirs.iter().map(|d| (*d).to_owned()).collect(),
            ..AgentArgs::default()
        }
    }

    #[test]
    fn several_sync_dirs_from_flags_or_file() {
        let cfg = merge(sync_args(&["/srv/a:app/", "/srv/b:web/"]), "").unwrap();
        let got: Vec<(&Path, &str)> = cfg
            .sync
            .iter()
            .map(|s| (s.dir.as_path(), s.prefix.as_str()))
            .collect();
        assert_eq!(
            got,
            [(Path::new("/srv/a"), "app/"), (Path::new("/srv/b"), "web/")]
        );
        // The first `:` ends DIR; the prefix may hold more of them, or be empty (every key).
        let cfg = merge(sync_args(&["/srv/a:svc:web/"]), "").unwrap();
        assert_eq!(cfg.sync[0].prefix, "svc:web/");
        let cfg = merge(sync_args(&["/srv/all:"]), "").unwrap();
        assert_eq!(cfg.sync[0].prefix, "");
        // A hook flag applies to every directory.
        let args = AgentArgs {
            on_change: Some("reload".into()),
            debounce_ms: Some(50),
            ..sync_args(&["/srv/a:app/", "/srv/b:web/"])
        };
        let cfg = merge(args, "").unwrap();
        assert!(
            cfg.sync
                .iter()
                .all(|s| s.on_change.as_deref() == Some("reload")
                    && s.debounce == Duration::from_millis(50))
        );

        let toml = r#"
            [[sync]]
            dir = "/srv/a"
            prefix = "app/"
            on_change = "reload-a"
            [[sync]]
            dir = "/srv/b"
            prefix = "web/"
            debounce_ms = 10
        "#;
        let cfg = merge(AgentArgs::default(), toml).unwrap();
        assert_eq!(cfg.sync.len(), 2);
        assert_eq!(cfg.sync[0].on_change.as_deref(), Some("reload-a"));
        assert_eq!(cfg.sync[1].on_change, None);
        assert_eq!(cfg.sync[1].debounce, Duration::from_millis(10));
        // Flags replace the file's list.
        let cfg = merge(sync_args(&["/srv/c:ops/"]), toml).unwrap();
        assert_eq!(cfg.sync.len(), 1);
        assert_eq!(cfg.sync[0].prefix, "ops/");
        // --prefix cannot choose among several tables.
        let args = AgentArgs {
            prefix: Some("x/".into()),
            ..AgentArgs::default()
        };
        assert!(merge(args, toml).is_err());
        assert!(parse_file("[[sync]]\ndir = \"/a\"\nprefix = \"a/\"\nbogus = 1").is_err());
    }

    #[test]
    fn the_single_sync_dir_spellings_still_work() {
        let args = AgentArgs {
            prefix: Some("cfg/".into()),
            ..sync_args(&["/srv/odd:name"])
        };
        let cfg = merge(args, "").unwrap();
        assert_eq!(cfg.sync[0].dir, Path::new("/srv/odd:name"), "taken whole");
        assert_eq!(cfg.sync[0].prefix, "cfg/");
        // A [sync] table lends its prefix and hook to a single --sync-dir DIR.
        let cfg = merge(
            sync_args(&["/srv/x"]),
            "[sync]\nprefix = \"app/\"\non_change = \"hup\"",
        )
        .unwrap();
        assert_eq!(cfg.sync[0].dir, Path::new("/srv/x"));
        assert_eq!(cfg.sync[0].prefix, "app/");
        assert_eq!(cfg.sync[0].on_change.as_deref(), Some("hup"));
        // Without any prefix it is an error that shows the way.
        let err = merge(sync_args(&["/srv/x"]), "").unwrap_err().to_string();
        assert!(err.contains("DIR:PREFIX"), "{err}");
        let args = AgentArgs {
            prefix: Some("a/".into()),
            ..sync_args(&["/a", "/b"])
        };
        assert!(merge(args, "").is_err());
    }

    #[test]
    fn overlapping_sync_dirs_are_refused() {
        for (dirs, what) in [
            (&["/srv/a:app/", "/srv/b:app/"][..], "overlapping prefixes"),
            (
                &["/srv/a:app/", "/srv/b:app/web/"][..],
                "overlapping prefixes",
            ),
            (&["/srv/a:", "/srv/b:web/"][..], "overlapping prefixes"),
            (&["/srv/a:app/", "/srv/a:web/"][..], "the same directory"),
            (
                &["/srv/a:app/", "/srv/./b/../a/:web/"][..],
                "the same directory",
            ),
            (
                &["/srv/a:app/", "/srv/a/sub:web/"][..],
                "one inside the other",
            ),
            (
                &["/srv/a/sub:app/", "/srv/a:web/"][..],
                "one inside the other",
            ),
        ] {
            let err = merge(sync_args(dirs), "").unwrap_err().to_string();
            assert!(err.contains(what), "{dirs:?}: {err}");
        }
        // Prefixes that only share a beginning that is not a whole prefix are fine.
        assert!(merge(sync_args(&["/srv/a:app/", "/srv/b:apps/"]), "").is_ok());
        // A symbolic link to a directory is that directory.
        let tmp = chorus_testkit::temp_dir("sync-link");
        let real = tmp.path().join("real");
        std::fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let dirs = [
            format!("{}:app/", real.display()),
            format!("{}:web/", link.display()),
        ];
        let dirs: Vec<&str> = dirs.iter().map(String::as_str).collect();
        let err = merge(sync_args(&dirs), "").unwrap_err().to_string();
        assert!(err.contains("the same directory"), "{err}");
    }

    #[test]
    fn consul_api_is_off_unless_asked_for() {
        assert_eq!(merge(AgentArgs::default(), "").unwrap().consul_api, None);
        let cfg = merge(AgentArgs::default(), "consul_api = \"127.0.0.1:8500\"").unwrap();
        assert_eq!(cfg.consul_api, Some("127.0.0.1:8500".parse().unwrap()));
        let args = AgentArgs {
            consul_api: Some("127.0.0.1:9500".parse().unwrap()),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "consul_api = \"127.0.0.1:8500\"").unwrap();
        assert_eq!(
            cfg.consul_api,
            Some("127.0.0.1:9500".parse().unwrap()),
            "flag wins"
        );
        let same = AgentArgs {
            consul_api: Some(DEFAULT_HTTP),
            ..AgentArgs::default()
        };
        assert!(merge(same, "").is_err(), "one port for two APIs");
    }

    #[test]
    fn templates_from_file_and_flags() {
        let toml = r#"
            [[template]]
            source = "/t/a.tmpl"
            destination = "/etc/a.conf"
            command = "reload a"
            wait_min_ms = 50
            command_timeout_ms = 1000
            [[template]]
            source = "/t/b.tmpl"
            destination = "/etc/b.conf"
        "#;
        let args = AgentArgs {
            template: vec!["/t/c.tmpl:/etc/c.conf:echo a:b".into()],
            template_wait_ms: Some("10:20".into()),
            ..AgentArgs::default()
        };
        let cfg = merge(args, toml).unwrap();
        let t = &cfg.templates;
        assert_eq!(t.len(), 3);
        assert_eq!(t[0].command.as_deref(), Some("reload a"));
        assert_eq!(t[0].wait.min, Duration::from_millis(50));
        assert_eq!(t[0].wait.max, Duration::from_millis(500));
        assert_eq!(t[0].command_timeout, Duration::from_secs(1));
        assert_eq!(t[1].wait, crate::template::Wait::default());
        assert_eq!(t[2].command.as_deref(), Some("echo a:b"));
        assert_eq!(t[2].wait.max, Duration::from_millis(20));
        let twice = AgentArgs {
            template: vec!["/x:/etc/b.conf".into()],
            ..AgentArgs::default()
        };
        assert!(
            merge(twice, toml).is_err(),
            "one destination, two templates"
        );
        assert!(
            merge(
                AgentArgs::default(),
                "[[template]]\nsource = \"a\"\ndestination = \"b\"\nwait_min_ms = 9\nwait_max_ms = 1"
            )
            .is_err()
        );
        let alone = AgentArgs {
            template_wait_ms: Some("10".into()),
            ..AgentArgs::default()
        };
        assert!(merge(alone, "").is_err());
    }

    #[test]
    fn loss_gets_a_seed() {
        let args = AgentArgs {
            loss: Some(0.1),
            loss_seed: Some(7),
            ..AgentArgs::default()
        };
        let cfg = merge(args, "").unwrap();
        assert_eq!(
            cfg.loss,
            Some(Loss {
                probability: 0.1,
                seed: 7
            })
        );
    }
}
