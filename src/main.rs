//! The `devloop` command line.

use clap::{Parser, Subcommand};
use devloop::config::{self, Config};
use devloop::events::{self, Format, Kind};
use devloop::service;
use devloop::session::{Mode, Outcome};
use devloop::tasks::Tasks;
use std::path::PathBuf;
use std::process::ExitCode;
use tokio_util::sync::CancellationToken;

/// Exit codes, documented in the README: editors and scripts rely on them.
mod exit {
    /// Everything in sync (or stopped cleanly by the user).
    pub const OK: u8 = 0;
    /// Some paths could not be synced.
    pub const NOT_IN_SYNC: u8 = 1;
    /// The configuration is invalid (or the command line).
    pub const CONFIG: u8 = 2;
    /// A target could not be reached.
    pub const UNREACHABLE: u8 = 3;
    /// devloop itself failed (a task panicked: a bug, reported as such).
    pub const INTERNAL: u8 = 4;
}

#[derive(Parser)]
#[command(name = "devloop", version, about = "Hot sync into running containers and pods, with an in-target agent")]
struct Cli {
    /// The configuration file.
    #[arg(long, short = 'c', global = true, default_value = config::DEFAULT_FILE)]
    config: PathBuf,
    /// Print events as NDJSON (one JSON object per line) for editors and scripts.
    #[arg(long, global = true)]
    json: bool,
    /// Plain lines instead of the dashboard (which `watch` shows on a terminal).
    #[arg(long, global = true)]
    no_tui: bool,
    /// Kubernetes targets: use this kubeconfig context (overrides `context:`).
    #[arg(long, global = true)]
    context: Option<String>,
    /// Kubernetes targets: use this namespace (overrides `namespace:`).
    #[arg(long, short = 'n', global = true)]
    namespace: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Sync, then follow every change until Ctrl-C (the main job).
    Watch {
        /// Only these services (default: all).
        services: Vec<String>,
    },
    /// Sync once and exit; the exit code says whether the target is in sync.
    Sync {
        /// Required: sync once and exit (`devloop watch` follows changes).
        #[arg(long)]
        once: bool,
        /// Only these services (default: all).
        services: Vec<String>,
    },
    /// Check devloop.yaml and print what it resolves to.
    Check,
    /// Check that each target can be used: agent binaries, cluster access,
    /// the RBAC verbs devloop needs (printing the minimal Role if any is missing).
    Doctor {
        /// Only these services (default: all).
        services: Vec<String>,
    },
    /// Route the calls that reach a service to a process on this machine,
    /// with no sync, until Ctrl-C (then they go back to the app).
    Intercept {
        /// The service in devloop.yaml.
        service: String,
        /// SERVICE_PORT:LOCAL_PORT (repeatable): replaces the service's
        /// `intercept.ports`.
        #[arg(long = "port", value_name = "SVC:LOCAL")]
        ports: Vec<String>,
        /// NAME=VALUE: only the HTTP/1.1 requests with this header (a
        /// personal intercept).
        #[arg(long, value_name = "NAME=VALUE")]
        header: Option<String>,
    },
    /// Print the target container's environment (the first ready pod's).
    Env {
        /// The service in devloop.yaml.
        service: String,
        /// dotenv (NAME="value" lines) or json (one object).
        #[arg(long, value_enum, default_value = "dotenv")]
        format: EnvFormatArg,
    },
    /// Run a command here with the target container's environment; the
    /// cluster Services it names are reached through the agent, at local
    /// addresses put in their place.
    Run {
        /// The service in devloop.yaml.
        service: String,
        /// The command and its arguments (after `--`).
        #[arg(last = true, required = true, value_name = "CMD")]
        command: Vec<String>,
    },
    /// What the running `devloop watch` (on this devloop.yaml) is doing
    /// (--json: its whole state).
    Status,
    /// Ask the running `devloop watch` to act on a service: `resync`,
    /// `restart`, `run N` (its Nth on_sync command, or one whose command
    /// contains N), `intercept on|off`.
    Trigger {
        service: String,
        /// resync, restart, run, intercept
        action: String,
        /// For `run`: which command; for `intercept`: on or off.
        arg: Option<String>,
        /// Only this pod of the service.
        #[arg(long)]
        pod: Option<String>,
    },
    /// Print shell completions (bash, zsh, fish, elvish, powershell).
    Completions { shell: clap_complete::Shell },
    /// Remove what devloop put into targets (agents injected into pods).
    /// Safe to run twice, and after a crash.
    Down {
        /// Only these services (default: all).
        services: Vec<String>,
    },
}

