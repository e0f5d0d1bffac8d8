//! What every layer shares about errors: how a chain of causes is shown on
//! one line. Each subsystem has its own error type with a `hint()` that
//! says what to do, kept apart from the message.

/// An error and its sources, in one line: each layer says what it was
/// doing, its cause follows after a colon.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let c_text = c.to_string();
        // A layer that already says its cause (`#[error("...: {0}")]`)
        // need not say it twice.
        if !s.ends_with(&c_text) {
            s.push_str(": ");
            s.push_str(&c_text);
        }
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    #[derive(Debug, thiserror::Error)]
    #[error("cannot start the agent")]
    struct Outer(#[source] std::io::Error);

    #[test]
    fn causes_follow_on_one_line() {
        let e = Outer(std::io::Error::other("no such file"));
        assert_eq!(super::chain(&e), "cannot start the agent: no such file");
    }
}
