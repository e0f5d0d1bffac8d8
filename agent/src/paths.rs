//! The rules for paths that cross the wire. Both sides use them: the CLI so
//! that it never sends a path the agent would refuse, the agent so that no
//! client can make it touch anything outside its root (invariant 1).
//!
//! A path on the wire is bytes ([`WirePath`]), as Linux names are: a name
//! need not be UTF-8 (old archives, test fixtures, files other tools made),
//! and such a file must sync like any other. Every rule here works on bytes.

use std::borrow::Cow;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
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
    #[error("symlink target leaves the sync root")]
    LinkEscapes,
}

/// A root-relative, `/`-separated path as it crosses the wire ("" is the
/// root itself). In JSON it is a string when it is valid UTF-8 (nearly
/// always), else `{"hex": "..."}`, so no name is ever mangled.
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct WirePath(Vec<u8>);

impl WirePath {
    pub fn new(bytes: Vec<u8>) -> WirePath {
        WirePath(bytes)
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }

    pub fn into_bytes(self) -> Vec<u8> {
        self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn len(&self) -> usize {
        self.0.len()
    }

    /// The path as text, if it is valid UTF-8.
    pub fn to_str(&self) -> Option<&str> {
        std::str::from_utf8(&self.0).ok()
    }

    /// The path as text for people; a name that is not UTF-8 shows with
    /// replacement characters (see [`WirePath::is_utf8`]).
    pub fn lossy(&self) -> Cow<'_, str> {
        String::from_utf8_lossy(&self.0)
    }

    pub fn is_utf8(&self) -> bool {
        self.to_str().is_some()
    }

    /// As a relative filesystem path (Unix paths are bytes too).
    pub fn as_path(&self) -> &Path {
        Path::new(OsStr::from_bytes(&self.0))
    }

    /// `self/name` (or `name` when self is the root).
    pub fn join(&self, name: &[u8]) -> WirePath {
        WirePath(join_wire(&self.0, name))
    }

    /// The directory holding this path ("" for a top-level name); None for
    /// the root.
    pub fn parent(&self) -> Option<WirePath> {
        if self.0.is_empty() {
            return None;
        }
        Some(match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => WirePath(self.0[..i].to_vec()),
            None => WirePath::default(),
        })
    }

    /// The last name.
    pub fn file_name(&self) -> &[u8] {
        match self.0.iter().rposition(|b| *b == b'/') {
            Some(i) => &self.0[i + 1..],
            None => &self.0,
        }
    }

    /// True when this path is `dir` or lies below it.
    pub fn is_within(&self, dir: &WirePath) -> bool {
        is_within(&self.0, &dir.0)
    }

    /// The number of `/` in the path (0 for a top-level name).
    pub fn depth(&self) -> usize {
        self.0.iter().filter(|b| **b == b'/').count()
    }

    /// The first path after every path below this one, for range scans:
    /// `self/` sorts just before the children, `self0` (`'/' + 1`) just
    /// after them.
    pub fn children_start(&self) -> WirePath {
        let mut v = self.0.clone();
        v.push(b'/');
        WirePath(v)
    }
}

impl From<&str> for WirePath {
    fn from(s: &str) -> WirePath {
        WirePath(s.as_bytes().to_vec())
    }
}

impl From<String> for WirePath {
    fn from(s: String) -> WirePath {
        WirePath(s.into_bytes())
    }
}

impl From<Vec<u8>> for WirePath {
    fn from(b: Vec<u8>) -> WirePath {
        WirePath(b)
    }
}

impl From<&[u8]> for WirePath {
    fn from(b: &[u8]) -> WirePath {
        WirePath(b.to_vec())
    }
}

impl std::borrow::Borrow<[u8]> for WirePath {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl PartialEq<str> for WirePath {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for WirePath {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl std::fmt::Display for WirePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.lossy())
    }
}

impl std::fmt::Debug for WirePath {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.lossy())
    }
}