#[derive(Clone, Copy, clap::ValueEnum)]
enum EnvFormatArg {
    Dotenv,
    Json,
}

/// One malloc arena (glibc), unless `DEVLOOP_MALLOC_ARENAS` says how
/// many (0: glibc's default, up to 8 per core). Each thread that contends
/// gets an arena of its own by default, and what the scan threads, the
/// runtime's workers and its blocking threads free stays spread over
/// them: on a 100k-file tree the CLI held 109 MiB after its first sync
/// and grew 65% over 20 reconnects; with one arena, 36 MiB and under 1%.
fn limit_malloc_arenas() {
    #[cfg(target_env = "gnu")]
    {
        let n = std::env::var("DEVLOOP_MALLOC_ARENAS").ok().and_then(|v| v.parse::<i32>().ok()).unwrap_or(1);
        if n > 0 {
            // SAFETY: mallopt only sets an allocator parameter; it runs
            // before any other thread exists.
            unsafe { libc::mallopt(libc::M_ARENA_MAX, n) };
        }
    }
}

fn main() -> ExitCode {
    limit_malloc_arenas();
    devloop_agent::fault::set_scope("cli");
    devloop_agent::mux::raise_open_files_limit();
    let cli = match Cli::try_parse() {
        Ok(c) => c,
        Err(e) => {
            let _ = e.print();
            return ExitCode::from(if e.use_stderr() { exit::CONFIG } else { exit::OK });
        }
    };
    let format = if cli.json { Format::Json } else { Format::Plain };
    if let Command::Completions { shell } = cli.command {
        clap_complete::generate(
            shell,
            &mut <Cli as clap::CommandFactory>::command(),
            "devloop",
            &mut std::io::stdout(),
        );
        return ExitCode::from(exit::OK);
    }
    let cfg = match config::load(&cli.config) {
        Ok(c) => c,
        Err(e) => {
            report_fatal(format, &e.to_string(), e.hint.as_deref(), Some(&e));
            return ExitCode::from(exit::CONFIG);
        }
    };
    let cfg = override_kube(cfg, cli.context, cli.namespace);
    let mut intercept_only = false;
    let (mode, only, cfg) = match cli.command {
        Command::Doctor { services } => return admin(cfg, &services, format, true),
        Command::Down { services } => return admin(cfg, &services, format, false),
        Command::Env { service, format: f } => {
            let f = match f {
                EnvFormatArg::Dotenv => devloop::pod_env::EnvFormat::Dotenv,
                EnvFormatArg::Json => devloop::pod_env::EnvFormat::Json,
            };
            return pod_world(cfg, &service, format, |svc| async move {
                devloop::pod_env::print_env(&svc, f).await.map(|()| exit::OK as i32)
            });
        }
        Command::Run { service, command } => {
            return pod_world(cfg, &service, format, |svc| async move { devloop::pod_env::run(&svc, &command).await });
        }
        Command::Status => return status(&cfg, format),
        Command::Trigger { service, action, arg, pod } => return trigger(&cfg, &service, &action, arg, pod, format),
        Command::Completions { .. } => unreachable!("handled before the config is read"),
        Command::Watch { services } => (Mode::Watch, services, cfg),
        Command::Sync { once: true, services } => (Mode::Once, services, cfg),
        Command::Intercept { service, ports, header } => {
            match intercept_config(cfg, &service, &ports, header.as_deref()) {
                Ok(cfg) => {
                    intercept_only = true;
                    (Mode::Watch, vec![service], cfg)
                }
                Err((m, hint)) => {
                    report_fatal(format, &m, Some(&hint), None);
                    return ExitCode::from(exit::CONFIG);
                }
            }
        }
        Command::Sync { once: false, .. } => {
            report_fatal(
                format,
                "`devloop sync` needs --once",
                Some("use `devloop sync --once` to sync and exit, or `devloop watch` to follow changes"),
                None,
            );
            return ExitCode::from(exit::CONFIG);
        }
        Command::Check => {
            for s in &cfg.services {
                println!(
                    "{}: {} ({} sync rules, {} post-sync commands, app: {})",
                    s.name,
                    s.target.describe(),
                    s.rules.len(),
                    s.on_sync.len(),
                    if s.app.is_some() { "yes" } else { "no" }
                );
            }
            return ExitCode::from(exit::OK);
        }
    };
    let (cfg, rt) = match prepare(cfg, &only, format) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let tui = mode == Mode::Watch && devloop::ui::wanted(cli.no_tui, cli.json);
    ExitCode::from(rt.block_on(run(cfg, mode, intercept_only, format, tui)))
}

