//! `devloop.yaml`: parsing, validation and the resolved configuration.
//!
//! Errors name the file, the line and the key, and say what to write
//! instead. Structural errors come from serde_yaml (which knows where it
//! was); errors found after parsing (a missing directory, overlapping sync
//! rules) are located by [`locate`], which walks the YAML text by
//! indentation.

// Loading runs once at startup; a large, fully located error is worth more
// there than a small one.
#![allow(clippy::result_large_err)]

use devloop_agent::paths;
use devloop_agent::protocol::{AppSpec, CommandSpec};
use globset::{Glob, GlobBuilder, GlobSet, GlobSetBuilder};
use serde::de::{self, Deserializer, MapAccess, SeqAccess, Visitor};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The file devloop reads when `--config` is not given.
pub const DEFAULT_FILE: &str = "devloop.yaml";

/// A problem with the configuration, located as precisely as possible.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    /// Dotted key path, e.g. `services.web.sync[0].from`.
    pub key: String,
    pub message: String,
    pub hint: Option<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(l) = self.line {
            write!(f, ":{l}")?;
            if let Some(c) = self.column {
                write!(f, ":{c}")?;
            }
        }
        write!(f, ": ")?;
        if !self.key.is_empty() {
            write!(f, "{}: ", self.key)?;
        }
        write!(f, "{}", self.message)?;
        if let Some(h) = &self.hint {
            write!(f, "\n  hint: {h}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------- raw schema

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFile {
    #[serde(default)]
    version: Option<u32>,
    services: BTreeMap<String, RawService>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    #[serde(default)]
    target: Option<RawTarget>,
    sync: Vec<RawRule>,
    #[serde(default)]
    on_sync: Vec<RawTrigger>,
    #[serde(default)]
    app: Option<RawApp>,
    #[serde(default)]
    intercept: Option<RawIntercept>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawIntercept {
    #[serde(default)]
    service: Option<String>,
    ports: Vec<String>,
    #[serde(default)]
    header: Option<BTreeMap<String, String>>,
    #[serde(default)]
    lease_ms: Option<u64>,
    #[serde(default)]
    listen: Option<String>,
    #[serde(default)]
    fallback: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTargetMap {
    #[serde(default)]
    local: Option<RawLocal>,
    #[serde(default)]
    exec: Option<RawExec>,
    #[serde(default)]
    kubernetes: Option<RawKubernetes>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawKubernetes {
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    selector: Option<String>,
    #[serde(default)]
    deployment: Option<String>,
    #[serde(default)]
    statefulset: Option<String>,
    #[serde(default)]
    pod: Option<String>,
    #[serde(default)]
    container: Option<String>,
    #[serde(default)]
    context: Option<String>,
    #[serde(default)]
    transport: Option<KubeTransport>,
    #[serde(default)]
    helper_image: Option<String>,
    root: String,
}

/// `target: local` or `target: {local: {...}}` / `{exec: {...}}`.
#[derive(Debug)]
struct RawTarget(RawTargetMap);

impl<'de> Deserialize<'de> for RawTarget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTarget;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("`local`, or a map with one of `local`, `exec` or `kubernetes`")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawTarget, E> {
                match s {
                    "local" => Ok(RawTarget(RawTargetMap { local: Some(RawLocal::default()), ..Default::default() })),
                    "exec" => Err(E::custom("the exec target needs a command: write `exec: {command: [...]}`")),
                    "kubernetes" => Err(E::custom(
                        "the kubernetes target needs its pods and a root: write `kubernetes: {deployment: NAME, root: /app}`",
                    )),
                    other => Err(E::unknown_variant(other, &["local", "exec", "kubernetes"])),
                }
            }
            fn visit_map<A: MapAccess<'de>>(self, m: A) -> Result<RawTarget, A::Error> {
                RawTargetMap::deserialize(de::value::MapAccessDeserializer::new(m)).map(RawTarget)
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLocal {
    #[serde(default)]
    root: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawExec {
    command: Vec<String>,
    #[serde(default)]
    token: Option<TokenVia>,
}

/// How the exec target hands the session token to the agent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TokenVia {
    /// In `DEVLOOP_AGENT_TOKEN` of the command's environment
    /// (`docker exec -e DEVLOOP_AGENT_TOKEN ...` passes it on).
    Env,
    /// As the first line of the command's stdin (the agent needs
    /// `--token-stdin`); works over ssh, which does not pass environment.
    Stdin,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRule {
    from: String,
    #[serde(default)]
    to: Option<String>,
    #[serde(default)]
    exclude: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTrigger {
    when: OneOrMany,
    run: RawCommand,
    #[serde(default)]
    workdir: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApp {
    #[serde(default)]
    run: Option<RawCommand>,
    #[serde(default)]
    workdir: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default = "yes")]
    restart: bool,
    #[serde(default)]
    restart_when: Option<OneOrMany>,
    #[serde(default)]
    grace_ms: Option<u64>,
}

fn yes() -> bool {
    true
}

/// A string (run through `sh -c`) or a list (run directly).
#[derive(Debug)]
enum RawCommand {
    Shell(String),
    Argv(Vec<String>),
}

impl<'de> Deserialize<'de> for RawCommand {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawCommand;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a command: a string for `sh -c`, or a list like [npm, start]")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<RawCommand, E> {
                Ok(RawCommand::Shell(s.to_string()))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<RawCommand, A::Error> {
                Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(s)).map(RawCommand::Argv)
            }
        }
        d.deserialize_any(V)
    }
}

/// One glob or a list of them.
#[derive(Debug)]
struct OneOrMany(Vec<String>);

impl<'de> Deserialize<'de> for OneOrMany {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = OneOrMany;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("a glob or a list of globs")
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<OneOrMany, E> {
                Ok(OneOrMany(vec![s.to_string()]))
            }
            fn visit_seq<A: SeqAccess<'de>>(self, s: A) -> Result<OneOrMany, A::Error> {
                Vec::<String>::deserialize(de::value::SeqAccessDeserializer::new(s)).map(OneOrMany)
            }
        }
        d.deserialize_any(V)
    }
}

