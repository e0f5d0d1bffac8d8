//! Problems at the developer's own file and line: real output of real
//! compilers and linters (tests/fixtures/problems, captured in a
//! directory standing for the target's root), read line by line as a
//! post-sync command's output arrives, and mapped back through the sync
//! rules to the source files. Then end to end: a post-sync command's
//! output in a real `devloop watch` becomes `problem` events.

mod util;

use devloop::problems::{Mapper, Parser, Severity};
use std::path::{Path, PathBuf};
use std::time::Duration;
use util::*;

/// The target's root the fixtures were captured in.
const ROOT: &str = "/tmp/fx";

/// The source tree the fixtures' files came from, recreated locally:
/// `src/` and `rs/`, synced to the same names under the root.
fn tree() -> (tempfile::TempDir, Mapper) {
    let d = tempfile::tempdir().unwrap();
    for f in ["src/app.ts", "src/lib/util.js", "src/main.go", "src/app.py", "src/bad.py", "rs/src/main.rs"] {
        let p = d.path().join(f);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, "").unwrap();
    }
    let m = Mapper::from_rules([("src".to_string(), d.path().join("src")), ("rs".to_string(), d.path().join("rs"))]);
    (d, m)
}

type Want = (&'static str, u32, Option<u32>, Severity, &'static str);

fn check(fixture: &str, workdir: &str, want: &[Want]) {
    let (d, m) = tree();
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/problems").join(fixture);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut p = Parser::new();
    let mut got = Vec::new();
    for line in text.lines() {
        if let Some(f) = p.feed(line) {
            let local = f.at.iter().find_map(|(file, l, c)| m.local(file, ROOT, workdir).map(|x| (x, *l, *c)));
            let (file, l, c) = local.unwrap_or_else(|| panic!("{fixture}: {f:?} maps to no source file"));
            got.push((file, l, c, f.severity, f.message));
        }
    }
    assert_eq!(got.len(), want.len(), "{fixture}: found {got:#?}");
    for (g, w) in got.iter().zip(want) {
        assert_eq!(g.0, d.path().join(w.0), "{fixture}: the local file of {g:?}");
        assert_eq!((g.1, g.2, g.3), (w.1, w.2, w.3), "{fixture}: line, column, severity of {g:?}");
        assert!(g.4.starts_with(w.4), "{fixture}: the message of {g:?} should start with {:?}", w.4);
    }
}

#[test]
fn tsc() {
    check(
        "tsc.txt",
        "",
        &[
            ("src/app.ts", 1, Some(7), Severity::Error, "TS2322: Type 'string' is not assignable"),
            ("src/app.ts", 2, Some(34), Severity::Error, "TS2339: Property 'foo' does not exist"),
        ],
    );
}

#[test]
fn eslint_stylish() {
    check(
        "eslint.txt",
        "",
        &[
            (
                "src/lib/util.js",
                1,
                Some(5),
                Severity::Error,
                "'unused' is assigned a value but never used (no-unused-vars)",
            ),
            ("src/lib/util.js", 2, Some(5), Severity::Error, "'a' is not defined (no-undef)"),
            ("src/lib/util.js", 2, Some(7), Severity::Warning, "Expected '===' and instead saw '==' (eqeqeq)"),
        ],
    );
}

#[test]
fn cargo_errors_and_warnings() {
    check("cargo.txt", "rs", &[("rs/src/main.rs", 2, Some(18), Severity::Error, "E0308: mismatched types")]);
    check("cargo_warning.txt", "rs", &[("rs/src/main.rs", 2, Some(9), Severity::Warning, "unused variable: `unused`")]);
}

#[test]
fn go_vet_and_build() {
    check(
        "go.txt",
        "src",
        &[
            ("src/main.go", 7, Some(2), Severity::Error, "undeclared name: undefinedThing"),
            ("src/main.go", 3, Some(8), Severity::Error, "imported and not used: \"os\""),
            ("src/main.go", 6, Some(2), Severity::Error, "x declared but not used"),
            ("src/main.go", 7, Some(2), Severity::Error, "undefined: undefinedThing"),
        ],
    );
}

#[test]
fn python_tracebacks_point_at_the_innermost_frame() {
    check("python.txt", "", &[("src/app.py", 4, None, Severity::Error, "KeyError: 'missing'")]);
    check("python_syntax.txt", "", &[("src/bad.py", 1, None, Severity::Error, "SyntaxError: invalid syntax")]);
}

#[test]
fn paths_outside_the_synced_tree_and_prose_are_not_problems() {
    let (_d, m) = tree();
    // A dependency in the target, a system file, `..` out of the root.
    assert_eq!(m.local("/tmp/fx/node_modules/x/index.js", ROOT, ""), None);
    assert_eq!(m.local("/usr/lib/python3/json.py", ROOT, ""), None);
    assert_eq!(m.local("../../etc/passwd", ROOT, "src"), None);
    let mut p = Parser::new();
    for line in [
        "Listening on http://localhost:3000/",
        "12:30:45 server started",
        "error: could not compile `fx` (bin \"fx\") due to 1 previous error",
        "Done in 3.2s.",
        "",
        "✖ 3 problems (2 errors, 1 warning)",
    ] {
        assert_eq!(p.feed(line), None, "{line:?}");
    }
}

/// A post-sync command in a real session prints a problem at a target
/// path: devloop reports it at the local file, and the plain line is
/// the matcher's `file:line:col: severity: message`.
#[test]
fn a_post_sync_commands_problems_reach_the_events_at_local_paths() {
    let p = Project::with_yaml(
        "services:\n  svc:\n    target: {local: {root: out}}\n    sync:\n      - from: src\n        to: app\n    on_sync:\n      - when: \"*.ts\"\n        run: \"echo 'app/x.ts(3,5): error TS2322: Type is wrong.'\"\n        workdir: \".\"\n",
    );
    p.write("x.ts", b"let x = 1;\n");
    let mut w = p.watch();
    let v = w.wait_event("problem", Duration::from_secs(30));
    let local = std::fs::canonicalize(p.src().join("x.ts")).unwrap();
    assert_eq!(Path::new(v["file"].as_str().unwrap()), local, "{v}");
    assert_eq!((v["line"].as_u64(), v["column"].as_u64(), v["severity"].as_str()), (Some(3), Some(5), Some("error")));
    assert_eq!(v["message"], "TS2322: Type is wrong.");
    let ready = w.wait_first("ready", Duration::from_secs(30));
    assert_eq!(ready["services"], 1);
    assert_eq!(w.interrupt(), 0);
}