/// A runtime for the short commands (status, trigger).
fn small_runtime() -> std::io::Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_current_thread().enable_all().build()
}

/// `devloop status`.
fn status(cfg: &Config, format: Format) -> ExitCode {
    let Ok(rt) = small_runtime() else { return ExitCode::from(exit::INTERNAL) };
    match rt.block_on(devloop::control::ask(&cfg.file, &devloop::control::Request::Status)) {
        Ok(reply) => {
            match format {
                Format::Json => println!("{}", serde_json::to_string(&reply).unwrap_or_default()),
                Format::Plain => {
                    let state: devloop::state::State =
                        reply.state.clone().and_then(|s| serde_json::from_value(s).ok()).unwrap_or_default();
                    println!("devloop (pid {}) on {}", reply.pid.unwrap_or(0), cfg.file.display());
                    print!("{}", devloop::control::describe(&state, events::now_ms()));
                }
            }
            ExitCode::from(exit::OK)
        }
        Err(e) => {
            report_fatal(format, &e.message, e.hint.as_deref(), None);
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// `devloop trigger SERVICE ACTION [ARG]`.
fn trigger(
    cfg: &Config,
    service: &str,
    action: &str,
    arg: Option<String>,
    pod: Option<String>,
    format: Format,
) -> ExitCode {
    use devloop::hub::ActionKind;
    let kind = match (action, arg.as_deref()) {
        ("resync", None) => Ok(ActionKind::Resync),
        ("restart", None) => Ok(ActionKind::Restart),
        ("intercept", Some("on")) => Ok(ActionKind::Intercept { on: true }),
        ("intercept", Some("off")) => Ok(ActionKind::Intercept { on: false }),
        ("intercept", _) => Err("`intercept` takes on or off".to_string()),
        ("run", Some(which)) => on_sync_index(cfg, service, which).map(|index| ActionKind::Run { index }),
        ("run", None) => Err("`run` takes which on_sync command: its number (1 is the first) or part of it".into()),
        ("resync" | "restart", Some(a)) => Err(format!("`{action}` takes no argument (got `{a}`)")),
        (other, _) => Err(format!("no action `{other}`")),
    };
    let kind = match kind {
        Ok(k) => k,
        Err(m) => {
            report_fatal(format, &m, Some("actions: resync, restart, run N, intercept on|off"), None);
            return ExitCode::from(exit::CONFIG);
        }
    };
    let Ok(rt) = small_runtime() else { return ExitCode::from(exit::INTERNAL) };
    let req = devloop::control::Request::Trigger { service: service.to_string(), pod, action: kind };
    match rt.block_on(devloop::control::ask(&cfg.file, &req)) {
        Ok(reply) => {
            match format {
                Format::Json => println!("{}", serde_json::to_string(&reply).unwrap_or_default()),
                Format::Plain if reply.ok => println!("{}", reply.message.clone().unwrap_or_default()),
                Format::Plain => eprintln!("devloop: failed: {}", reply.message.clone().unwrap_or_default()),
            }
            ExitCode::from(if reply.ok { exit::OK } else { exit::NOT_IN_SYNC })
        }
        Err(e) => {
            report_fatal(format, &e.message, e.hint.as_deref(), None);
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// Which on_sync command `run WHICH` names: 1-based, or the one command
/// whose text contains WHICH.
fn on_sync_index(cfg: &Config, service: &str, which: &str) -> Result<usize, String> {
    let Some(svc) = cfg.services.iter().find(|s| s.name == service) else {
        return Err(format!("no service `{service}` in {}", cfg.file.display()));
    };
    let shown: Vec<String> = svc.on_sync.iter().map(|t| t.command.display()).collect();
    if let Ok(n) = which.parse::<usize>() {
        return match n {
            1.. if n <= shown.len() => Ok(n - 1),
            _ => Err(format!("service `{service}` has {} on_sync commands; {n} is not one of them", shown.len())),
        };
    }
    let found: Vec<usize> = (0..shown.len()).filter(|i| shown[*i].contains(which)).collect();
    match found.as_slice() {
        [i] => Ok(*i),
        [] => Err(format!("no on_sync command of `{service}` contains `{which}` (they are: {})", shown.join("; "))),
        _ => Err(format!("several on_sync commands of `{service}` contain `{which}`: give its number")),
    }
}

/// The configuration with one service's intercept set from the command
/// line (`devloop intercept SERVICE --port ... --header ...`).
fn intercept_config(
    mut cfg: Config,
    service: &str,
    ports: &[String],
    header: Option<&str>,
) -> Result<Config, (String, String)> {
    let Some(svc) = cfg.services.iter_mut().find(|s| s.name == service) else {
        let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
        return Err((
            format!("no service `{service}` in {}", cfg.file.display()),
            format!("name one of: {}", known.join(", ")),
        ));
    };
    if matches!(svc.target, config::Target::Exec { .. }) {
        return Err((
            format!("service `{service}` has an exec target, which cannot intercept"),
            "intercepts need a kubernetes target (or the local one)".into(),
        ));
    }
    if let config::Target::Kubernetes(k) = &svc.target {
        if devloop::endpoint::workload::Workload::of(&k.pods).is_none() {
            return Err((
                format!("service `{service}`: intercepting needs the workload (devloop adds its forwarder to the pod template)"),
                "give `deployment:` or `statefulset:` in its kubernetes target instead of `selector:` or `pod:`".into(),
            ));
        }
    }
    let parsed: Result<Vec<config::PortMap>, String> = ports.iter().map(|p| config::PortMap::parse(p)).collect();
    let parsed = parsed.map_err(|m| (m, "e.g. --port 8080:3000 (service port : local port)".to_string()))?;
    let header =
        header.map(config::parse_header).transpose().map_err(|m| (m, "e.g. --header x-dev=alice".to_string()))?;
    let local = matches!(svc.target, config::Target::Local { .. });
    let mut i = match (svc.intercept.take(), parsed.is_empty()) {
        (Some(i), _) => i,
        (None, true) => {
            return Err((
                format!("service `{service}` has no `intercept:` in {}", cfg.file.display()),
                "give the ports: --port SERVICE_PORT:LOCAL_PORT".into(),
            ))
        }
        (None, false) => config::Intercept {
            service: None,
            ports: Vec::new(),
            header: None,
            lease_ms: config::DEFAULT_LEASE_MS,
            listen: local.then_some(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST)),
            fallback: None,
        },
    };
    if !parsed.is_empty() {
        if local && parsed.iter().any(|p| matches!(p.service, config::PortRef::Name(_))) {
            return Err(("the local target has no named ports".into(), "give port numbers".into()));
        }
        i.ports = parsed;
    }
    if header.is_some() {
        i.header = header;
    }
    svc.intercept = Some(i);
    Ok(cfg)
}

/// The selected services and a runtime to run them on, or the exit code
/// of why not (reported).
fn prepare(cfg: Config, only: &[String], format: Format) -> Result<(Config, tokio::runtime::Runtime), ExitCode> {
    let cfg = select(cfg, only).map_err(|m| {
        report_fatal(format, &m, Some("name services defined in devloop.yaml"), None);
        ExitCode::from(exit::CONFIG)
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build().map_err(|e| {
        report_fatal(format, &format!("cannot start the runtime: {e}"), None, None);
        ExitCode::FAILURE
    })?;
    Ok((cfg, rt))
}

/// `env` and `run`: one service's pod world; the exit code is the
/// command's (for `run`), or devloop's own when the pod cannot be reached.
fn pod_world<F, Fut>(cfg: Config, service: &str, format: Format, f: F) -> ExitCode
where
    F: FnOnce(config::Service) -> Fut,
    Fut: std::future::Future<Output = Result<i32, devloop::pod_env::Unreached>>,
{
    let (mut cfg, rt) = match prepare(cfg, &[service.to_string()], format) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let svc = cfg.services.remove(0);
    match rt.block_on(f(svc)) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            report_fatal(format, &e.message, e.hint.as_deref(), None);
            ExitCode::from(exit::UNREACHABLE)
        }
    }
}

/// `doctor` (check) or `down` (undo), service by service.
fn admin(cfg: Config, only: &[String], format: Format, check: bool) -> ExitCode {
    let (cfg, rt) = match prepare(cfg, only, format) {
        Ok(x) => x,
        Err(code) => return code,
    };
    let ok = rt.block_on(async {
        let mut ok = true;
        for s in &cfg.services {
            ok &= if check { devloop::doctor::check(s).await } else { devloop::doctor::down(s).await };
        }
        ok
    });
    ExitCode::from(if ok { exit::OK } else { exit::NOT_IN_SYNC })
}

/// Applies `--context` and `--namespace` to every Kubernetes target.
fn override_kube(mut cfg: Config, context: Option<String>, namespace: Option<String>) -> Config {
    for s in &mut cfg.services {
        if let config::Target::Kubernetes(k) = &mut s.target {
            if let Some(c) = &context {
                k.context = Some(c.clone());
            }
            if let Some(n) = &namespace {
                k.namespace = Some(n.clone());
            }
        }
    }
    cfg
}

fn select(mut cfg: Config, only: &[String]) -> Result<Config, String> {
    if only.is_empty() {
        return Ok(cfg);
    }
    for name in only {
        if !cfg.services.iter().any(|s| &s.name == name) {
            let known: Vec<&str> = cfg.services.iter().map(|s| s.name.as_str()).collect();
            return Err(format!("no service `{name}` in {} (services: {})", cfg.file.display(), known.join(", ")));
        }
    }
    cfg.services.retain(|s| only.contains(&s.name));
    Ok(cfg)
}

/// Reports an error that stops devloop before any service runs.
fn report_fatal(format: Format, message: &str, hint: Option<&str>, cfg: Option<&config::ConfigError>) {
    match format {
        Format::Json => {
            let mut v = serde_json::json!({
                "ts": events::now_ms(),
                "service": "",
                "type": "error",
                "message": message.lines().next().unwrap_or(message),
                "hint": hint,
            });
            if let Some(c) = cfg {
                v["file"] = serde_json::json!(c.file.display().to_string());
                v["line"] = serde_json::json!(c.line);
                v["column"] = serde_json::json!(c.column);
                v["key"] = serde_json::json!(c.key);
                v["message"] = serde_json::json!(c.message);
            }
            println!("{v}");
        }
        Format::Plain => {
            eprintln!("devloop: error: {message}");
            if cfg.is_none() {
                if let Some(h) = hint {
                    eprintln!("  hint: {h}");
                }
            }
        }
    }
}

async fn run(cfg: Config, mode: Mode, intercept_only: bool, format: Format, tui: bool) -> u8 {
    // One `watch` per configuration: the control socket says whether
    // another runs, and is how `status` and `trigger` reach this one.
    let control = match mode {
        Mode::Watch => match devloop::control::bind(&cfg.file).await {
            Ok(c) => Some(c),
            Err(e) => {
                report_fatal(format, &e.message, e.hint.as_deref(), None);
                return if e.running { exit::CONFIG } else { exit::UNREACHABLE };
            }
        },
        Mode::Once => None,
    };
    let hub = devloop::hub::start();
    let cancel = CancellationToken::new();
    let control_stop = CancellationToken::new();
    let control = control.map(|(listener, path)| {
        tokio::spawn(devloop::control::serve(listener, path, hub.clone(), control_stop.clone()))
    });
    // The dashboard, or the plain (or NDJSON) printer.
    let ui_crashed = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let printer = if tui {
        let ui_crashed = ui_crashed.clone();
        let title = format!("devloop {} · {}", if intercept_only { "intercept" } else { "watch" }, cfg.file.display());
        let log = devloop::ui::log_path(&cfg.file);
        tokio::spawn({
            let (hub, cancel) = (hub.clone(), cancel.clone());
            async move {
                // Its own task: a panic in it (unwound: the terminal is
                // already given back) stops devloop cleanly too.
                let ui = tokio::spawn(devloop::ui::run(hub, title, log.clone(), cancel.clone()));
                match ui.await {
                    Ok(Ok(log)) => eprintln!("devloop: the log of this run is in {}", log.display()),
                    Ok(Err(e)) => {
                        eprintln!("devloop: the dashboard failed ({e}); run with --no-tui for plain lines");
                        cancel.cancel();
                    }
                    Err(e) => {
                        eprintln!(
                            "devloop: the dashboard crashed ({}): a bug; devloop stops. Its log: {}; --no-tui gives plain lines",
                            if e.is_panic() { "panic" } else { "cancelled" },
                            log.display()
                        );
                        ui_crashed.store(true, std::sync::atomic::Ordering::Relaxed);
                        cancel.cancel();
                    }
                }
            }
        })
    } else {
        let Some((_, events)) = hub.subscribe().await else { return exit::INTERNAL };
        tokio::spawn(events::print(events, format))
    };
    // Ctrl-C, SIGTERM and SIGHUP (the terminal closed) stop every service
    // cleanly: what devloop changed is put back.
    let signals = tokio::spawn({
        let cancel = cancel.clone();
        async move {
            use tokio::signal::unix::{signal, SignalKind};
            if let (Ok(mut t), Ok(mut i), Ok(mut h)) =
                (signal(SignalKind::terminate()), signal(SignalKind::interrupt()), signal(SignalKind::hangup()))
            {
                tokio::select! { _ = t.recv() => {}, _ = i.recv() => {}, _ = h.recv() => {} }
                cancel.cancel();
            }
        }
    });
    // Subscribed before any service starts: they miss nothing.
    let names: Vec<String> = cfg.services.iter().map(|s| s.name.clone()).collect();
    if let (Some((_, ready_rx)), Some((_, problems_rx))) = (hub.subscribe().await, hub.subscribe().await) {
        tokio::spawn(devloop::hub::announce_ready(hub.clone(), ready_rx, names, intercept_only));
        tokio::spawn(devloop::problems::follow(hub.clone(), problems_rx, cfg.services.clone()));
    }
    let mut services: Tasks<Outcome> = Tasks::new(cancel.clone(), hub.reporter(""));
    let mut reporters = std::collections::HashMap::new();
    for svc in cfg.services {
        let rep = hub.reporter(&svc.name);
        let actions = hub.register(&svc.name);
        let name = format!("the session of service {}", svc.name);
        reporters.insert(name.clone(), rep.clone());
        let work = service::Work { sync: !intercept_only, intercept: mode == Mode::Watch && svc.intercept.is_some() };
        services.spawn(name, service::run(svc, mode, work, rep, cancel.child_token(), actions));
    }
    let mut code = exit::OK;
    while let Some((name, outcome)) = services.next().await {
        let outcome = outcome.unwrap_or(Outcome::Panicked);
        let c = match outcome {
            Outcome::InSync | Outcome::Stopped => exit::OK,
            Outcome::PathErrors(_) => exit::NOT_IN_SYNC,
            Outcome::Unreachable => exit::UNREACHABLE,
            Outcome::Panicked => exit::INTERNAL,
        };
        if let (Some(message), Some(rep)) = (outcome.describe(), reporters.get(&name)) {
            rep.send(Kind::Warning { message });
        }
        code = code.max(c);
    }
    signals.abort();
    control_stop.cancel();
    if let Some(c) = control {
        let _ = c.await;
    }
    hub.close().await;
    let _ = printer.await;
    if ui_crashed.load(std::sync::atomic::Ordering::Relaxed) {
        code = code.max(exit::INTERNAL);
    }
    code
}