// ------------------------------------------------------------ resolved config

/// The whole configuration, validated, with paths made absolute.
#[derive(Debug, Clone)]
pub struct Config {
    pub file: PathBuf,
    pub services: Vec<Service>,
}

#[derive(Debug, Clone)]
pub struct Service {
    pub name: String,
    pub target: Target,
    pub rules: Vec<SyncRule>,
    pub on_sync: Vec<Trigger>,
    pub app: Option<App>,
    pub intercept: Option<Intercept>,
}

/// The intercept's default lease: how long after devloop is last heard
/// from the agent still takes new connections (after that, the app does).
pub const DEFAULT_LEASE_MS: u64 = 3000;

/// What is intercepted, and where it goes on this machine.
#[derive(Debug, Clone, PartialEq)]
pub struct Intercept {
    /// The Kubernetes Service; None: the one that selects the workload.
    pub service: Option<String>,
    pub ports: Vec<PortMap>,
    /// A personal intercept: only the HTTP/1.1 requests with this header.
    pub header: Option<(String, String)>,
    pub lease_ms: u64,
    /// Local target: the address that stands in for the Service.
    pub listen: Option<std::net::IpAddr>,
    /// Local target: where callers go while devloop is away (the app).
    pub fallback: Option<std::net::SocketAddr>,
}

/// One Service port and the local port its calls go to.
#[derive(Debug, Clone, PartialEq)]
pub struct PortMap {
    pub service: PortRef,
    pub local: u16,
}

/// A Service port, by number or by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PortRef {
    Number(u16),
    Name(String),
}

impl std::fmt::Display for PortRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PortRef::Number(n) => write!(f, "{n}"),
            PortRef::Name(n) => f.write_str(n),
        }
    }
}

impl PortMap {
    /// Parses `SERVICE_PORT:LOCAL_PORT` (the service port a number or a
    /// name).
    pub fn parse(s: &str) -> Result<PortMap, String> {
        let (svc, local) = s
            .split_once(':')
            .ok_or_else(|| format!("`{s}`: write SERVICE_PORT:LOCAL_PORT, like `8080:3000` or `http:3000`"))?;
        let local: u16 = local
            .trim()
            .parse()
            .ok()
            .filter(|p| *p > 0)
            .ok_or_else(|| format!("`{s}`: the local port `{local}` is not a port number"))?;
        let svc = svc.trim();
        let service = match svc.parse::<u16>() {
            Ok(0) => return Err(format!("`{s}`: port 0 is not a port")),
            Ok(n) => PortRef::Number(n),
            Err(_) if !svc.is_empty() && svc.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') => {
                PortRef::Name(svc.to_string())
            }
            Err(_) => return Err(format!("`{s}`: `{svc}` is neither a port number nor a port name")),
        };
        Ok(PortMap { service, local })
    }
}

/// Parses a personal intercept's `NAME=VALUE` (from the command line).
pub fn parse_header(s: &str) -> Result<(String, String), String> {
    let (n, v) = s.split_once('=').ok_or_else(|| format!("`{s}`: write NAME=VALUE, like `x-dev=alice`"))?;
    check_header(n.trim(), v.trim())?;
    Ok((n.trim().to_string(), v.trim().to_string()))
}

fn check_header(n: &str, v: &str) -> Result<(), String> {
    if n.is_empty() || !n.bytes().all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)) {
        return Err(format!("`{n}` is not a header name"));
    }
    if v.is_empty() || v.bytes().any(|b| b.is_ascii_control()) {
        return Err(format!("the value of `{n}` must be non-empty, with no control characters"));
    }
    Ok(())
}

