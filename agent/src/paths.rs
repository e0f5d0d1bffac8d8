//! The rules for paths that cross the wire. Both sides use them: the CLI so
//! that it never sends a path the agent would refuse, the agent so that no
//! client can make it touch anything outside its root (invariant 1).

use std::path::{Component, Path, PathBuf};

/// Longest path accepted, in bytes (Linux `PATH_MAX`).
pub const MAX_PATH: usize = 4096;
/// Longest single name accepted, in bytes (Linux `NAME_MAX`).
pub const MAX_NAME: usize = 255;

/// Why a path was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadPath {
    #[error("empty path")]
    Empty,
    #[error("absolute path (paths must be relative to the sync root)")]
    Absolute,
    #[error("path contains `..` or `.` (paths must stay inside the sync root)")]
    DotComponent,
    #[error("path contains an empty component (`//` or a trailing `/`)")]
    EmptyComponent,
    #[error("path contains a NUL byte")]
    Nul,
    #[error("path is longer than {MAX_PATH} bytes")]
    TooLong,
    #[error("a name in the path is longer than {MAX_NAME} bytes")]
    NameTooLong,
    #[error("path is not valid UTF-8")]
    NotUtf8,
    #[error("symlink target leaves the sync root")]
    LinkEscapes,
}

/// Checks a root-relative, `/`-separated path and returns its components.
pub fn components(path: &str) -> Result<Vec<&str>, BadPath> {
    if path.is_empty() {
        return Err(BadPath::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(BadPath::TooLong);
    }
    if path.contains('\0') {
        return Err(BadPath::Nul);
    }
    if path.starts_with('/') {
        return Err(BadPath::Absolute);
    }
    let parts: Vec<&str> = path.split('/').collect();
    for p in &parts {
        match *p {
            "" => return Err(BadPath::EmptyComponent),
            "." | ".." => return Err(BadPath::DotComponent),
            p if p.len() > MAX_NAME => return Err(BadPath::NameTooLong),
            _ => {}
        }
    }
    Ok(parts)
}

/// Checks that a symlink stored at `link_path` (root-relative) with target
/// `target` resolves, lexically, to a place inside the root. Absolute targets
/// are refused: inside a pod they would point at the container's own files.
pub fn check_link_target(link_path: &str, target: &str) -> Result<(), BadPath> {
    if target.is_empty() {
        return Err(BadPath::Empty);
    }
    if target.starts_with('/') {
        return Err(BadPath::LinkEscapes);
    }
    if target.len() > MAX_PATH || target.contains('\0') {
        return Err(BadPath::TooLong);
    }
    // Depth of the directory holding the link, then walk the target.
    let mut depth = components(link_path)?.len() as i64 - 1;
    for part in target.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                depth -= 1;
                if depth < 0 {
                    return Err(BadPath::LinkEscapes);
                }
            }
            _ => depth += 1,
        }
    }
    Ok(())
}

/// Turns a relative filesystem path into the wire form (`/`-separated).
pub fn to_wire(rel: &Path) -> Result<String, BadPath> {
    let mut out = String::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                if !out.is_empty() {
                    out.push('/');
                }
                out.push_str(n.to_str().ok_or(BadPath::NotUtf8)?);
            }
            Component::CurDir => {}
            Component::ParentDir => return Err(BadPath::DotComponent),
            Component::RootDir | Component::Prefix(_) => return Err(BadPath::Absolute),
        }
    }
    if out.is_empty() {
        return Err(BadPath::Empty);
    }
    components(&out)?;
    Ok(out)
}

/// Joins a checked wire path onto a root.
pub fn join(root: &Path, wire: &str) -> Result<PathBuf, BadPath> {
    let mut p = root.to_path_buf();
    for c in components(wire)? {
        p.push(c);
    }
    Ok(p)
}

/// Joins a wire prefix ("" = root) and a wire path.
pub fn join_wire(prefix: &str, rel: &str) -> String {
    if prefix.is_empty() {
        rel.to_string()
    } else {
        format!("{prefix}/{rel}")
    }
}

/// True when `path` is `dir` or lies below it (wire paths; "" is the root).
pub fn is_within(path: &str, dir: &str) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.as_bytes().get(dir.len()) == Some(&b'/'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_rules() {
        let long_name = "x".repeat(256);
        let long_path = vec!["abc"; 1100].join("/");
        let cases: &[(&str, Result<usize, BadPath>)] = &[
            ("a", Ok(1)),
            ("a/b/c.txt", Ok(3)),
            ("..hidden/ok", Ok(2)),
            ("", Err(BadPath::Empty)),
            ("/etc/passwd", Err(BadPath::Absolute)),
            ("../x", Err(BadPath::DotComponent)),
            ("a/../../x", Err(BadPath::DotComponent)),
            ("a/./b", Err(BadPath::DotComponent)),
            ("a//b", Err(BadPath::EmptyComponent)),
            ("a/", Err(BadPath::EmptyComponent)),
            ("a\0b", Err(BadPath::Nul)),
            (&long_name, Err(BadPath::NameTooLong)),
            (&long_path, Err(BadPath::TooLong)),
        ];
        for (p, want) in cases {
            assert_eq!(components(p).map(|c| c.len()), *want, "path {p:?}");
        }
    }

    #[test]
    fn link_rules() {
        let cases: &[(&str, &str, bool)] = &[
            ("a", "b", true),
            ("d/a", "../b", true),
            ("d/e/a", "../../b", true),
            ("a", "../b", false),
            ("d/a", "../../etc/passwd", false),
            ("d/a", "/etc/passwd", false),
            ("d/a", "x/../../..", false),
            ("d/a", "./.", true),
        ];
        for (link, target, ok) in cases {
            assert_eq!(check_link_target(link, target).is_ok(), *ok, "{link} -> {target}");
        }
    }

    #[test]
    fn within() {
        assert!(is_within("a/b", "a"));
        assert!(is_within("a", "a"));
        assert!(!is_within("ab", "a"));
        assert!(is_within("anything", ""));
    }

    #[test]
    fn wire_form() {
        assert_eq!(to_wire(Path::new("./a/b")).unwrap(), "a/b");
        assert_eq!(to_wire(Path::new("../a")), Err(BadPath::DotComponent));
        assert_eq!(to_wire(Path::new("/a")), Err(BadPath::Absolute));
    }
}
