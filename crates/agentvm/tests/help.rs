//! Golden tests of `--help`: the help text of `agentvm` and of every subcommand is checked
//! in under `tests/golden/help/`, so changes to flags and their documentation are
//! deliberate. `AGENTVM_BLESS=1 cargo test -p agentvm --test help` rewrites the files.

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_agentvm");

const SUBCOMMANDS: &[&str] = &[
    "host",
    "doctor",
    "image",
    "exec",
    "run",
    "controller",
    "apply",
    "get",
    "describe",
    "delete",
    "diff",
    "pause",
    "resume",
    "stop",
    "start",
    "snapshot",
    "rollback",
    "fork",
    "shell",
    "cp",
    "port-forward",
    "logs",
    "cordon",
    "uncordon",
    "drain",
    "wait",
    "schema",
    "version",
    "completion",
    "man",
];

fn help(args: &[&str]) -> String {
    let out = Command::new(BIN)
        .args(args)
        .arg("--help")
        .env_remove("AGENTVM_SPEC_DIR")
        .env_remove("AGENTVM_SOCKET")
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    assert!(out.status.success(), "agentvm {args:?} --help: {out:?}");
    String::from_utf8(out.stdout).unwrap()
}

#[test]
fn help_texts_match_the_golden_files() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/help");
    let bless = std::env::var_os("AGENTVM_BLESS").is_some_and(|v| v == "1");
    let mut cases: Vec<(String, String)> = vec![("agentvm".into(), help(&[]))];
    for sub in SUBCOMMANDS {
        cases.push((format!("agentvm-{sub}"), help(&[sub])));
    }
    // Every subcommand is covered: a new one needs a golden file too.
    let listed = help(&[]);
    for line in listed
        .lines()
        .skip_while(|l| !l.starts_with("Commands:"))
        .skip(1)
    {
        let Some(name) = line.split_whitespace().next() else {
            break;
        };
        assert!(
            name == "help" || SUBCOMMANDS.contains(&name),
            "subcommand {name} has no golden help test: add it to SUBCOMMANDS"
        );
    }
    let mut differ = Vec::new();
    for (name, text) in cases {
        let path = dir.join(format!("{name}.txt"));
        if bless {
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(&path, &text).unwrap();
            continue;
        }
        match std::fs::read_to_string(&path) {
            Ok(expected) if expected == text => {}
            Ok(expected) => differ.push(format!(
                "{}:\n--- expected\n{expected}\n--- actual\n{text}",
                path.display()
            )),
            Err(e) => differ.push(format!("{}: {e}", path.display())),
        }
    }
    assert!(
        differ.is_empty(),
        "help text changed (AGENTVM_BLESS=1 rewrites the golden files if that is deliberate):\n{}",
        differ.join("\n")
    );
}

#[test]
fn man_pages_document_every_command_and_flag() {
    let dir = std::env::temp_dir().join(format!("agentvm-man-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let out = Command::new(BIN)
        .args(["man", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let top = std::fs::read_to_string(dir.join("agentvm.1")).unwrap();
    assert!(
        top.starts_with(".ie") && top.contains(".TH agentvm 1"),
        "{top}"
    );
    for sub in SUBCOMMANDS {
        let page = std::fs::read_to_string(dir.join(format!("agentvm-{sub}.1")))
            .unwrap_or_else(|e| panic!("agentvm-{sub}.1: {e}"));
        assert!(
            top.contains(&format!("agentvm\\-{}(1)", sub.replace('-', "\\-"))),
            "{sub} not listed"
        );
        // Every long flag of `--help` is in the page.
        for line in help(&[sub]).lines() {
            let Some(flag) = line
                .trim_start()
                .split([' ', ','])
                .find(|w| w.starts_with("--"))
            else {
                continue;
            };
            let escaped = flag.replace('-', "\\-");
            assert!(page.contains(&escaped), "agentvm-{sub}.1 lacks {flag}");
        }
    }
    // One page on stdout, as `man -l -` reads it.
    let out = Command::new(BIN).args(["man", "wait"]).output().unwrap();
    assert!(out.status.success());
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(
        page.contains(".TH agentvm-wait 1") && page.contains("\\-\\-for"),
        "{page}"
    );
    let out = Command::new(BIN).args(["man", "nope"]).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let _ = std::fs::remove_dir_all(&dir);
}