/// Where a service's agent runs.
#[derive(Debug, Clone, PartialEq)]
pub enum Target {
    /// A child process of devloop on this machine, syncing into `root`.
    Local { root: PathBuf },
    /// Whatever `command` starts; its stdio is the agent's.
    Exec { command: Vec<String>, token: TokenVia },
    /// Every ready pod that `pods` finds; the agent is injected into
    /// `container` (default: the first) and syncs into `root`.
    Kubernetes(KubeTarget),
}

/// Where a service runs in a cluster.
#[derive(Debug, Clone, PartialEq)]
pub struct KubeTarget {
    /// None: the kubeconfig context's namespace.
    pub namespace: Option<String>,
    pub pods: PodSelector,
    pub container: Option<String>,
    /// None: the kubeconfig's current context.
    pub context: Option<String>,
    /// Absolute path in the container.
    pub root: String,
    pub transport: KubeTransport,
    /// The image of the helper container that injects into containers
    /// with no shell (it needs `sh`).
    pub helper_image: String,
}

/// The default `helper_image`.
pub const DEFAULT_HELPER_IMAGE: &str = "busybox:1.36";

/// How the CLI reaches an agent in a pod.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum KubeTransport {
    /// A port-forward to the agent's loopback-only port; the exec stream
    /// that started the agent stays open as its lifeline. Falls back to
    /// `exec` when port-forward is refused.
    #[default]
    PortForward,
    /// The agent's stdin/stdout over the exec stream.
    Exec,
}

/// How a service's pods are found.
#[derive(Debug, Clone, PartialEq)]
pub enum PodSelector {
    /// A label selector, `app=web,tier=front`.
    Labels(String),
    Deployment(String),
    StatefulSet(String),
    Pod(String),
}

impl std::fmt::Display for PodSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PodSelector::Labels(l) => write!(f, "pods matching {l}"),
            PodSelector::Deployment(d) => write!(f, "deployment/{d}"),
            PodSelector::StatefulSet(s) => write!(f, "statefulset/{s}"),
            PodSelector::Pod(p) => write!(f, "pod/{p}"),
        }
    }
}

impl Target {
    pub fn describe(&self) -> String {
        match self {
            Target::Local { root } => format!("local:{}", root.display()),
            Target::Exec { command, .. } => {
                format!("exec:{}", command.first().map(String::as_str).unwrap_or(""))
            }
            Target::Kubernetes(k) => {
                format!("kubernetes:{}:{}", k.namespace.as_deref().unwrap_or("(default namespace)"), k.pods)
            }
        }
    }
}

/// Source directory → directory under the target's root.
#[derive(Debug, Clone)]
pub struct SyncRule {
    pub from: PathBuf,
    /// Wire path under the target root; "" is the root itself.
    pub to: String,
    pub exclude: Vec<String>,
}

/// A post-sync command and the paths that trigger it.
#[derive(Debug, Clone)]
pub struct Trigger {
    pub when: PathMatcher,
    pub command: CommandSpec,
}

#[derive(Debug, Clone)]
pub struct App {
    /// The process the agent runs; None: the container's own main process
    /// (Kubernetes Deployments and StatefulSets), restarted in place under
    /// devloop's restart wrapper so the synced files stay.
    pub spec: Option<AppSpec>,
    pub restart: bool,
    /// Restart only when a changed path matches; None = any change.
    pub restart_when: Option<PathMatcher>,
}

/// Globs over target-relative paths. A glob with no `/` matches the file
/// name at any depth (`*.go`, `package.json`); one with a `/` matches the
/// whole path (`src/**/*.rs`), as in `.gitignore`.
#[derive(Debug, Clone)]
pub struct PathMatcher {
    names: GlobSet,
    paths: GlobSet,
    pub patterns: Vec<String>,
}

impl PathMatcher {
    fn new(patterns: &[String]) -> Result<PathMatcher, (usize, String)> {
        let mut names = GlobSetBuilder::new();
        let mut full = GlobSetBuilder::new();
        for (i, p) in patterns.iter().enumerate() {
            let trimmed = p.trim_start_matches('/');
            if trimmed.contains('/') {
                let g = GlobBuilder::new(trimmed).literal_separator(true).build().map_err(|e| (i, e.to_string()))?;
                full.add(g);
            } else {
                names.add(Glob::new(trimmed).map_err(|e| (i, e.to_string()))?);
            }
        }
        let names = names.build().map_err(|e| (0, e.to_string()))?;
        let paths = full.build().map_err(|e| (0, e.to_string()))?;
        Ok(PathMatcher { names, paths, patterns: patterns.to_vec() })
    }

    /// Does a target-relative wire path match? (Bytes: a name need not be
    /// UTF-8.)
    pub fn is_match(&self, wire: &[u8]) -> bool {
        use std::os::unix::ffi::OsStrExt;
        let name = wire.rsplit(|b| *b == b'/').next().unwrap_or(wire);
        let as_path = |b: &[u8]| Path::new(std::ffi::OsStr::from_bytes(b)).to_path_buf();
        self.names.is_match(as_path(name)) || self.paths.is_match(as_path(wire))
    }
}

// ------------------------------------------------------------------ loading

