//! The forwarder (`devloop-forward`) on this machine, for an intercept on
//! the local target: it stands where the Service's traffic arrives (the
//! `listen` address), as the forwarder sidecar does in a pod, and it
//! outlives devloop the same way (its own session and process group), so a
//! killed devloop leaves the calls going to the `fallback` app.
//!
//! What runs is recorded in a state file beside the target's root: the
//! next start keeps a forwarder with the same routes (no gap), replaces one
//! with others; a clean exit and `devloop down` stop it and remove the
//! record.

use super::TargetError;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Environment variable naming the forwarder binary, overriding the search.
pub const FORWARD_BIN_ENV: &str = "DEVLOOP_FORWARD_BIN";
/// How long a starting forwarder may take to say it listens.
const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// What a running forwarder was started with.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub pid: u32,
    /// Its arguments: one `LISTEN=APP[+CLAIM]` per route.
    pub routes: Vec<String>,
    /// The agent's claim ports, by service port, kept across restarts so
    /// a forwarder that stays keeps pointing at the right place.
    pub claims: Vec<(u16, u16)>,
}

/// Where the record of a service's forwarder lives: beside its target root.
pub fn record_path(root: &Path) -> PathBuf {
    let name = root.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_else(|| "target".into());
    root.with_file_name(format!("{name}.intercept.json"))
}

pub fn read_record(path: &Path) -> Option<Record> {
    serde_json::from_slice(&std::fs::read(path).ok()?).ok()
}

/// Finds the forwarder (statically linked: the same binary serves this
/// machine and pods): `DEVLOOP_FORWARD_BIN`, then next to the devloop
/// executable (where `scripts/install` puts it), then where
/// `scripts/build-agent` builds it, then `PATH`.
pub fn binary() -> Result<PathBuf, TargetError> {
    super::local::find_binary(FORWARD_BIN_ENV, "devloop-forward", Some("devloop-forward"))
        .map_err(|looked| TargetError::ForwarderNotFound { looked })
}

/// Whether `pid` is a running forwarder (not a reused pid).
fn is_forwarder(pid: u32) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|c| c.split(|b| *b == 0).next().is_some_and(|argv0| argv0.ends_with(b"devloop-forward")))
        .unwrap_or(false)
}

/// Makes sure a forwarder runs with exactly `routes`: keeps the one the
/// record names if it does, else stops it and starts one.
pub async fn ensure(record: &Path, routes: Vec<String>, claims: Vec<(u16, u16)>) -> Result<Record, TargetError> {
    if let Some(r) = read_record(record) {
        if r.routes == routes && is_forwarder(r.pid) {
            return Ok(r);
        }
        stop(record);
    }
    let bin = binary()?;
    let log = record.with_extension("log");
    if let Some(dir) = record.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let out = std::fs::File::create(&log)
        .map_err(|source| TargetError::Spawn { command: bin.display().to_string(), source })?;
    let err = out.try_clone().map_err(|source| TargetError::Spawn { command: bin.display().to_string(), source })?;
    let mut cmd = std::process::Command::new(&bin);
    cmd.args(&routes).stdin(std::process::Stdio::null()).stdout(out).stderr(err);
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: setsid is async-signal-safe and touches no memory of the
        // parent; it detaches the forwarder from devloop's session and
        // terminal, so neither Ctrl-C nor devloop's death reaches it.
        unsafe {
            cmd.pre_exec(|| {
                libc::setsid();
                Ok(())
            });
        }
    }
    let child = cmd.spawn().map_err(|source| TargetError::Spawn { command: bin.display().to_string(), source })?;
    let pid = child.id();
    // Not waited for: it lives on by itself (init reaps it).
    drop(child);
    let t0 = Instant::now();
    loop {
        let said = std::fs::read_to_string(&log).unwrap_or_default();
        if said.matches("listening on").count() >= routes.len() {
            break;
        }
        if !is_forwarder(pid) || t0.elapsed() > READY_TIMEOUT {
            return Err(TargetError::Forwarder { message: said.trim().to_string(), log });
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let r = Record { pid, routes, claims };
    std::fs::write(record, serde_json::to_vec_pretty(&r).unwrap_or_default())
        .map_err(|source| TargetError::Spawn { command: format!("write {}", record.display()), source })?;
    Ok(r)
}

/// Stops the forwarder the record names (if it still runs) and removes
/// the record. Returns whether one was running.
pub fn stop(record: &Path) -> bool {
    let Some(r) = read_record(record) else { return false };
    let running = is_forwarder(r.pid);
    if running {
        // SAFETY: kill(2) has no memory effects; the pid was checked to
        // be a forwarder (a reused pid is left alone).
        unsafe { libc::kill(r.pid as libc::pid_t, libc::SIGTERM) };
    }
    let _ = std::fs::remove_file(record);
    let _ = std::fs::remove_file(record.with_extension("log"));
    running
}

/// A free port on loopback, for an agent's claim.
pub fn free_port() -> std::io::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}
