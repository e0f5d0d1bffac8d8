//! The embedded default target: the agent runs as a child process of
//! devloop and syncs into a directory on this machine. The demo and most
//! integration tests use it; it exercises the same agent and protocol as a
//! pod does.

use super::TargetError;
use std::path::{Path, PathBuf};
use tokio::process::Command;

/// Environment variable naming the agent binary, overriding the search.
pub const AGENT_BIN_ENV: &str = "DEVLOOP_AGENT_BIN";

/// Finds the agent binary: `DEVLOOP_AGENT_BIN`, then next to the devloop
/// executable (where `cargo build` and `cargo install` put it), then `PATH`.
pub fn agent_binary() -> Result<PathBuf, TargetError> {
    find_binary(AGENT_BIN_ENV, "devloop-agent", None).map_err(|looked| TargetError::AgentNotFound { looked })
}

/// Finds one of devloop's binaries: the variable `env` if set, then `name`
/// next to the devloop executable, then (for the statically linked ones
/// that `scripts/build-agent` builds, `built`) in the cargo target
/// directory devloop was built in, then `name` on `PATH`. Err says where
/// it looked.
pub fn find_binary(env: &str, name: &str, built: Option<&str>) -> Result<PathBuf, String> {
    let mut looked = Vec::new();
    if let Some(p) = std::env::var_os(env) {
        let p = PathBuf::from(p);
        if p.is_file() {
            return Ok(p);
        }
        looked.push(format!("{env}={}", p.display()));
    }
    let mut candidates = Vec::new();
    if let Some(dir) = std::env::current_exe().ok().and_then(|e| e.parent().map(Path::to_path_buf)) {
        // Test binaries live one level down, in target/<profile>/deps.
        let ups = [dir.clone(), dir.join("..")];
        candidates.extend(ups.iter().map(|d| d.join(name)));
        if let Some(built) = built {
            candidates.extend(ups.iter().map(|d| d.join("../x86_64-unknown-linux-gnu/agent").join(built)));
        }
        looked.push(dir.display().to_string());
    }
    if let Some(path) = std::env::var_os("PATH") {
        candidates.extend(std::env::split_paths(&path).map(|d| d.join(name)));
        looked.push("PATH".into());
    }
    candidates.into_iter().find(|p| p.is_file()).ok_or_else(|| looked.join(", "))
}

/// The command that runs the agent over stdio, syncing into `root`.
pub fn command(root: &Path) -> Result<Command, TargetError> {
    let mut c = Command::new(agent_binary()?);
    c.arg("serve").arg("--stdio").arg("--root").arg(root);
    // The target's hash cache beside the source's (else the agent's default).
    if let Some(d) = crate::cache_dir() {
        c.arg("--cache-dir").arg(d.join("target-hashes"));
    }
    Ok(c)
}
