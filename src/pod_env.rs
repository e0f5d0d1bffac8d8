//! The local process sees the pod's world. `devloop env` prints the target
//! container's environment; `devloop run SERVICE -- CMD` starts CMD with
//! it, and for every Service the environment names (Kubernetes gives each
//! container `NAME_SERVICE_HOST` and `NAME_SERVICE_PORT`, and the
//! docker-link style `NAME_PORT_P_TCP*`), listens on a loopback port here
//! and carries each connection through the agent, which dials the real
//! Service from inside the pod. CMD gets the local addresses in their
//! place: no VPN, no root on this machine.

use crate::config::{Service, Target};
use crate::endpoint::{kubernetes, Endpoint};
use crate::events::{Kind, Reporter};
use crate::session::Mode;
use crate::supervisor::{self, Conn};
use std::collections::BTreeMap;
use std::sync::Arc;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

/// Variables of the pod that stay this machine's: the command runs here,
/// with this machine's programs, home and terminal.
const KEPT_LOCAL: &[&str] =
    &["PATH", "HOME", "HOSTNAME", "PWD", "OLDPWD", "SHLVL", "TERM", "USER", "LOGNAME", "SHELL", "TMPDIR", "_"];

/// How `devloop env` prints.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EnvFormat {
    Dotenv,
    Json,
}

/// Why the pod's world could not be reached.
#[derive(Debug)]
pub struct Unreached {
    pub message: String,
    pub hint: Option<String>,
}

/// The endpoint to reach for a service: the local or exec target's, or the
/// first ready pod of a Kubernetes target.
async fn endpoint(svc: &Service) -> Result<Endpoint, Unreached> {
    let fail = |e: kubernetes::KubeError| Unreached { message: crate::error::chain(&e), hint: e.hint() };
    match &svc.target {
        Target::Local { .. } | Target::Exec { .. } => {
            Ok(Endpoint::of(&svc.target).expect("a local or exec target has an endpoint"))
        }
        Target::Kubernetes(k) => {
            let cluster = kubernetes::connect(k).await.map_err(fail)?;
            let agent = Arc::new(kubernetes::agent_image().map_err(fail)?);
            let pods = kubernetes::ready_pods(&cluster, &k.pods).await.map_err(fail)?;
            let Some(pod) = pods.first() else {
                return Err(Unreached {
                    message: format!("no ready pods for {} in namespace {}", k.pods, cluster.namespace),
                    hint: Some("check that the workload is running (and ready), and the target's namespace".into()),
                });
            };
            Ok(Endpoint::Pod(Arc::new(kubernetes::PodEndpoint::new(cluster, pod, k, agent))))
        }
    }
}

/// Connects to the service's agent and keeps it connected until
/// `cancel` (`mode` Once: gives up after the first failure). Returns the
/// connection's state, once it is first up.
async fn reach(
    svc: &Service,
    mode: Mode,
    rep: Reporter,
    cancel: CancellationToken,
) -> Result<watch::Receiver<Conn>, Unreached> {
    let ep = endpoint(svc).await?;
    let (tx, mut rx) = watch::channel(Conn::Connecting);
    tokio::spawn(supervisor::supervise(ep, mode, rep, cancel, tx));
    loop {
        let state = match &*rx.borrow_and_update() {
            Conn::Up(_) => Some(true),
            Conn::Failed => Some(false),
            Conn::Connecting => None,
        };
        match state {
            Some(true) => return Ok(rx),
            Some(false) => {
                return Err(Unreached {
                    message: "cannot reach the agent (the errors above say why)".into(),
                    hint: None,
                })
            }
            None => {}
        }
        if rx.changed().await.is_err() {
            return Err(Unreached { message: "cannot reach the agent".into(), hint: None });
        }
    }
}

fn current(conn: &watch::Receiver<Conn>) -> Option<crate::client::AgentClient> {
    match &*conn.borrow() {
        Conn::Up(c) if !c.is_ended() => Some(c.clone()),
        _ => None,
    }
}

