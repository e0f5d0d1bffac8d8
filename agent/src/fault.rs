//! Fault injection for tests: `DEVLOOP_FAULTS=name,name` makes [`hit`]
//! true for those names, so a test can make a hashing thread panic or a
//! thread fail to start, and see what the real binaries do then. A name
//! may be scoped to one process, `cli:name` or `agent:name` (the agent
//! inherits the CLI's environment on the local target). Only debug builds
//! (the ones tests run) read the variable; in a release build [`hit`] is
//! always false.

use std::sync::OnceLock;

static SCOPE: OnceLock<&'static str> = OnceLock::new();

/// Names this process for scoped faults (`cli` or `agent`); call once at
/// startup.
pub fn set_scope(scope: &'static str) {
    let _ = SCOPE.set(scope);
}

/// Whether the fault `name` is switched on for this process.
pub fn hit(name: &str) -> bool {
    #[cfg(debug_assertions)]
    {
        static FAULTS: OnceLock<Vec<String>> = OnceLock::new();
        let scope = SCOPE.get().copied().unwrap_or("");
        FAULTS
            .get_or_init(|| {
                std::env::var("DEVLOOP_FAULTS")
                    .map(|v| v.split(',').map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect())
                    .unwrap_or_default()
            })
            .iter()
            .any(|f| match f.split_once(':') {
                Some((s, n)) => s == scope && n == name,
                None => f == name,
            })
    }
    #[cfg(not(debug_assertions))]
    {
        let _ = name;
        false
    }
}
