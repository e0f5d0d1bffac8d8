//! The exec target: a user-given command whose stdin/stdout are the agent's
//! (`docker exec -i CONTAINER devloop-agent serve --stdio --root /app`,
//! `ssh host devloop-agent serve --stdio --token-stdin --root /srv/app`).
//! The token goes through the command's environment or its first stdin line,
//! never its arguments.

use tokio::process::Command;

/// Builds the command from the config's argv (validated non-empty).
pub fn command(argv: &[String]) -> Command {
    let mut c = Command::new(&argv[0]);
    c.args(&argv[1..]);
    c
}
