//! The VS Code tasks in examples/vscode/tasks.json, against the output of
//! a real `devloop watch --no-tui` session: the background task's first
//! cycle ends at `ready` (so dependent tasks wait for it), each later sync
//! is one cycle, and the problem matcher finds exactly the problems the
//! session reported, at the same local file, line and column.

mod util;

use regex::Regex;
use std::io::{BufRead, BufReader};
use std::process::Stdio;
use std::sync::mpsc;
use std::time::{Duration, Instant};
use util::*;

const T: Duration = Duration::from_secs(30);

/// tasks.json is JSON with `//` comments (as VS Code reads it).
fn tasks() -> serde_json::Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/vscode/tasks.json");
    let text = std::fs::read_to_string(path).unwrap();
    let json: String = text.lines().filter(|l| !l.trim_start().starts_with("//")).map(|l| format!("{l}\n")).collect();
    serde_json::from_str(&json).unwrap()
}

fn task<'a>(t: &'a serde_json::Value, label: &str) -> &'a serde_json::Value {
    t["tasks"].as_array().unwrap().iter().find(|x| x["label"] == label).unwrap()
}

fn re(v: &serde_json::Value) -> Regex {
    Regex::new(v.as_str().unwrap()).unwrap()
}

#[test]
fn the_tasks_match_a_real_sessions_lines() {
    let t = tasks();
    let watch = task(&t, "devloop watch");
    assert_eq!(watch["args"], serde_json::json!(["watch", "--no-tui"]));
    let m = &watch["problemMatcher"];
    let pattern = re(&m["pattern"]["regexp"]);
    let begins = re(&m["background"]["beginsPattern"]);
    let ends = re(&m["background"]["endsPattern"]);
    // The one-shot task uses the same pattern.
    assert_eq!(task(&t, "devloop sync once")["problemMatcher"]["pattern"], m["pattern"]);

    let p = Project::with_yaml(
        "services:\n  svc:\n    target: {local: {root: out}}\n    sync:\n      - from: src\n        to: app\n    on_sync:\n      - when: \"*.ts\"\n        run: \"echo 'app/x.ts(3,5): error TS2322: Type is wrong.'; echo 'app/x.ts:7: warning: unused'\"\n",
    );
    p.write("x.ts", b"let x = 1;\n");
    let mut child = p.cmd(&["watch", "--no-tui"]).stdout(Stdio::piped()).stderr(Stdio::null()).spawn().unwrap();
    let (tx, rx) = mpsc::channel();
    let out = child.stdout.take().unwrap();
    std::thread::spawn(move || {
        for l in BufReader::new(out).lines().map_while(Result::ok) {
            let _ = tx.send(l);
        }
    });
    let mut lines: Vec<String> = Vec::new();
    let wait_for = |lines: &mut Vec<String>, what: &str, pred: &dyn Fn(&str) -> bool| {
        let deadline = Instant::now() + T;
        while !lines.iter().any(|l| pred(l)) {
            match rx.recv_timeout(deadline.saturating_duration_since(Instant::now())) {
                Ok(l) => lines.push(l),
                Err(_) => panic!("no {what} within {T:?}:\n{}", lines.join("\n")),
            }
        }
    };
    wait_for(&mut lines, "ready line", &|l| l.starts_with("[devloop] ready"));
    let problem2 = |l: &str| l.starts_with("[svc] /") && l.ends_with("/x.ts:7:1: warning: unused");
    wait_for(&mut lines, "second problem", &problem2);
    // An edit: one more cycle.
    let n = lines.len();
    p.write("x.ts", b"let x = 2;\n");
    wait_for(&mut lines, "the edit's sync", &|l| l.starts_with("[svc] synced "));
    // Its command runs again: wait for its second problem too.
    let mut more = lines.split_off(n);
    wait_for(&mut more, "the edit's problems", &problem2);
    lines.extend(more);
    unsafe { libc::kill(child.id() as i32, libc::SIGINT) };
    assert!(child.wait().unwrap().success());
    let text = lines.join("\n");

    // Cycles: the first end is `ready`, after a begin; the edit is a
    // begin then an end.
    let first_begin = lines.iter().position(|l| begins.is_match(l)).expect(&text);
    let first_end = lines.iter().position(|l| ends.is_match(l)).expect(&text);
    assert!(first_begin < first_end, "{text}");
    assert!(lines[first_end].starts_with("[devloop] ready"), "dependent tasks must wait for ready:\n{text}");
    let edit_begin = lines.iter().skip(first_end).position(|l| begins.is_match(l)).expect(&text) + first_end;
    assert!(lines.iter().skip(edit_begin).any(|l| ends.is_match(l)), "{text}");

    // Problems: exactly the two of each run, at the local file.
    let local = std::fs::canonicalize(p.src().join("x.ts")).unwrap();
    let found: Vec<(String, String, String, String, String)> = lines
        .iter()
        .filter_map(|l| pattern.captures(l))
        .map(|c| (1..=5).map(|i| c[i].to_string()).collect::<Vec<_>>())
        .map(|v| (v[0].clone(), v[1].clone(), v[2].clone(), v[3].clone(), v[4].clone()))
        .collect();
    let f = local.display().to_string();
    assert_eq!(
        found,
        [
            (f.clone(), "3".into(), "5".into(), "error".into(), "TS2322: Type is wrong.".into()),
            (f.clone(), "7".into(), "1".into(), "warning".into(), "unused".into()),
        ]
        .iter()
        .cycle()
        .take(4)
        .cloned()
        .collect::<Vec<(String, String, String, String, String)>>(),
        "{text}"
    );
}