/// Reads and validates a config file.
pub fn load(file: &Path) -> Result<Config, ConfigError> {
    let src = std::fs::read_to_string(file).map_err(|e| ConfigError {
        file: file.to_path_buf(),
        line: None,
        column: None,
        key: String::new(),
        message: format!("cannot read the config: {e}"),
        hint: Some(if e.kind() == std::io::ErrorKind::NotFound {
            format!("create a {DEFAULT_FILE} (see the README's reference), or pass --config PATH")
        } else {
            "check the file's permissions".into()
        }),
    })?;
    parse(file, &src)
}

/// Parses and validates config text; `file` locates relative paths and
/// names the file in errors.
pub fn parse(file: &Path, src: &str) -> Result<Config, ConfigError> {
    let raw: RawFile = serde_yaml::from_str(src).map_err(|e| from_yaml_error(file, src, &e))?;
    let dir = file.parent().map(Path::to_path_buf).unwrap_or_default();
    let dir = if dir.as_os_str().is_empty() { PathBuf::from(".") } else { dir };
    let dir = std::fs::canonicalize(&dir).unwrap_or(dir);
    let v = Validator { file, src };
    if let Some(ver) = raw.version {
        if ver != 1 {
            return Err(v.err(
                &["version"],
                format!("unsupported version {ver}"),
                Some("write `version: 1` or leave it out"),
            ));
        }
    }
    if raw.services.is_empty() {
        return Err(v.err(
            &["services"],
            "no services defined".into(),
            Some("add a service: see the README's devloop.yaml reference"),
        ));
    }
    let mut services = Vec::new();
    for (name, rs) in raw.services {
        services.push(v.service(&dir, &name, rs)?);
    }
    Ok(Config { file: file.to_path_buf(), services })
}

struct Validator<'a> {
    file: &'a Path,
    src: &'a str,
}