/// A reporter whose errors and warnings (and, for `run`, the agent's
/// comings and goings) go to stderr, so stdout stays the command's.
fn stderr_reporter(service: &str, chatty: bool) -> Reporter {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<crate::events::Event>();
    tokio::spawn(async move {
        while let Some(ev) = rx.recv().await {
            let shown = match &ev.kind {
                Kind::Error { .. } | Kind::Warning { .. } => true,
                Kind::AgentConnected { .. } | Kind::AgentLost { .. } | Kind::Reconnecting { .. } => chatty,
                _ => false,
            };
            if shown {
                eprintln!("devloop: {}", crate::events::plain(&ev));
            }
        }
    });
    Reporter::new(service, tx)
}

/// The target container's environment (without devloop's session token).
async fn pod_env(
    svc: &Service,
    mode: Mode,
    rep: Reporter,
    cancel: CancellationToken,
) -> Result<(Vec<(String, String)>, watch::Receiver<Conn>), Unreached> {
    let conn = reach(svc, mode, rep, cancel).await?;
    let client = current(&conn).ok_or_else(|| Unreached { message: "the agent went away".into(), hint: None })?;
    let mut vars = client.env().await.map_err(|e| Unreached { message: crate::error::chain(&e), hint: e.hint() })?;
    vars.sort();
    Ok((vars, conn))
}

/// `devloop env`: prints the environment; returns whether it could.
pub async fn print_env(svc: &Service, format: EnvFormat) -> Result<(), Unreached> {
    let cancel = CancellationToken::new();
    let got = pod_env(svc, Mode::Once, stderr_reporter(&svc.name, false), cancel.clone()).await;
    cancel.cancel();
    let (vars, _) = got?;
    print!("{}", render(&vars, format));
    Ok(())
}

/// An environment as dotenv lines or one JSON object.
pub fn render(vars: &[(String, String)], format: EnvFormat) -> String {
    match format {
        EnvFormat::Json => {
            let map: BTreeMap<&str, &str> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            format!("{}\n", serde_json::to_string_pretty(&map).unwrap_or_default())
        }
        EnvFormat::Dotenv => vars.iter().map(|(k, v)| format!("{k}={}\n", dotenv_quote(v))).collect(),
    }
}

