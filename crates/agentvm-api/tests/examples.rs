//! Every manifest under `examples/` parses, validates, round-trips, and
//! only refers to objects the examples declare.

use std::collections::BTreeSet;
use std::path::PathBuf;

use agentvm_api::{
    parse_dir, parse_file, parse_str, spec_hash, Entrypoint, Kind, PoolNetworkMode, Profile,
    Resource,
};

fn examples_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../examples")
}

fn example_files() -> Vec<PathBuf> {
    let files = agentvm_api::manifest_files(&examples_dir(), true).unwrap();
    assert!(
        files.len() >= 5,
        "expected the example set, found {files:?}"
    );
    files
}

#[test]
fn every_example_parses_and_validates() {
    for file in example_files() {
        let parsed = parse_file(&file).unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        assert!(!parsed.is_empty(), "{} declares nothing", file.display());
        let text = std::fs::read_to_string(&file).unwrap();
        assert!(
            text.starts_with("# yaml-language-server: $schema=../specs/agentvm.schema.json\n"),
            "{} should start with the schema modeline",
            file.display()
        );
    }
}

#[test]
fn examples_apply_together_and_references_resolve() {
    let all = parse_dir(&examples_dir(), true).unwrap_or_else(|e| panic!("{e}"));
    let names = |kind: Kind| -> BTreeSet<String> {
        all.iter()
            .filter(|p| p.resource.kind() == kind)
            .map(|p| p.resource.name().to_string())
            .collect()
    };
    let (networks, filters, images, pools) = (
        names(Kind::Network),
        names(Kind::NetworkFilter),
        names(Kind::Image),
        names(Kind::VmPool),
    );
    for parsed in &all {
        let at = &parsed.source;
        match &parsed.resource {
            Resource::VmPool(pool) => {
                assert!(
                    images.contains(&pool.spec.template.image_ref),
                    "{at}: unknown image"
                );
                let image = all
                    .iter()
                    .find_map(|p| match &p.resource {
                        Resource::Image(i) if i.metadata.name == pool.spec.template.image_ref => {
                            Some(i)
                        }
                        _ => None,
                    })
                    .unwrap();
                if let Err(e) =
                    agentvm_api::validate_pool_disk(&pool.spec, &image.metadata.name, &image.spec)
                {
                    panic!("{at}: {e}");
                }
                if let Some(att) = pool.spec.template.network.attachment() {
                    assert!(networks.contains(att.network_ref), "{at}: unknown network");
                    assert!(filters.contains(att.filter_ref), "{at}: unknown filter");
                }
            }
            Resource::AgentRun(run) => match &run.spec.sandbox_ref {
                Some(sandbox) => assert!(
                    names(Kind::Sandbox).contains(sandbox),
                    "{at}: unknown sandbox"
                ),
                None => assert!(pools.contains(&run.spec.pool_ref), "{at}: unknown pool"),
            },
            _ => {}
        }
    }
    for kind in Kind::ALL {
        assert!(!names(kind).is_empty(), "no example declares a {kind}");
    }
}

#[test]
fn examples_round_trip_through_yaml_and_json() {
    for parsed in parse_dir(&examples_dir(), true).unwrap() {
        let resource = parsed.resource;
        let yaml = serde_yaml::to_string(&resource).unwrap();
        let again = parse_str(&yaml, "roundtrip.yaml").unwrap_or_else(|e| panic!("{yaml}\n{e}"));
        assert_eq!(again[0].resource, resource);
        assert_eq!(spec_hash(&again[0].resource), spec_hash(&resource));
        let json = serde_json::to_string(&resource).unwrap();
        let back: Resource = serde_json::from_str(&json).unwrap();
        assert_eq!(back, resource);
    }
}

#[test]
fn hello_isolated_is_what_the_readme_promises() {
    let parsed = parse_file(&examples_dir().join("hello-isolated.yaml")).unwrap();
    let kinds: Vec<(Kind, &str)> = parsed
        .iter()
        .map(|p| (p.resource.kind(), p.resource.name()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (Kind::Image, "debian-base"),
            (Kind::VmPool, "sandbox"),
            (Kind::AgentRun, "hello")
        ]
    );
    let Resource::VmPool(pool) = &parsed[1].resource else {
        panic!()
    };
    assert_eq!(pool.spec.template.resources.profile, Profile::Light);
    assert_eq!(pool.spec.template.network.mode, PoolNetworkMode::Isolated);
    assert_eq!(pool.spec.min_ready, 1);
    let Resource::AgentRun(run) = &parsed[2].resource else {
        panic!()
    };
    let Some(Entrypoint::Script(script)) = run.spec.entrypoint() else {
        panic!()
    };
    assert_eq!(script.interpreter, "python3");
    assert!(script.source.contains("print("));
    assert_eq!(
        parsed[1].source.line, 20,
        "line of the document's first key"
    );
}

#[test]
fn agent_examples_take_keys_from_the_host() {
    for (file, image_cmd) in [
        (
            "claude-code.yaml",
            "npm install -g @anthropic-ai/claude-code",
        ),
        ("aider.yaml", "aider-chat"),
    ] {
        let parsed = parse_file(&examples_dir().join(file)).unwrap();
        let image = parsed
            .iter()
            .find_map(|p| match &p.resource {
                Resource::Image(i) => Some(i),
                _ => None,
            })
            .unwrap();
        assert!(
            image
                .spec
                .setup_commands
                .iter()
                .any(|c| c.contains(image_cmd)),
            "{file}"
        );
        let run = parsed
            .iter()
            .find_map(|p| match &p.resource {
                Resource::AgentRun(r) => Some(r),
                _ => None,
            })
            .unwrap();
        let key = run
            .spec
            .secret_env
            .iter()
            .find(|s| s.name == "ANTHROPIC_API_KEY")
            .unwrap();
        assert_eq!(key.from_env.as_deref(), Some("ANTHROPIC_API_KEY"), "{file}");
    }
}