impl Validator<'_> {
    fn err(&self, key: &[&str], message: String, hint: Option<&str>) -> ConfigError {
        let line = locate(self.src, key);
        ConfigError {
            file: self.file.to_path_buf(),
            line,
            column: None,
            key: dotted(key),
            message,
            hint: hint.map(String::from),
        }
    }

    fn service(&self, dir: &Path, name: &str, rs: RawService) -> Result<Service, ConfigError> {
        let k = |rest: &[&str]| -> Vec<String> {
            let mut v = vec!["services".to_string(), name.to_string()];
            v.extend(rest.iter().map(|s| s.to_string()));
            v
        };
        let key = |rest: &[&str]| k(rest);
        let e = |rest: &[&str], msg: String, hint: Option<&str>| {
            let kk = key(rest);
            let refs: Vec<&str> = kk.iter().map(String::as_str).collect();
            self.err(&refs, msg, hint)
        };
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_') {
            return Err(e(&[], format!("service name `{name}` may only use letters, digits, `-` and `_`"), None));
        }
        let target = match rs.target.map(|t| t.0).unwrap_or_default() {
            RawTargetMap { local, exec, kubernetes }
                if [local.is_some(), exec.is_some(), kubernetes.is_some()].iter().filter(|x| **x).count() > 1 =>
            {
                return Err(e(&["target"], "give one target: `local`, `exec` or `kubernetes`".into(), None))
            }
            RawTargetMap { kubernetes: Some(k), .. } => {
                let found: Vec<PodSelector> = [
                    k.selector.map(PodSelector::Labels),
                    k.deployment.map(PodSelector::Deployment),
                    k.statefulset.map(PodSelector::StatefulSet),
                    k.pod.map(PodSelector::Pod),
                ]
                .into_iter()
                .flatten()
                .collect();
                let pods = match found.len() {
                    1 => found.into_iter().next().expect("one"),
                    0 => return Err(e(
                        &["target", "kubernetes"],
                        "no pods to sync into".into(),
                        Some("add one of `deployment: NAME`, `statefulset: NAME`, `selector: app=NAME` or `pod: NAME`"),
                    )),
                    _ => {
                        return Err(e(
                            &["target", "kubernetes"],
                            "give only one of `selector`, `deployment`, `statefulset` and `pod`".into(),
                            None,
                        ))
                    }
                };
                if !k.root.starts_with('/') || k.root.split('/').any(|c| c == "..") {
                    return Err(e(
                        &["target", "kubernetes", "root"],
                        format!("`{}` is not an absolute path in the container", k.root),
                        Some("write the directory the app reads, e.g. `root: /app`"),
                    ));
                }
                Target::Kubernetes(KubeTarget {
                    namespace: k.namespace,
                    pods,
                    container: k.container,
                    context: k.context,
                    root: k.root,
                    transport: k.transport.unwrap_or_default(),
                    helper_image: k.helper_image.unwrap_or_else(|| DEFAULT_HELPER_IMAGE.into()),
                })
            }
            RawTargetMap { exec: Some(x), .. } => {
                if x.command.is_empty() {
                    return Err(e(
                        &["target", "exec", "command"],
                        "empty command".into(),
                        Some("give the command that runs the agent on its stdio, e.g. [docker, exec, -i, -e, DEVLOOP_AGENT_TOKEN, CONTAINER, devloop-agent, serve, --stdio, --root, /app]"),
                    ));
                }
                Target::Exec { command: x.command, token: x.token.unwrap_or(TokenVia::Env) }
            }
            RawTargetMap { local, .. } => {
                let root = local.and_then(|l| l.root).unwrap_or_else(|| format!(".devloop/targets/{name}"));
                Target::Local { root: absolute(dir, &root) }
            }
        };
        if rs.sync.is_empty() {
            return Err(e(&["sync"], "no sync rules".into(), Some("add `- from: ./src` (and `to: path/in/target`)")));
        }
        let mut rules: Vec<SyncRule> = Vec::new();
        for (i, r) in rs.sync.into_iter().enumerate() {
            let idx = i.to_string();
            let from = absolute(dir, &r.from);
            let from = match std::fs::canonicalize(&from) {
                Ok(p) if p.is_dir() => p,
                Ok(_) => {
                    return Err(e(
                        &["sync", &idx, "from"],
                        format!("`{}` is not a directory", r.from),
                        Some("sync rules copy directories; give the directory that holds the file"),
                    ))
                }
                Err(_) => {
                    return Err(e(
                        &["sync", &idx, "from"],
                        format!("directory `{}` does not exist (looked in {})", r.from, from.display()),
                        Some("paths are relative to the directory of devloop.yaml"),
                    ))
                }
            };
            let to_raw = r.to.unwrap_or_else(|| ".".into());
            let to = normalize_to(&to_raw).map_err(|m| {
                e(&["sync", &idx, "to"], m, Some("write a path relative to the target's root, like `.` or `src`"))
            })?;
            for (j, pat) in r.exclude.iter().enumerate() {
                if let Err(err) = ignore::gitignore::GitignoreBuilder::new(&from).add_line(None, pat) {
                    return Err(e(
                        &["sync", &idx, "exclude", &j.to_string()],
                        format!("bad pattern `{pat}`: {err}"),
                        Some("excludes use .gitignore syntax"),
                    ));
                }
            }
            if let Some((j, other)) = rules.iter().enumerate().find(|(_, o)| {
                paths::is_within(o.to.as_bytes(), to.as_bytes()) || paths::is_within(to.as_bytes(), o.to.as_bytes())
            }) {
                return Err(e(
                    &["sync", &idx, "to"],
                    format!(
                        "`{to_raw}` overlaps sync rule {j} (to: `{}`)",
                        if other.to.is_empty() { "." } else { &other.to }
                    ),
                    Some("give each rule its own directory in the target"),
                ));
            }
            if let Target::Local { root } = &target {
                if root.starts_with(&from) || from.starts_with(root) {
                    return Err(e(
                        &["sync", &idx, "from"],
                        format!(
                            "the source `{}` and the local target root `{}` contain one another",
                            from.display(),
                            root.display()
                        ),
                        Some("put the target root outside the synced directory, e.g. under .devloop/"),
                    ));
                }
            }
            rules.push(SyncRule { from, to, exclude: r.exclude });
        }
        let mut on_sync = Vec::new();
        for (i, t) in rs.on_sync.into_iter().enumerate() {
            let idx = i.to_string();
            if t.when.0.is_empty() {
                return Err(e(&["on_sync", &idx, "when"], "no globs".into(), Some("e.g. `when: package.json`")));
            }
            let when = PathMatcher::new(&t.when.0)
                .map_err(|(j, m)| e(&["on_sync", &idx, "when"], format!("bad glob `{}`: {m}", t.when.0[j]), None))?;
            let command = command_spec(t.run, t.workdir).map_err(|(k, m)| e(&["on_sync", &idx, k], m, None))?;
            on_sync.push(Trigger { when, command });
        }
        let app = match rs.app {
            None => None,
            Some(a) => {
                let command = match (a.run, &target) {
                    (Some(run), _) => Some(command_spec(run, a.workdir).map_err(|(k, m)| e(&["app", k], m, None))?),
                    (None, Target::Kubernetes(KubeTarget { pods: PodSelector::Deployment(_) | PodSelector::StatefulSet(_), .. })) => None,
                    (None, Target::Kubernetes(_)) => return Err(e(
                        &["app"],
                        "restarting the container's own process needs the workload: devloop changes its pod template".into(),
                        Some("name it with `deployment: NAME` or `statefulset: NAME` in the kubernetes target, or give `run:` for a process the agent runs"),
                    )),
                    (None, _) => return Err(e(
                        &["app"],
                        "missing `run`".into(),
                        Some("give the command that runs the app, e.g. `run: [node, server.js]`"),
                    )),
                };
                let restart_when =
                    match a.restart_when {
                        None => None,
                        Some(w) => Some(PathMatcher::new(&w.0).map_err(|(j, m)| {
                            e(&["app", "restart_when"], format!("bad glob `{}`: {m}", w.0[j]), None)
                        })?),
                    };
                Some(App {
                    spec: command.map(|command| AppSpec {
                        command,
                        env: a.env.into_iter().collect(),
                        grace_ms: a.grace_ms.unwrap_or(2000),
                    }),
                    restart: a.restart,
                    restart_when,
                })
            }
        };
        let intercept = match rs.intercept {
            None => None,
            Some(i) => Some(self.intercept(&e, &target, i)?),
        };
        Ok(Service { name: name.to_string(), target, rules, on_sync, app, intercept })
    }
}