/// A value as dotenv readers read it back: double-quoted, with `\`, `"`,
/// `$` and backquotes escaped (so `sh` reads it back too) and newlines as
/// `\n` (which dotenv readers expand and `sh` does not).
fn dotenv_quote(v: &str) -> String {
    let mut out = String::with_capacity(v.len() + 2);
    out.push('"');
    for c in v.chars() {
        match c {
            '\\' | '"' | '$' | '`' => {
                out.push('\\');
                out.push(c);
            }
            '\n' => out.push_str("\\n"),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// One cluster address the environment names, and the variables that
/// name it.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Remote {
    pub host: String,
    pub port: u16,
}

/// The Services the environment names: `NAME_SERVICE_HOST` with each of
/// `NAME_SERVICE_PORT` and `NAME_SERVICE_PORT_<PORTNAME>`.
pub fn services(vars: &[(String, String)]) -> Vec<Remote> {
    let mut out = Vec::new();
    for (k, host) in vars {
        let Some(name) = k.strip_suffix("_SERVICE_HOST") else { continue };
        let prefix = format!("{name}_SERVICE_PORT");
        for (pk, pv) in vars {
            if pk == &prefix || pk.strip_prefix(&prefix).is_some_and(|rest| rest.starts_with('_')) {
                if let Ok(port) = pv.parse() {
                    out.push(Remote { host: host.clone(), port });
                }
            }
        }
    }
    out.sort();
    out.dedup();
    out
}

/// The environment with each Service's address replaced by its local
/// one (`local` maps each remote address to a loopback port here).
pub fn rewrite(vars: &[(String, String)], local: &BTreeMap<Remote, u16>) -> Vec<(String, String)> {
    let hosts: BTreeMap<&str, ()> = local.keys().map(|r| (r.host.as_str(), ())).collect();
    let port_of = |host: &str, port: &str| -> Option<u16> {
        let port: u16 = port.parse().ok()?;
        local.get(&Remote { host: host.to_string(), port }).copied()
    };
    let get = |k: &str| vars.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
    vars.iter()
        .map(|(k, v)| {
            let new = if k.ends_with("_SERVICE_HOST") {
                hosts.contains_key(v.as_str()).then(|| "127.0.0.1".to_string())
            } else if let Some((name, _)) = k.split_once("_SERVICE_PORT") {
                get(&format!("{name}_SERVICE_HOST")).and_then(|h| port_of(&h, v)).map(|p| p.to_string())
            } else if let Some(addr) = v.strip_prefix("tcp://") {
                // NAME_PORT and NAME_PORT_P_TCP: tcp://HOST:PORT.
                addr.rsplit_once(':').and_then(|(h, p)| port_of(h, p)).map(|p| format!("tcp://127.0.0.1:{p}"))
            } else if let Some(rest) = k.strip_suffix("_TCP_ADDR") {
                // NAME_PORT_P_TCP_ADDR: the host of port P.
                rest.rsplit_once("_PORT_").and_then(|(_, p)| port_of(v, p)).map(|_| "127.0.0.1".to_string())
            } else if let Some(rest) = k.strip_suffix("_TCP_PORT") {
                rest.rsplit_once("_PORT_").and_then(|(name, p)| {
                    let host = get(&format!("{name}_PORT_{p}_TCP_ADDR"))?;
                    port_of(&host, v).map(|l| l.to_string())
                })
            } else {
                None
            };
            (k.clone(), new.unwrap_or_else(|| v.clone()))
        })
        .collect()
}

/// Listens here for one remote address and carries each connection
/// through whichever agent connection is up.
async fn tunnel(l: tokio::net::TcpListener, remote: Remote, conn: watch::Receiver<Conn>, rep: Reporter) {
    let mut said = false;
    loop {
        let Ok((tcp, _)) = l.accept().await else { continue };
        let Some(client) = current(&conn) else {
            if !said {
                rep.send(Kind::Warning {
                    message: format!(
                        "a connection for {}:{} came while the agent is away; closed (devloop reconnects)",
                        remote.host, remote.port
                    ),
                });
                said = true;
            }
            continue;
        };
        said = false;
        match client.dial(&remote.host, remote.port) {
            Ok(stream) => {
                tokio::spawn(async move {
                    devloop_agent::mux::splice(stream, tcp).await;
                });
            }
            Err(e) => rep.send(Kind::Warning { message: format!("{}:{}: {e}", remote.host, remote.port) }),
        }
    }
}

/// `devloop run`: starts `argv` with the pod's environment and its
/// Services tunnelled; returns the command's exit code.
pub async fn run(svc: &Service, argv: &[String]) -> Result<i32, Unreached> {
    let cancel = CancellationToken::new();
    let rep = stderr_reporter(&svc.name, true);
    let (vars, conn) = pod_env(svc, Mode::Watch, rep.clone(), cancel.clone()).await?;
    let mut local = BTreeMap::new();
    for r in services(&vars) {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Unreached { message: format!("cannot listen on loopback: {e}"), hint: None })?;
        let port = l.local_addr().map(|a| a.port()).unwrap_or(0);
        local.insert(r.clone(), port);
        tokio::spawn(tunnel(l, r, conn.clone(), rep.clone()));
    }
    let env = rewrite(&vars, &local);
    let shown: Vec<String> = local.iter().map(|(r, p)| format!("{}:{} → 127.0.0.1:{p}", r.host, r.port)).collect();
    if !shown.is_empty() {
        eprintln!("devloop: the pod's Services, through its agent: {}", shown.join(", "));
    }
    let mut cmd = tokio::process::Command::new(&argv[0]);
    cmd.args(&argv[1..]);
    for (k, v) in &env {
        if !KEPT_LOCAL.contains(&k.as_str()) {
            cmd.env(k, v);
        }
    }
    let mut child = cmd.spawn().map_err(|e| Unreached {
        message: format!("cannot start `{}`: {e}", argv[0]),
        hint: Some("check the command after `--`".into()),
    })?;
    // Ctrl-C reaches the command from the terminal (same process group):
    // devloop waits for it to end. SIGTERM is passed on.
    let code = {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate()).ok();
        let mut int = signal(SignalKind::interrupt()).ok();
        loop {
            tokio::select! {
                s = child.wait() => break s,
                Some(_) = async { term.as_mut()?.recv().await } => {
                    if let Some(pid) = child.id() {
                        // SAFETY: signalling our own child.
                        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
                    }
                }
                Some(_) = async { int.as_mut()?.recv().await } => {}
            }
        }
    };
    cancel.cancel();
    let status = code.map_err(|e| Unreached { message: format!("waiting for `{}`: {e}", argv[0]), hint: None })?;
    use std::os::unix::process::ExitStatusExt;
    Ok(status.code().unwrap_or_else(|| 128 + status.signal().unwrap_or(0)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(v: &[(&str, &str)]) -> Vec<(String, String)> {
        v.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn every_way_kubernetes_names_a_service_points_here() {
        let env = vars(&[
            ("API_SERVICE_HOST", "10.0.0.7"),
            ("API_SERVICE_PORT", "80"),
            ("API_SERVICE_PORT_GRPC", "9090"),
            ("API_PORT", "tcp://10.0.0.7:80"),
            ("API_PORT_80_TCP", "tcp://10.0.0.7:80"),
            ("API_PORT_80_TCP_ADDR", "10.0.0.7"),
            ("API_PORT_80_TCP_PORT", "80"),
            ("API_PORT_80_TCP_PROTO", "tcp"),
            ("API_PORT_9090_TCP_ADDR", "10.0.0.7"),
            ("API_PORT_9090_TCP_PORT", "9090"),
            ("DATABASE_URL", "postgres://db:5432/x"),
            ("PATH", "/pod/bin"),
        ]);
        let remotes = services(&env);
        assert_eq!(
            remotes,
            [Remote { host: "10.0.0.7".into(), port: 80 }, Remote { host: "10.0.0.7".into(), port: 9090 }]
        );
        let local: BTreeMap<Remote, u16> = [(remotes[0].clone(), 41000), (remotes[1].clone(), 41001)].into();
        let got: BTreeMap<String, String> = rewrite(&env, &local).into_iter().collect();
        assert_eq!(got["API_SERVICE_HOST"], "127.0.0.1");
        assert_eq!(got["API_SERVICE_PORT"], "41000");
        assert_eq!(got["API_SERVICE_PORT_GRPC"], "41001");
        assert_eq!(got["API_PORT"], "tcp://127.0.0.1:41000");
        assert_eq!(got["API_PORT_80_TCP"], "tcp://127.0.0.1:41000");
        assert_eq!(got["API_PORT_80_TCP_ADDR"], "127.0.0.1");
        assert_eq!(got["API_PORT_80_TCP_PORT"], "41000");
        assert_eq!(got["API_PORT_80_TCP_PROTO"], "tcp");
        assert_eq!(got["API_PORT_9090_TCP_ADDR"], "127.0.0.1");
        assert_eq!(got["API_PORT_9090_TCP_PORT"], "41001");
        assert_eq!(got["DATABASE_URL"], "postgres://db:5432/x", "other values are the pod's, untouched");
        assert_eq!(got["PATH"], "/pod/bin", "rewrite leaves the choice of what stays local to run");
    }

    #[test]
    fn dotenv_values_read_back_as_they_were() {
        let env = vars(&[("A", "plain"), ("B", "quote \" dollar $HOME back\\slash `tick`")]);
        let text = render(&env, EnvFormat::Dotenv);
        assert_eq!(text, "A=\"plain\"\nB=\"quote \\\" dollar \\$HOME back\\\\slash \\`tick\\`\"\n");
        let out = std::process::Command::new("sh").arg("-c").arg(format!("{text}printf %s \"$B\"")).output().unwrap();
        assert_eq!(
            String::from_utf8_lossy(&out.stdout),
            "quote \" dollar $HOME back\\slash `tick`",
            "sh reads it back"
        );
        let lines = render(&vars(&[("C", "one\ntwo")]), EnvFormat::Dotenv);
        assert_eq!(lines, "C=\"one\\ntwo\"\n", "one line per variable");
        let json: serde_json::Value = serde_json::from_str(&render(&env, EnvFormat::Json)).unwrap();
        assert_eq!(json["B"], "quote \" dollar $HOME back\\slash `tick`");
    }
}
