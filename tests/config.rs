//! Every malformed devloop.yaml gets an error naming the file, the line and
//! the key, and a hint where one helps; devloop exits with code 2.

mod util;

/// (case, yaml, line, text the error must contain, hint it must contain)
const CASES: &[(&str, &str, usize, &str, &str)] = &[
    (
        "typo in a service key",
        "services:\n  s:\n    syn:\n      - from: src\n",
        3,
        "services.s: unknown field `syn`",
        "did you mean `sync`?",
    ),
    (
        "typo in a rule key",
        "services:\n  s:\n    sync:\n      - from: src\n        excludes: [a]\n",
        5,
        "services.s.sync[0]: unknown field `excludes`",
        "did you mean `exclude`?",
    ),
    (
        "unknown target",
        "services:\n  s:\n    target: lokal\n    sync:\n      - from: src\n",
        3,
        "services.s.target: unknown variant `lokal`",
        "did you mean `local`?",
    ),
    (
        "missing sync",
        "services:\n  s:\n    target: local\n",
        2,
        "services.s: missing field `sync`",
        "at least one `- from: DIR`",
    ),
    (
        "missing directory",
        "services:\n  s:\n    sync:\n      - from: src\n      - from: nope\n        to: other\n",
        5,
        "services.s.sync[1].from: directory `nope` does not exist",
        "relative to the directory of devloop.yaml",
    ),
    ("wrong shape", "services:\n  s:\n    sync: hello\n", 3, "services.s.sync: invalid type", "reference"),
    (
        "empty app command",
        "services:\n  s:\n    sync:\n      - from: src\n    app:\n      run: []\n",
        6,
        "services.s.app.run: empty command",
        "",
    ),
    (
        "overlapping rules",
        "services:\n  s:\n    sync:\n      - from: src\n        to: app\n      - from: src\n        to: app/sub\n",
        7,
        "services.s.sync[1].to: `app/sub` overlaps sync rule 0",
        "own directory",
    ),
    (
        "escaping target path",
        "services:\n  s:\n    sync:\n      - from: src\n        to: ../etc\n",
        5,
        "services.s.sync[0].to",
        "relative to the target's root",
    ),
    (
        "target root inside source",
        "services:\n  s:\n    target: {local: {root: src/out}}\n    sync:\n      - from: src\n",
        5,
        "contain one another",
        "outside the synced directory",
    ),
    (
        "bad exclude glob",
        "services:\n  s:\n    sync:\n      - from: src\n        exclude: [\"[z-a]\"]\n",
        5,
        "services.s.sync[0].exclude[0]: bad pattern",
        ".gitignore syntax",
    ),
    (
        "bad trigger glob",
        "services:\n  s:\n    sync:\n      - from: src\n    on_sync:\n      - when: \"{a\"\n        run: make\n",
        6,
        "services.s.on_sync[0].when: bad glob",
        "",
    ),
    (
        "empty exec command",
        "services:\n  s:\n    target:\n      exec:\n        command: []\n    sync:\n      - from: src\n",
        5,
        "services.s.target.exec.command: empty command",
        "devloop-agent, serve, --stdio",
    ),
    (
        "unsupported version",
        "version: 2\nservices:\n  s:\n    sync:\n      - from: src\n",
        1,
        "version: unsupported version 2",
        "version: 1",
    ),
    (
        "unknown kubernetes transport",
        "services:\n  s:\n    target:\n      kubernetes: {pod: p, root: /app, transport: portforward}\n    sync:\n      - from: src\n",
        4,
        "unknown variant `portforward`",
        "did you mean `port-forward`?",
    ),
    (
        "app without run on the local target",
        "services:\n  s:\n    sync:\n      - from: src\n    app: {restart: true}\n",
        5,
        "services.s.app: missing `run`",
        "run: [node, server.js]",
    ),
    (
        "restarting a container's process without its workload",
        "services:\n  s:\n    target:\n      kubernetes: {selector: app=web, root: /app}\n    sync:\n      - from: src\n    app: {}\n",
        7,
        "services.s.app: restarting the container's own process needs the workload",
        "deployment: NAME",
    ),
    ("no services", "services: {}\n", 1, "no services defined", "add a service"),
    ("bad service name", "services:\n  \"web app\":\n    sync:\n      - from: src\n", 2, "may only use letters", ""),
    (
        "yaml syntax",
        "services:\n  s:\n    sync:\n      - from: \"src\n",
        5,
        "while scanning a quoted scalar at line 4",
        "",
    ),
];

#[test]
fn malformed_configs_name_line_key_and_fix() {
    for (name, yaml, line, text, hint) in CASES {
        let p = util::Project::with_yaml(yaml);
        let out = p.cmd(&["check"]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{name}: exit code; stderr: {err}");
        let want = format!("devloop.yaml:{line}:");
        assert!(err.contains(&want), "{name}: expected {want} in: {err}");
        assert!(err.contains(text), "{name}: expected `{text}` in: {err}");
        assert!(
            hint.is_empty() || err.contains("hint: ") && err.contains(hint),
            "{name}: expected hint `{hint}` in: {err}"
        );
    }
}

#[test]
fn config_errors_are_structured_in_json_mode() {
    let p = util::Project::with_yaml("services:\n  s:\n    syn:\n      - from: src\n");
    let out = p.cmd(&["--json", "sync", "--once"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON object");
    assert_eq!(v["type"], "error");
    assert_eq!(v["line"], 3);
    assert_eq!(v["key"], "services.s");
    assert_eq!(v["hint"], "did you mean `sync`?");
}

#[test]
fn a_missing_config_says_how_to_fix_it() {
    let d = tempfile::tempdir().unwrap();
    let out = util::devloop().current_dir(d.path()).args(["watch"]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("devloop.yaml") && err.contains("--config"), "{err}");
}

#[test]
fn the_sample_config_is_valid() {
    let root = env!("CARGO_MANIFEST_DIR");
    let out = util::devloop().current_dir(root).args(["check"]).output().unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("hello: local:"));
}
