//! A corpus of malformed manifests under `tests/malformed/`, each ending in
//! `# expect: ` lines that hold the exact errors it must produce.
//! Rewrite the expectations (then review the diff!) with
//! `AGENTVM_BLESS=1 cargo test -p agentvm-api --test malformed`.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use agentvm_api::{parse_file, parse_str, ManifestErrorKind, MAX_MANIFEST_BYTES};

const EXPECT: &str = "# expect: ";

fn corpus() -> Vec<PathBuf> {
    // Relative to the crate root (the cwd of integration tests), so the
    // file names in messages are stable.
    let mut files: Vec<PathBuf> = std::fs::read_dir("tests/malformed")
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

fn expectations(bytes: &[u8]) -> Vec<String> {
    String::from_utf8_lossy(bytes)
        .lines()
        .filter_map(|l| l.strip_prefix(EXPECT).map(str::to_string))
        .collect()
}

fn bless(path: &Path, bytes: &[u8], actual: &[String]) {
    let mut kept: Vec<u8> = Vec::new();
    for line in bytes.split_inclusive(|b| *b == b'\n') {
        if !line.starts_with(EXPECT.as_bytes()) {
            kept.extend_from_slice(line);
        }
    }
    for line in actual {
        kept.extend_from_slice(format!("{EXPECT}{line}\n").as_bytes());
    }
    std::fs::write(path, kept).unwrap();
}

#[test]
fn every_malformed_manifest_fails_with_its_expected_errors() {
    let files = corpus();
    assert!(
        files.len() >= 40,
        "the corpus must hold at least 40 manifests, has {}",
        files.len()
    );
    let bless_mode = std::env::var("AGENTVM_BLESS").is_ok_and(|v| v == "1");
    let mut failures = Vec::new();
    for path in files {
        let bytes = std::fs::read(&path).unwrap();
        let started = Instant::now();
        let result = parse_file(&path);
        let elapsed = started.elapsed();
        assert!(
            elapsed < Duration::from_secs(5),
            "{} took {elapsed:?}",
            path.display()
        );
        let actual: Vec<String> = match result {
            Ok(objects) => vec![format!("(parsed without error: {} objects)", objects.len())],
            Err(errors) => errors.to_string().lines().map(str::to_string).collect(),
        };
        let expected = expectations(&bytes);
        if bless_mode {
            bless(&path, &bytes, &actual);
        } else if expected.is_empty() || actual != expected {
            failures.push(format!(
                "{}\n  expected:\n    {}\n  actual:\n    {}",
                path.display(),
                expected.join("\n    "),
                actual.join("\n    ")
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} manifest(s) did not fail as expected:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

#[test]
fn every_error_has_a_position_or_is_about_the_whole_file() {
    for path in corpus() {
        let Err(errors) = parse_file(&path) else {
            continue;
        };
        for e in errors.iter() {
            let whole_file = matches!(
                e.kind,
                ManifestErrorKind::NoDocuments
                    | ManifestErrorKind::TooLarge { .. }
                    | ManifestErrorKind::Io(_)
            );
            assert!(
                whole_file || (e.line.is_some() && e.column.is_some()),
                "{e}"
            );
        }
    }
}

#[test]
fn ten_mib_document_is_rejected_before_parsing() {
    let mut text = String::from("apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: big\nspec:\n  poolRef: p\n  script:\n    source: |\n");
    while text.len() < 10 * 1024 * 1024 {
        text.push_str("      print('0123456789012345678901234567890123456789012345678901234567890123456789')\n");
    }
    let started = Instant::now();
    let errors = parse_str(&text, "big.yaml").unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1));
    assert_eq!(
        errors.to_string(),
        format!(
            "big.yaml: is {} bytes; a manifest source may be at most {MAX_MANIFEST_BYTES} bytes (4 MiB): split it into several files and move large inline content into host files (`fromFile`)",
            text.len()
        )
    );
    // The same through a file, which is not even read.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("big.yaml");
    std::fs::write(&path, &text).unwrap();
    let errors = parse_file(&path).unwrap_err();
    assert!(
        matches!(errors.0[0].kind, ManifestErrorKind::TooLarge { .. }),
        "{errors}"
    );
}

#[test]
fn inline_content_just_under_the_file_limit_is_rejected_by_validation() {
    // 2 MiB of script: a valid YAML file, but inline content is capped at 1 MiB.
    let mut text = String::from("apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: big\nspec:\n  poolRef: p\n  script:\n    source: |\n");
    while text.len() < 2 * 1024 * 1024 {
        text.push_str("      print('x')\n");
    }
    let errors = parse_str(&text, "big.yaml").unwrap_err();
    let message = errors.to_string();
    assert!(
        message.starts_with("big.yaml:8:5: spec.script.source: is "),
        "{message}"
    );
    assert!(
        message.ends_with("use `fromFile`, or a workspace"),
        "{message}"
    );
}

#[test]
fn billion_laughs_is_rejected_fast() {
    let started = Instant::now();
    let errors = parse_file(Path::new("tests/malformed/billion-laughs.yaml")).unwrap_err();
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert!(errors.to_string().contains("alias bomb"), "{errors}");
}