/// Makes a located error from a key path under the service, a message and
/// a hint.
type Located<'a> = &'a dyn Fn(&[&str], String, Option<&str>) -> ConfigError;

impl Validator<'_> {
    fn intercept(&self, e: Located, target: &Target, i: RawIntercept) -> Result<Intercept, ConfigError> {
        if matches!(target, Target::Exec { .. }) {
            return Err(e(
                &["intercept"],
                "the exec target cannot intercept".into(),
                Some("intercepts need a kubernetes target (or the local one, for trying it out)"),
            ));
        }
        if let Target::Kubernetes(KubeTarget { pods: PodSelector::Labels(_) | PodSelector::Pod(_), .. }) = target {
            return Err(e(
                &["intercept"],
                "intercepting needs the workload: devloop adds its forwarder to the pod template".into(),
                Some("give `deployment:` or `statefulset:` in the kubernetes target instead of `selector:` or `pod:`"),
            ));
        }
        if i.ports.is_empty() {
            return Err(e(&["intercept", "ports"], "no ports".into(), Some("e.g. `ports: [\"8080:3000\"]`")));
        }
        let mut ports = Vec::new();
        for (j, p) in i.ports.iter().enumerate() {
            let m = PortMap::parse(p).map_err(|m| e(&["intercept", "ports", &j.to_string()], m, None))?;
            if ports.iter().any(|o: &PortMap| o.service == m.service) {
                return Err(e(
                    &["intercept", "ports", &j.to_string()],
                    format!("service port `{}` is listed twice", m.service),
                    None,
                ));
            }
            ports.push(m);
        }
        let header = match i.header {
            None => None,
            Some(h) if h.len() == 1 => {
                let (n, v) = h.into_iter().next().expect("one entry");
                check_header(&n, &v).map_err(|m| e(&["intercept", "header"], m, None))?;
                Some((n, v))
            }
            Some(_) => {
                return Err(e(
                    &["intercept", "header"],
                    "give exactly one header".into(),
                    Some("e.g. `header: {x-dev: alice}`: only requests with it come to you"),
                ))
            }
        };
        let lease_ms = i.lease_ms.unwrap_or(DEFAULT_LEASE_MS);
        if !(500..=600_000).contains(&lease_ms) {
            return Err(e(
                &["intercept", "lease_ms"],
                format!("{lease_ms} ms is out of range"),
                Some("between 500 and 600000; the default is 3000"),
            ));
        }
        let local = matches!(target, Target::Local { .. });
        let (listen, fallback) = match (local, i.listen, i.fallback) {
            (true, None, _) => {
                return Err(e(
                    &["intercept"],
                    "the local target needs `listen:`, the address that stands in for the Service".into(),
                    Some("e.g. `listen: \"127.0.0.1:18080\"` with `ports: [\"18080:3000\"]`"),
                ))
            }
            (true, Some(l), fb) => {
                let (ip, port) = match l.parse::<std::net::SocketAddr>() {
                    Ok(a) => (a.ip(), Some(a.port())),
                    Err(_) => match l.parse::<std::net::IpAddr>() {
                        Ok(ip) => (ip, None),
                        Err(_) => {
                            return Err(e(&["intercept", "listen"], format!("`{l}` is not an ip or ip:port"), None))
                        }
                    },
                };
                for (j, p) in ports.iter().enumerate() {
                    if let PortRef::Name(n) = &p.service {
                        return Err(e(
                            &["intercept", "ports", &j.to_string()],
                            format!("`{n}`: the local target has no named ports"),
                            Some("give the port number that stands in for the Service's"),
                        ));
                    }
                }
                if let Some(port) = port {
                    if !ports.iter().any(|p| p.service == PortRef::Number(port)) {
                        return Err(e(
                            &["intercept", "listen"],
                            format!("port {port} of `{l}` is not among `ports`"),
                            Some("`listen` gives the address; each of `ports` is listened on there"),
                        ));
                    }
                }
                let fb = match fb {
                    None => None,
                    Some(f) => Some(f.parse::<std::net::SocketAddr>().map_err(|_| {
                        e(
                            &["intercept", "fallback"],
                            format!("`{f}` is not an ip:port"),
                            Some("the app's own address, e.g. `127.0.0.1:8080`"),
                        )
                    })?),
                };
                (Some(ip), fb)
            }
            (false, Some(_), _) => {
                return Err(e(
                    &["intercept", "listen"],
                    "only the local target takes `listen:`".into(),
                    Some("on Kubernetes the Service is steered: remove `listen:`"),
                ))
            }
            (false, None, Some(_)) => {
                return Err(e(
                    &["intercept", "fallback"],
                    "only the local target takes `fallback:`".into(),
                    Some("on Kubernetes the fallback is the app in the pod: remove `fallback:`"),
                ))
            }
            (false, None, None) => (None, None),
        };
        if local && i.service.is_some() {
            return Err(e(&["intercept", "service"], "the local target has no Services".into(), None));
        }
        Ok(Intercept { service: i.service, ports, header, lease_ms, listen, fallback })
    }
}