impl serde::Serialize for WirePath {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self.to_str() {
            Some(text) => s.serialize_str(text),
            None => {
                use serde::ser::SerializeMap;
                let mut m = s.serialize_map(Some(1))?;
                m.serialize_entry("hex", &hex(&self.0))?;
                m.end()
            }
        }
    }
}

impl<'de> serde::Deserialize<'de> for WirePath {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<WirePath, D::Error> {
        struct V;
        impl<'de> serde::de::Visitor<'de> for V {
            type Value = WirePath;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a path: a string, or {\"hex\": \"...\"} for a name that is not UTF-8")
            }
            fn visit_str<E: serde::de::Error>(self, s: &str) -> Result<WirePath, E> {
                Ok(WirePath::from(s))
            }
            fn visit_string<E: serde::de::Error>(self, s: String) -> Result<WirePath, E> {
                Ok(WirePath::from(s))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, mut m: A) -> Result<WirePath, A::Error> {
                let mut out = None;
                while let Some(k) = m.next_key::<String>()? {
                    if k != "hex" {
                        return Err(serde::de::Error::unknown_field(&k, &["hex"]));
                    }
                    let h: String = m.next_value()?;
                    out = Some(unhex(&h).ok_or_else(|| serde::de::Error::custom("`hex` is not hexadecimal"))?);
                }
                out.map(WirePath).ok_or_else(|| serde::de::Error::missing_field("hex"))
            }
        }
        d.deserialize_any(V)
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Checks a root-relative, `/`-separated path and returns its components.
pub fn components(path: &[u8]) -> Result<Vec<&[u8]>, BadPath> {
    if path.is_empty() {
        return Err(BadPath::Empty);
    }
    if path.len() > MAX_PATH {
        return Err(BadPath::TooLong);
    }
    if path.contains(&0) {
        return Err(BadPath::Nul);
    }
    if path[0] == b'/' {
        return Err(BadPath::Absolute);
    }
    let parts: Vec<&[u8]> = path.split(|b| *b == b'/').collect();
    for p in &parts {
        match *p {
            b"" => return Err(BadPath::EmptyComponent),
            b"." | b".." => return Err(BadPath::DotComponent),
            p if p.len() > MAX_NAME => return Err(BadPath::NameTooLong),
            _ => {}
        }
    }
    Ok(parts)
}

/// Checks that a symlink stored at `link_path` (root-relative) with target
/// `target` resolves, lexically, to a place inside the root. Absolute targets
/// are refused: inside a pod they would point at the container's own files.
/// (The CLI rewrites an absolute link into its own tree as a relative one
/// before it is sent.)
pub fn check_link_target(link_path: &[u8], target: &[u8]) -> Result<(), BadPath> {
    if target.is_empty() {
        return Err(BadPath::Empty);
    }
    if target[0] == b'/' {
        return Err(BadPath::LinkEscapes);
    }
    if target.len() > MAX_PATH || target.contains(&0) {
        return Err(BadPath::TooLong);
    }
    // Depth of the directory holding the link, then walk the target.
    let mut depth = components(link_path)?.len() as i64 - 1;
    for part in target.split(|b| *b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
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
pub fn to_wire(rel: &Path) -> Result<WirePath, BadPath> {
    let mut out = Vec::new();
    for c in rel.components() {
        match c {
            Component::Normal(n) => {
                if !out.is_empty() {
                    out.push(b'/');
                }
                out.extend_from_slice(n.as_bytes());
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
    Ok(WirePath(out))
}

/// Joins a checked wire path onto a root.
pub fn join(root: &Path, wire: &[u8]) -> Result<PathBuf, BadPath> {
    let mut p = root.to_path_buf();
    for c in components(wire)? {
        p.push(OsStr::from_bytes(c));
    }
    Ok(p)
}

/// Joins a wire prefix ("" = root) and a wire path.
pub fn join_wire(prefix: &[u8], rel: &[u8]) -> Vec<u8> {
    if prefix.is_empty() {
        rel.to_vec()
    } else {
        let mut v = Vec::with_capacity(prefix.len() + 1 + rel.len());
        v.extend_from_slice(prefix);
        v.push(b'/');
        v.extend_from_slice(rel);
        v
    }
}

/// True when `path` is `dir` or lies below it (wire paths; "" is the root).
pub fn is_within(path: &[u8], dir: &[u8]) -> bool {
    dir.is_empty() || path == dir || (path.starts_with(dir) && path.get(dir.len()) == Some(&b'/'))
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
            assert_eq!(components(p.as_bytes()).map(|c| c.len()), *want, "path {p:?}");
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
            assert_eq!(check_link_target(link.as_bytes(), target.as_bytes()).is_ok(), *ok, "{link} -> {target}");
        }
    }

    #[test]
    fn within() {
        assert!(is_within(b"a/b", b"a"));
        assert!(is_within(b"a", b"a"));
        assert!(!is_within(b"ab", b"a"));
        assert!(is_within(b"anything", b""));
    }

    #[test]
    fn wire_form() {
        assert_eq!(to_wire(Path::new("./a/b")).unwrap(), "a/b");
        // A name that is not UTF-8 is a name like any other.
        let odd = Path::new(OsStr::from_bytes(b"d/caf\xe9"));
        assert_eq!(to_wire(odd).unwrap().as_bytes(), b"d/caf\xe9");
        assert_eq!(to_wire(Path::new("../a")), Err(BadPath::DotComponent));
        assert_eq!(to_wire(Path::new("/a")), Err(BadPath::Absolute));
    }

    /// The path rules hold for bytes exactly as for text: a name that is not
    /// UTF-8 is allowed, and `..`, absolute paths, NUL and over-long names
    /// are refused whatever bytes surround them.
    #[test]
    fn path_rules_on_bytes() {
        let ok: &[&[u8]] = &[b"caf\xe9", b"d/\xff\xfe/x", b"\x80"];
        for p in ok {
            assert!(components(p).is_ok(), "{p:?}");
        }
        let long = [0xffu8; 256];
        let bad: &[(&[u8], BadPath)] = &[
            (b"\xff/../x", BadPath::DotComponent),
            (b"/\xff", BadPath::Absolute),
            (b"\xff\x00", BadPath::Nul),
            (b"\xff//x", BadPath::EmptyComponent),
            (&long, BadPath::NameTooLong),
        ];
        for (p, want) in bad {
            assert_eq!(components(p).err().as_ref(), Some(want), "{p:?}");
        }
        assert!(check_link_target(b"d/\xff", b"../\xfe").is_ok());
        assert_eq!(check_link_target(b"\xff", b"../\xfe"), Err(BadPath::LinkEscapes));
    }

    /// Text paths travel as JSON strings; others as hex, and come back the
    /// same bytes.
    #[test]
    fn wire_paths_round_trip_through_json() {
        for p in [WirePath::from("a/b.txt"), WirePath::from(&b"d/caf\xe9"[..]), WirePath::default()] {
            let j = serde_json::to_string(&p).unwrap();
            assert_eq!(serde_json::from_str::<WirePath>(&j).unwrap(), p, "{j}");
        }
        assert_eq!(serde_json::to_string(&WirePath::from("a")).unwrap(), "\"a\"");
        assert_eq!(serde_json::to_string(&WirePath::from(&b"\xff"[..])).unwrap(), "{\"hex\":\"ff\"}");
        assert!(serde_json::from_str::<WirePath>("{\"hex\":\"f\"}").is_err());
        assert_eq!(WirePath::from("a/b/c").parent(), Some(WirePath::from("a/b")));
        assert_eq!(WirePath::from("a").parent(), Some(WirePath::default()));
        assert_eq!(WirePath::from("a/b").file_name(), b"b");
    }
}