fn command_spec(run: RawCommand, workdir: Option<String>) -> Result<CommandSpec, (&'static str, String)> {
    let workdir = match workdir {
        None => String::new(),
        Some(w) => normalize_to(&w).map_err(|m| ("workdir", m))?,
    };
    match run {
        RawCommand::Shell(s) if s.trim().is_empty() => Err(("run", "empty command".into())),
        RawCommand::Shell(s) => Ok(CommandSpec { shell: Some(s), argv: vec![], workdir }),
        RawCommand::Argv(v) if v.is_empty() || v[0].is_empty() => Err(("run", "empty command".into())),
        RawCommand::Argv(v) => Ok(CommandSpec { shell: None, argv: v, workdir }),
    }
}

/// A target-relative directory in wire form; "." and "" are the root.
fn normalize_to(s: &str) -> Result<String, String> {
    let t = s.trim().trim_start_matches("./").trim_end_matches('/');
    if t.is_empty() || t == "." {
        return Ok(String::new());
    }
    paths::components(t.as_bytes()).map(|_| t.to_string()).map_err(|e| format!("`{s}`: {e}"))
}

fn absolute(dir: &Path, p: &str) -> PathBuf {
    let p = Path::new(p);
    if p.is_absolute() {
        p.to_path_buf()
    } else {
        dir.join(p.strip_prefix("./").unwrap_or(p))
    }
}

fn dotted<S: AsRef<str>>(key: &[S]) -> String {
    let mut out = String::new();
    for k in key {
        let k = k.as_ref();
        if k.parse::<usize>().is_ok() {
            out.push_str(&format!("[{k}]"));
        } else {
            if !out.is_empty() {
                out.push('.');
            }
            out.push_str(k);
        }
    }
    out
}

/// Turns a serde_yaml error into a located [`ConfigError`] with a hint.
fn from_yaml_error(file: &Path, src: &str, e: &serde_yaml::Error) -> ConfigError {
    let text = e.to_string();
    // serde_yaml renders "path.to.key: message at line L column C"; the
    // location is shown separately, so drop that suffix (only that one: a
    // syntax error also says where the unclosed thing started).
    let text = match e.location() {
        Some(l) => {
            let suffix = format!(" at line {} column {}", l.line(), l.column());
            text.strip_suffix(&suffix).map(String::from).unwrap_or(text)
        }
        None => text,
    };
    let (key, message) = match text.split_once(": ") {
        Some((k, m)) if !k.contains(' ') && !k.is_empty() => (k.to_string(), m.to_string()),
        _ => (String::new(), text.clone()),
    };
    let (mut line, column) = match e.location() {
        Some(l) => (Some(l.line()), Some(l.column())),
        None => (None, None),
    };
    let mut hint = None;
    if let Some(rest) = message.strip_prefix("unknown field `") {
        if let Some((bad, tail)) = rest.split_once('`') {
            let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            hint = Some(match closest(bad, &expected) {
                Some(s) => format!("did you mean `{s}`?"),
                None if !expected.is_empty() => format!("valid keys here: {}", expected.join(", ")),
                None => "remove this key".to_string(),
            });
        }
    } else if let Some(rest) = message.strip_prefix("unknown variant `") {
        if let Some((bad, tail)) = rest.split_once('`') {
            let expected: Vec<&str> = tail.split('`').skip(1).step_by(2).collect();
            if let Some(s) = closest(bad, &expected) {
                hint = Some(format!("did you mean `{s}`?"));
            }
        }
    } else if let Some(rest) = message.strip_prefix("missing field `") {
        let field = rest.trim_end_matches('`');
        hint = Some(match field {
            "sync" => "every service needs `sync:` with at least one `- from: DIR` rule".into(),
            "services" => "the file needs a top-level `services:` map".into(),
            "from" => "a sync rule needs `from:` (a directory relative to devloop.yaml)".into(),
            "run" => "add `run:` with a command (a string, or a list like [npm, start])".into(),
            "when" => "add `when:` with the globs that trigger the command".into(),
            "command" => "the exec target needs `command:` (a list)".into(),
            f => format!("add `{f}:`"),
        });
        // serde_yaml points at the end of the map; the key path is better.
        if !key.is_empty() {
            let parts: Vec<String> = key_path_parts(&key);
            let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
            line = locate(src, &refs).or(line);
        }
    } else if message.starts_with("invalid type") {
        hint = Some("check the value's shape against the README's devloop.yaml reference".into());
    }
    ConfigError { file: file.to_path_buf(), line, column, key, message, hint }
}

fn key_path_parts(key: &str) -> Vec<String> {
    let mut out = Vec::new();
    for part in key.split('.') {
        let mut p = part;
        while let Some(i) = p.find('[') {
            if i > 0 {
                out.push(p[..i].to_string());
            }
            let end = p[i..].find(']').map_or(p.len(), |j| i + j);
            out.push(p[i + 1..end].to_string());
            p = &p[(end + 1).min(p.len())..];
        }
        if !p.is_empty() {
            out.push(p.to_string());
        }
    }
    out
}

/// The candidate within edit distance 2 (or a third of the length) of `s`.
fn closest<'a>(s: &str, candidates: &[&'a str]) -> Option<&'a str> {
    candidates
        .iter()
        .map(|c| (levenshtein(s, c), *c))
        .filter(|(d, c)| *d <= 2.max(c.len() / 3))
        .min_by_key(|(d, _)| *d)
        .map(|(_, c)| c)
}

fn levenshtein(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut cur = vec![i + 1];
        for (j, cb) in b.iter().enumerate() {
            cur.push((prev[j] + usize::from(ca != *cb)).min(prev[j + 1] + 1).min(cur[j] + 1));
        }
        prev = cur;
    }
    prev[b.len()]
}

/// Finds the 1-based line of a key path (`["services", "web", "sync", "0",
/// "from"]`) in block-style YAML; the deepest part found wins, so a path
/// whose last key is absent points at its parent.
pub fn locate<S: AsRef<str>>(src: &str, key: &[S]) -> Option<usize> {
    let lines: Vec<&str> = src.lines().collect();
    let indent = |l: &str| l.len() - l.trim_start().len();
    let is_blank = |l: &str| {
        let t = l.trim();
        t.is_empty() || t.starts_with('#')
    };
    // (line index, indent of the block's children must exceed this)
    let mut start = 0usize;
    let mut parent_indent: isize = -1;
    let mut found = None;
    for seg in key {
        let seg = seg.as_ref();
        let mut hit = None;
        if let Ok(n) = seg.parse::<usize>() {
            let mut count = 0;
            for (i, l) in lines.iter().enumerate().skip(start) {
                if is_blank(l) {
                    continue;
                }
                let ind = indent(l) as isize;
                if i > start && ind <= parent_indent && !l.trim_start().starts_with("- ") {
                    break;
                }
                if ind > parent_indent - 1 && l.trim_start().starts_with("- ") || l.trim_start() == "-" {
                    if count == n {
                        hit = Some((i, ind + 1));
                        break;
                    }
                    count += 1;
                }
            }
        } else {
            for (i, l) in lines.iter().enumerate().skip(start) {
                if is_blank(l) {
                    continue;
                }
                let ind = indent(l) as isize;
                if i > start && ind <= parent_indent {
                    break;
                }
                let body = l.trim_start().trim_start_matches("- ");
                let k = body.split(':').next().unwrap_or("").trim().trim_matches('"').trim_matches('\'');
                if k == seg && body.contains(':') {
                    let key_indent = ind + (l.trim_start().len() - body.len()) as isize;
                    hit = Some((i, key_indent));
                    break;
                }
            }
        }
        match hit {
            Some((i, ind)) => {
                found = Some(i + 1);
                start = i;
                parent_indent = ind;
            }
            None => break,
        }
    }
    found
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locate_finds_nested_keys() {
        let src =
            "services:\n  web:\n    sync:\n      - from: a\n        to: x\n      - from: b\n    app:\n      run: x\n";
        assert_eq!(locate(src, &["services", "web", "sync", "1", "from"]), Some(6));
        assert_eq!(locate(src, &["services", "web", "sync", "0", "to"]), Some(5));
        assert_eq!(locate(src, &["services", "web", "app", "run"]), Some(8));
        assert_eq!(locate(src, &["services", "web", "nope"]), Some(2));
    }

    #[test]
    fn matcher_globs() {
        let m = PathMatcher::new(&["package.json".into(), "src/**/*.rs".into()]).unwrap();
        assert!(m.is_match(b"package.json"));
        assert!(m.is_match(b"sub/package.json"));
        assert!(m.is_match(b"src/a/b.rs"));
        assert!(!m.is_match(b"lib/a.rs"));
        assert!(m.is_match(b"src/\xff/b.rs"), "a name that is not UTF-8 matches like any other");
    }

    #[test]
    fn suggestions() {
        assert_eq!(closest("syn", &["target", "sync", "on_sync", "app"]), Some("sync"));
        assert_eq!(closest("zzzzzz", &["target", "sync"]), None);
        assert_eq!(key_path_parts("services.web.sync[0].from"), vec!["services", "web", "sync", "0", "from"]);
    }
}
