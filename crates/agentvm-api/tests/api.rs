//! Defaults, validation rules, hashing, round trips and manifest sources.

use std::io::Cursor;
use std::net::Ipv4Addr;

use agentvm_api::*;

fn parse_one(yaml: &str) -> Resource {
    let mut parsed = parse_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(parsed.len(), 1);
    parsed.remove(0).resource
}

fn errors_of(resource: &Resource) -> Vec<String> {
    match validate(resource) {
        Ok(()) => Vec::new(),
        Err(e) => e.iter().map(ToString::to_string).collect(),
    }
}

const MINIMAL_POOL: &str = "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata:\n  name: p\nspec:\n  template:\n    imageRef: img\n";

#[test]
fn pool_defaults() {
    let Resource::VmPool(pool) = parse_one(MINIMAL_POOL) else {
        panic!()
    };
    let spec = &pool.spec;
    assert_eq!(spec.min_ready, 1);
    assert_eq!(spec.max_size, 4);
    assert_eq!(spec.ttl_seconds, 3600);
    assert_eq!(spec.template.resources.profile, Profile::Standard);
    assert_eq!(
        spec.template.resources.resolved(),
        ResolvedResources {
            vcpu: 2,
            memory_mib: 2048,
            disk_gib: 20,
            cpu_shares: 1024,
            cpu_quota_percent: None,
            memory_hard_limit_mib: None,
            io: Profile::Standard.io_limits(),
        }
    );
    // No network given: isolated, explicitly.
    assert_eq!(spec.template.network.mode, PoolNetworkMode::Isolated);
    assert_eq!(spec.template.network.attachment(), None);
    assert!(spec.template.warmup.is_empty());
}

#[test]
fn profiles_resolve_to_the_predecessor_numbers() {
    let r = |p| Resources::profile(p).resolved();
    let sizes = |r: ResolvedResources| (r.vcpu, r.memory_mib, r.disk_gib, r.cpu_shares);
    assert_eq!(sizes(r(Profile::Light)), (1, 1024, 10, 1024));
    assert_eq!(sizes(r(Profile::Standard)), (2, 2048, 20, 1024));
    assert_eq!(sizes(r(Profile::Intensive)), (4, 4096, 40, 1024));
    let mut custom = Resources::custom(8, 8192, 100);
    custom.cpu_shares = Some(2048);
    assert_eq!(sizes(custom.resolved()), (8, 8192, 100, 2048));
    // No CPU or memory cap unless asked for.
    for p in [Profile::Light, Profile::Standard, Profile::Intensive] {
        assert_eq!(r(p).cpu_quota_percent, None);
        assert_eq!(r(p).memory_hard_limit_mib, None);
    }
}

#[test]
fn profiles_set_throughput_limits_that_fields_override_and_zero_lifts() {
    let io = |p| Resources::profile(p).resolved().io;
    let all = |l: IoLimits| {
        (
            l.disk_read_mib_per_second,
            l.disk_write_mib_per_second,
            l.disk_iops,
            l.net_in_mib_per_second,
            l.net_out_mib_per_second,
        )
    };
    assert_eq!(all(io(Profile::Light)), (100, 50, 1000, 10, 10));
    assert_eq!(all(io(Profile::Standard)), (200, 100, 2000, 25, 25));
    assert_eq!(all(io(Profile::Intensive)), (400, 200, 4000, 50, 50));
    assert_eq!(all(io(Profile::Custom)), (0, 0, 0, 0, 0));
    let mut r = Resources::profile(Profile::Light);
    r.disk_write_mib_per_second = Some(5);
    r.net_in_mib_per_second = Some(0);
    assert_eq!(all(r.resolved().io), (100, 5, 1000, 0, 10));
    let mut c = Resources::custom(1, 512, 2);
    c.disk_iops = Some(300);
    c.cpu_quota_percent = Some(50);
    c.memory_hard_limit_mib = Some(1024);
    let got = c.resolved();
    assert_eq!(all(got.io), (0, 0, 300, 0, 0));
    assert_eq!(got.cpu_quota_percent, Some(50));
    assert_eq!(got.memory_hard_limit_mib, Some(1024));
}

#[test]
fn caps_and_limits_are_validated_with_their_units() {
    let pool = |resources: &str| {
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: p}}\nspec:\n  template:\n    imageRef: i\n    resources: {resources}\n"
        )
    };
    assert_eq!(
        errors_of(&parse_one(&pool("{profile: light, diskWriteMibPerSecond: 0, cpuQuotaPercent: 100, memoryHardLimitMib: 1280}"))),
        Vec::<String>::new()
    );
    let errors = parse_str(
        &pool("{profile: light, memoryHardLimitMib: 1200, cpuQuotaPercent: 0, diskIops: 2000000}"),
        "t.yaml",
    )
    .unwrap_err()
    .to_string();
    for e in [
        "t.yaml:7:33: spec.template.resources.memoryHardLimitMib: 1200 leaves QEMU no room above the guest's memory: it limits the whole QEMU process, so use at least memoryMib + 256 = 1280 (the guest's memory plus QEMU's own; under TCG also its translation cache), or remove it",
        "t.yaml:7:59: spec.template.resources.cpuQuotaPercent: 0 is below the minimum 1 (percent of one host CPU per vCPU)",
        "t.yaml:7:79: spec.template.resources.diskIops: 2000000 is above the maximum 1000000 (0 means no limit)",
    ] {
        assert!(errors.contains(e), "{e}\nnot in\n{errors}");
    }
}

#[test]
fn a_pool_disk_must_hold_its_image() {
    let image = |mib: u32| agentvm_api::ImageSpec {
        disk_size_mib: mib,
        ..Default::default()
    };
    let pool = |resources: &str| {
        match parse_one(&format!(
        "apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: p}}\nspec:\n  template:\n    imageRef: i\n    resources: {resources}\n"
    )) {
        Resource::VmPool(p) => p.spec,
        other => panic!("{other:?}"),
    }
    };
    let errors = |spec, mib| {
        agentvm_api::validate_pool_disk(&spec, "i", &image(mib))
            .err()
            .map(|e| e.to_string())
    };
    let custom = |gib: u32| {
        pool(&format!(
            "{{profile: custom, vcpu: 1, memoryMib: 512, diskGib: {gib}}}"
        ))
    };
    // Equal is enough: the default image is 2048 MiB.
    assert_eq!(errors(custom(2), 2048), None);
    assert_eq!(errors(pool("{profile: light}"), 10 * 1024), None);
    let e = errors(custom(2), 2049).unwrap();
    assert!(
        e.contains(
            "spec.template.resources.diskGib: 2 GiB is smaller than Image `i`'s disk (2049 MiB)"
        ) && e.contains("at least 3 GiB"),
        "{e}"
    );
    // A preset is named by its profile, with the way out.
    let e = errors(pool("{profile: light}"), 20 * 1024).unwrap();
    assert!(
        e.contains("spec.template.resources.profile: profile `light` has 10 GiB of disk, which is smaller than Image `i`'s disk (20480 MiB)")
            && e.contains("`profile: custom` with `diskGib: 20`"),
        "{e}"
    );
}

#[test]
fn run_defaults() {
    let run = parse_one(
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: r\nspec:\n  poolRef: p\n  script:\n    source: print(1)\n",
    );
    let Resource::AgentRun(run) = run else {
        panic!()
    };
    assert_eq!(run.spec.timeout_seconds, 300);
    let Some(Entrypoint::Script(script)) = run.spec.entrypoint() else {
        panic!()
    };
    assert_eq!(script.interpreter, "python3");
    assert_eq!(run.spec.effective_working_dir(), "/root");
    let ws: Workspace = serde_yaml::from_str("hostPath: ./x").unwrap();
    assert_eq!(ws.path, "/workspace");
    let a: Artifacts = serde_yaml::from_str("paths: [/out]").unwrap();
    assert_eq!(a.max_size_mib, 64);
    let f: InputFile = serde_yaml::from_str("{path: /x, content: y}").unwrap();
    assert_eq!(f.mode, "0644");
    assert_eq!(f.mode_bits(), Some(0o644));
}

#[test]
fn image_and_network_defaults() {
    let Resource::Image(image) = parse_one(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: i\nspec: {}\n",
    ) else {
        panic!()
    };
    assert_eq!(image.spec, ImageSpec::default());
    assert_eq!(image.spec.suite, "bookworm");
    assert_eq!(image.spec.distro, Distro::Debian);
    assert_eq!(image.spec.kernel, KernelSource::Host);
    assert_eq!(image.spec.disk_size_mib, 2048);

    let Resource::Network(net) = parse_one(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Network\nmetadata:\n  name: n\nspec:\n  subnet: 192.168.101.0/24\n",
    ) else {
        panic!()
    };
    assert_eq!(net.spec.mode, NetworkMode::Nat);
    assert_eq!(net.spec.gateway(), Ipv4Addr::new(192, 168, 101, 1));
    assert_eq!(
        net.spec.dhcp_range(),
        DhcpRange {
            start: Ipv4Addr::new(192, 168, 101, 10),
            end: Ipv4Addr::new(192, 168, 101, 254)
        }
    );
    let small = NetworkSpec {
        mode: NetworkMode::Isolated,
        subnet: "10.0.0.0/29".parse().unwrap(),
        dhcp: None,
    };
    assert_eq!(
        small.dhcp_range(),
        DhcpRange {
            start: Ipv4Addr::new(10, 0, 0, 2),
            end: Ipv4Addr::new(10, 0, 0, 6)
        }
    );
}

#[test]
fn filter_defaults_and_predecessor_default() {
    let Resource::NetworkFilter(f) = parse_one(
        "apiVersion: agentvm.dev/v1alpha1\nkind: NetworkFilter\nmetadata:\n  name: f\nspec:\n  egress:\n    - protocol: tcp\n      ports: [443]\n",
    ) else {
        panic!()
    };
    assert!(f.spec.allow_dhcp);
    assert!(f.spec.allow_established);

    let d = NetworkFilterSpec::predecessor_default();
    assert!(d.allow_dhcp, "guests must get an address");
    assert!(d.allow_established);
    let allowed: Vec<(Protocol, u16)> = d
        .egress
        .iter()
        .flat_map(|r| r.ports.iter().map(move |p| (r.protocol, p.start)))
        .collect();
    assert_eq!(
        allowed,
        vec![
            (Protocol::Udp, 53),
            (Protocol::Tcp, 80),
            (Protocol::Tcp, 443),
            (Protocol::Tcp, 22),
            (Protocol::Tcp, 9418)
        ]
    );
    assert!(d.egress.iter().all(|r| r.destinations.is_empty()));
    let obj: Resource = NetworkFilter::new("default", d).into();
    assert_eq!(validate(&obj), Ok(()));
}

#[test]
fn constructors_build_valid_objects() {
    let objects: Vec<Resource> = vec![
        Network::new(
            "n",
            NetworkSpec {
                mode: NetworkMode::Nat,
                subnet: "10.10.0.0/16".parse().unwrap(),
                dhcp: None,
            },
        )
        .into(),
        Image::new("i", ImageSpec::default()).into(),
        VmPool::new(
            "p",
            VmPoolSpec {
                template: VmTemplate {
                    image_ref: "i".into(),
                    resources: Resources::custom(1, 512, 4),
                    network: PoolNetwork::attached("n", "f"),
                    warmup: vec![],
                },
                min_ready: 0,
                max_size: 1,
                ttl_seconds: 60,
                health_check_seconds: 5,
                anomalies: Default::default(),
                creation: Default::default(),
            },
        )
        .into(),
        AgentRun::new("r", AgentRunSpec::python("p", "print(1)")).into(),
        AgentRun::new(
            "c",
            AgentRunSpec::command("p", "claude", vec!["--version".into()]),
        )
        .into(),
    ];
    for o in &objects {
        assert_eq!(validate(o), Ok(()), "{}", o.key());
        assert_eq!(o.api_version(), API_VERSION);
        assert_eq!(o.kind_field(), o.kind().as_str());
    }
}

#[test]
fn validation_reports_every_problem_with_its_path() {
    let mut spec = AgentRunSpec::python("Bad_Pool", "");
    spec.timeout_seconds = 4000;
    spec.command = Some(Command {
        program: "ls".into(),
        args: vec![],
    });
    spec.env.insert("OK_NAME".into(), "x".into());
    spec.secret_env.push(SecretEnvVar {
        name: "OK_NAME".into(),
        from_env: Some("A".into()),
        from_file: Some("/k".into()),
    });
    spec.working_dir = Some("relative".into());
    let mut run = AgentRun::new("run", spec);
    run.metadata.labels.insert("bad key!".into(), "v".into());
    let errors = errors_of(&run.into());
    assert_eq!(
        errors,
        vec![
            "metadata.labels[\"bad key!\"]: `bad key!` is not a valid label key: use an optional DNS prefix and `/`, then at most 63 letters, digits, '-', '_' or '.', starting and ending with a letter or digit (e.g. `app.example.com/team`)",
            "spec.poolRef: `Bad_Pool` is not a valid VmPool name: use lowercase letters, digits and '-', starting and ending with a letter or digit, at most 63 characters (e.g. `bad-pool`)",
            "spec.command: `script` and `command` are both set; keep exactly one of them",
            "spec.script.source: is empty; write the program to run",
            "spec.secretEnv[0].name: `OK_NAME` is also set in `env`; remove one of them",
            "spec.secretEnv[0].fromFile: `fromEnv` and `fromFile` are both set; keep one",
            "spec.workingDir: `relative` is not an absolute guest path; start it with `/`, e.g. `/workspace/relative`",
            "spec.timeoutSeconds: 4000 is above the maximum 3600 (one hour); split the work into several runs",
        ]
    );
}

#[test]
fn a_run_names_exactly_one_of_pool_and_sandbox_and_a_sandbox_its_limits() {
    let mut both = AgentRunSpec::python("p", "print(1)");
    both.sandbox_ref = Some("s".into());
    assert_eq!(
        errors_of(&AgentRun::new("r", both.clone()).into()),
        vec!["spec.sandboxRef: `poolRef` and `sandboxRef` are both set; keep exactly one of them"]
    );
    let mut neither = both.clone();
    neither.pool_ref.clear();
    neither.sandbox_ref = None;
    assert_eq!(
        errors_of(&AgentRun::new("r", neither).into()),
        vec!["spec.poolRef: where should it run? set `poolRef` (a VmPool: a fresh VM, reset after) or `sandboxRef` (a Sandbox: kept)"]
    );
    let mut sandbox_only = both;
    sandbox_only.pool_ref.clear();
    assert_eq!(validate(&AgentRun::new("r", sandbox_only).into()), Ok(()));

    let sandbox = agentvm_api::parse_str(
        "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {name: s}\nspec: {poolRef: p, idleTimeoutSeconds: 5, ttlSeconds: 99999999, shutdownTime: tomorrow, maxSnapshots: 0, rollback: {snapshot: Bad, requestedAt: now}}\n",
        "s.yaml",
    )
    .unwrap_err()
    .to_string();
    for expected in [
        "spec.idleTimeoutSeconds: 5 is below the minimum 10; 0 means never",
        "spec.ttlSeconds: 99999999 is above the maximum 2592000; leave it out for no limit",
        "spec.shutdownTime: `tomorrow` is not an RFC 3339 time",
        "spec.maxSnapshots: 0 is below the minimum 1",
        "spec.rollback.snapshot: `Bad` is not a valid Snapshot name",
        "spec.rollback.requestedAt: `now` is not an RFC 3339 time",
    ] {
        assert!(sandbox.contains(expected), "{expected} not in:\n{sandbox}");
    }
    // Its VM comes from exactly one place: a pool, a template or a snapshot to fork.
    let sandbox_errors = |spec: &str| {
        agentvm_api::parse_str(
            &format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: s}}\nspec: {spec}\n"),
            "s.yaml",
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default()
    };
    assert!(sandbox_errors("{}").contains(
        "spec.poolRef: where does its VM come from? set `poolRef` (a VmPool: a warm VM is taken), `template` (a VM booted for it: imageRef, resources, network as in a VmPool) or `fromSnapshot` (a Snapshot: a fork of it)"
    ));
    assert!(sandbox_errors("{poolRef: p, fromSnapshot: x}")
        .contains("spec.fromSnapshot: `poolRef` and `fromSnapshot` are both set"));
    assert!(sandbox_errors("{fromSnapshot: Bad}")
        .contains("spec.fromSnapshot: `Bad` is not a valid Snapshot name"));
    assert_eq!(sandbox_errors("{fromSnapshot: base}"), "");
    // A template is a pool's template, checked the same way.
    assert_eq!(sandbox_errors("{template: {imageRef: img}}"), "");
    assert!(
        sandbox_errors("{poolRef: p, template: {imageRef: img}}").contains(
            "spec.template: `poolRef` and `template` are both set; keep exactly one of them"
        )
    );
    assert!(
        sandbox_errors("{poolRef: p, template: {imageRef: img}, fromSnapshot: x}").contains(
            "spec.fromSnapshot: `poolRef` and `template` and `fromSnapshot` are all set; keep exactly one of them"
        )
    );
    let bad = sandbox_errors(
        "{template: {imageRef: Bad, resources: {profile: custom, vcpu: 0, memoryMib: 256, diskGib: 2}, network: {mode: attached}}}",
    );
    for expected in [
        "spec.template.imageRef: `Bad` is not a valid Image name",
        "spec.template.resources.vcpu",
        "spec.template.network",
    ] {
        assert!(bad.contains(expected), "{expected} not in:\n{bad}");
    }
    assert!(sandbox_errors("{template: {imageRef: img, surprise: 1}}").contains("surprise"));
}

#[test]
fn wrong_header_fields_are_validation_errors_too() {
    let mut image = Image::new("i", ImageSpec::default());
    image.api_version = "v1".into();
    image.kind = "Img".into();
    assert_eq!(
        errors_of(&image.into()),
        vec![
            "apiVersion: `v1` is not supported; use `agentvm.dev/v1alpha1`",
            "kind: `Img` does not match the object; use `Image`",
        ]
    );
}

#[test]
fn dns_labels() {
    for ok in ["a", "sandbox", "a-b-1", "0abc", &"x".repeat(63)] {
        assert!(is_dns_label(ok), "{ok}");
    }
    for bad in [
        "",
        "A",
        "-a",
        "a-",
        "a_b",
        "a.b",
        "a b",
        "../x",
        "a<b",
        "é",
        &"x".repeat(64),
    ] {
        assert!(!is_dns_label(bad), "{bad}");
    }
    assert_eq!(suggest_dns_label("My_Pool!").as_deref(), Some("my-pool"));
    assert_eq!(suggest_dns_label("<&>"), None);
}

#[test]
fn spec_hash_ignores_metadata_status_and_explicit_defaults() {
    let a = parse_one(MINIMAL_POOL);
    let explicit = format!("{MINIMAL_POOL}    resources:\n      profile: standard\n  minReady: 1\n  maxSize: 4\n  ttlSeconds: 3600\n")
        .replace("name: p", "name: p\n  labels:\n    x: y");
    let b = parse_one(&explicit);
    assert_eq!(spec_hash(&a), spec_hash(&b));
    assert_eq!(spec_hash(&a).len(), 64);
    let mut c = b.clone();
    c.metadata_mut().generation = 7;
    if let Resource::VmPool(p) = &mut c {
        p.status = Some(VmPoolStatus {
            ready: 3,
            ..Default::default()
        });
    }
    assert_eq!(spec_hash(&a), spec_hash(&c));
    let d = parse_one(&MINIMAL_POOL.replace("imageRef: img", "imageRef: other"));
    assert_ne!(spec_hash(&a), spec_hash(&d));
    // Stable across releases: changing this means every object looks drifted.
    assert_eq!(
        spec_hash(&Image::new("i", ImageSpec::default()).into()),
        spec_hash(&Image::new("j", ImageSpec::default()).into())
    );
}

#[test]
fn status_and_generation_in_manifests_are_ignored() {
    let text = "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: r\n  generation: 5\nspec:\n  poolRef: p\n  command: {program: ls}\nstatus:\n  phase: Succeeded\n  exitCode: 0\n  stdoutTail: hi\n";
    let r = parse_one(text);
    assert!(!r.has_status());
    assert_eq!(r.metadata().generation, 0);
}

#[test]
fn status_round_trips_and_skips_empty_collections() {
    let mut run = AgentRun::new("r", AgentRunSpec::command("p", "true", vec![]));
    run.status = Some(AgentRunStatus {
        phase: AgentRunPhase::Succeeded,
        observed_generation: Some(1),
        conditions: vec![Condition::new(
            "Completed",
            ConditionStatus::True,
            "ExitedZero",
            "",
            agentvm_api::Timestamp::parse("2025-01-01T00:00:00Z"),
        )],
        vm: Some("agentvm-p-0".into()),
        exit_code: Some(0),
        ..Default::default()
    });
    let json = serde_json::to_value(&run).unwrap();
    assert_eq!(
        json["status"],
        serde_json::json!({
            "phase": "Succeeded",
            "observedGeneration": 1,
            "conditions": [{"type": "Completed", "status": "True", "reason": "ExitedZero", "lastTransitionTime": "2025-01-01T00:00:00.000Z"}],
            "vm": "agentvm-p-0",
            "exitCode": 0
        })
    );
    let back: AgentRun = serde_json::from_value(json).unwrap();
    assert_eq!(back, run);
    assert!(AgentRunPhase::TimedOut.is_terminal());
    assert!(!AgentRunPhase::Running.is_terminal());
}

#[test]
fn resource_deserializes_by_kind_and_rejects_strangers() {
    let r: Resource = serde_json::from_str(
        r#"{"apiVersion":"agentvm.dev/v1alpha1","kind":"Image","metadata":{"name":"i"},"spec":{}}"#,
    )
    .unwrap();
    assert_eq!(r.kind(), Kind::Image);
    assert_eq!(r.name(), "i");
    assert_eq!(r.key(), "Image/i");
    let e =
        serde_json::from_str::<Resource>(r#"{"apiVersion":"agentvm.dev/v1alpha1","kind":"Pod"}"#)
            .unwrap_err();
    assert!(e.to_string().starts_with("unknown kind \"Pod\""), "{e}");
    let e = serde_json::from_str::<Resource>(r#"{"apiVersion":"v1","kind":"Image"}"#).unwrap_err();
    assert!(e.to_string().contains("unsupported apiVersion"), "{e}");
}

#[test]
fn secret_values_are_never_serialized_because_they_cannot_exist() {
    let run = parse_one(
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: r\nspec:\n  poolRef: p\n  command: {program: env}\n  secretEnv:\n    - {name: KEY, fromEnv: HOST_KEY}\n    - {name: FILEKEY, fromFile: /etc/key}\n",
    );
    let yaml = serde_yaml::to_string(&run).unwrap();
    assert!(yaml.contains("fromEnv: HOST_KEY"));
    assert!(!yaml.contains("value"));
}

#[test]
fn multi_document_sources_keep_order_and_lines() {
    let text = "# modeline\n---\napiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: a\nspec: {}\n---\n\n# comment\napiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: b\nspec: {}\n...\n";
    let parsed = parse_str(text, "multi.yaml").unwrap();
    let got: Vec<(String, usize)> = parsed
        .iter()
        .map(|p| (p.resource.name().to_string(), p.source.line))
        .collect();
    assert_eq!(got, vec![("a".to_string(), 3), ("b".to_string(), 11)]);
    assert_eq!(parsed[1].source.to_string(), "multi.yaml:11");
}

#[test]
fn errors_from_several_documents_are_all_reported() {
    let text = "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: A\nspec: {}\n---\napiVersion: agentvm.dev/v1alpha1\nkind: Imag\nmetadata:\n  name: b\nspec: {}\n";
    let errors = parse_str(text, "x.yaml").unwrap_err();
    assert_eq!(errors.len(), 2);
    assert_eq!(errors.0[0].line, Some(4));
    assert_eq!(errors.0[0].field_path().as_deref(), Some("metadata.name"));
    assert_eq!(
        errors.0[1].to_string(),
        "x.yaml:8:1: kind: unknown kind `Imag` (did you mean `Image`?); valid kinds: Network, NetworkFilter, Image, VmPool, Sandbox, Snapshot, AgentRun"
    );
}

#[test]
fn reader_and_bytes_sources() {
    let text = "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: a\nspec: {}\n";
    let parsed = parse_reader(Cursor::new(text.as_bytes()), "<stdin>").unwrap();
    assert_eq!(parsed[0].source.file, "<stdin>");
    let errors = parse_bytes(b"kind: \xff\n", "bin.yaml").unwrap_err();
    assert_eq!(
        errors.to_string(),
        "bin.yaml:1:7: is not valid UTF-8 (byte 0xff); save the file as UTF-8 text"
    );
    let errors = parse_str("", "empty.yaml").unwrap_err();
    assert!(matches!(errors.0[0].kind, ManifestErrorKind::NoDocuments));
    // A byte-order mark is tolerated.
    assert_eq!(
        parse_str(&format!("\u{feff}{text}"), "bom.yaml")
            .unwrap()
            .len(),
        1
    );
}

#[test]
fn directories_are_read_sorted_recursively_and_skip_hidden_and_other_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path();
    let image = |name: &str| {
        format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata:\n  name: {name}\nspec: {{}}\n")
    };
    std::fs::create_dir_all(root.join("sub/deeper")).unwrap();
    std::fs::create_dir_all(root.join(".git")).unwrap();
    std::fs::write(root.join("b.yaml"), image("b")).unwrap();
    std::fs::write(root.join("a.yml"), image("a")).unwrap();
    std::fs::write(root.join("notes.txt"), "not yaml").unwrap();
    std::fs::write(root.join(".hidden.yaml"), image("hidden")).unwrap();
    std::fs::write(root.join(".git/config.yaml"), "garbage: [").unwrap();
    std::fs::write(root.join("sub/c.yaml"), image("c")).unwrap();
    std::fs::write(root.join("sub/deeper/d.YAML"), image("d")).unwrap();

    let names = |r: ParseResult| -> Vec<String> {
        r.unwrap_or_else(|e| panic!("{e}"))
            .iter()
            .map(|p| p.resource.name().to_string())
            .collect()
    };
    assert_eq!(names(parse_dir(root, false)), vec!["a", "b"]);
    assert_eq!(names(parse_dir(root, true)), vec!["a", "b", "c", "d"]);
    assert_eq!(names(parse_path(root, true)), vec!["a", "b", "c", "d"]);
    assert_eq!(
        names(parse_path(&root.join("sub/c.yaml"), false)),
        vec!["c"]
    );
    // An explicitly named file is read whatever its extension.
    std::fs::write(root.join("manifest.txt"), image("t")).unwrap();
    assert_eq!(names(parse_file(&root.join("manifest.txt"))), vec!["t"]);

    // Names are unique across every path of one call.
    std::fs::write(root.join("sub/dup.yaml"), image("a")).unwrap();
    let errors = parse_paths(&[root.join("a.yml"), root.join("sub/dup.yaml")], false).unwrap_err();
    let message = errors.to_string();
    assert!(
        message.ends_with("a.yml:1; names must be unique per kind, rename one of them"),
        "{message}"
    );
    assert!(
        message.contains("dup.yaml:4:3: metadata.name: Image `a` is already declared at "),
        "{message}"
    );

    let missing = parse_file(&root.join("nope.yaml")).unwrap_err();
    assert!(
        missing.to_string().contains("nope.yaml: cannot read: "),
        "{missing}"
    );
    assert!(parse_dir(&root.join("empty-nonexistent"), false).is_err());
    std::fs::create_dir(root.join("empty")).unwrap();
    assert_eq!(parse_dir(&root.join("empty"), true).unwrap().len(), 0);
}

#[test]
fn field_paths_display_and_parse() {
    let p = FieldPath::root()
        .key("spec")
        .key("egress")
        .index(0)
        .key("ports")
        .index(2);
    assert_eq!(p.to_string(), "spec.egress[0].ports[2]");
    assert_eq!(FieldPath::parse("spec.egress[0].ports[2]"), p);
    let l = FieldPath::root()
        .key("metadata")
        .key("labels")
        .key("app.kubernetes.io/name");
    assert_eq!(l.to_string(), "metadata.labels[\"app.kubernetes.io/name\"]");
    assert_eq!(FieldPath::parse(&l.to_string()), l);
    assert_eq!(FieldPath::root().to_string(), ".");
}

#[test]
fn labels_with_prefixes_are_valid() {
    let mut image = Image::new("i", ImageSpec::default());
    image
        .metadata
        .labels
        .insert("app.kubernetes.io/name".into(), "agent_vm-1.0".into());
    image.metadata.annotations.insert(
        "example.com/note".into(),
        "any text at all, even <xml> & \"quotes\"".into(),
    );
    assert_eq!(validate(&image.into()), Ok(()));
}

#[test]
fn kinds_for_the_cli() {
    assert_eq!("pools".parse::<Kind>().unwrap(), Kind::VmPool);
    assert_eq!("nwf".parse::<Kind>().unwrap(), Kind::NetworkFilter);
    assert_eq!(Kind::suggest("agnetrun"), Some(Kind::AgentRun));
    assert_eq!(Kind::VmPool.short_name(), "pool");
    assert_eq!(Kind::AgentRun.plural(), "agentruns");
    assert_eq!(
        schema::schema_file_name(Kind::NetworkFilter),
        "networkfilter.schema.json"
    );
}

#[test]
fn network_validation_edges() {
    let net = |subnet: &str, dhcp: Option<(&str, &str)>| -> Vec<String> {
        let spec = NetworkSpec {
            mode: NetworkMode::Nat,
            subnet: subnet.parse().unwrap(),
            dhcp: dhcp.map(|(s, e)| DhcpRange {
                start: s.parse().unwrap(),
                end: e.parse().unwrap(),
            }),
        };
        errors_of(&Network::new("n", spec).into())
    };
    assert!(net(
        "192.168.101.0/24",
        Some(("192.168.101.2", "192.168.101.254"))
    )
    .is_empty());
    assert_eq!(
        net("192.168.101.0/24", Some(("192.168.101.0", "192.168.101.255"))),
        vec![
            "spec.dhcp.start: 192.168.101.0 is the subnet's network address; pick an address from 192.168.101.2 to 192.168.101.254",
            "spec.dhcp.end: 192.168.101.255 is the broadcast address; pick an address from 192.168.101.2 to 192.168.101.254",
        ]
    );
    assert_eq!(net("10.0.0.0/4", None), vec!["spec.subnet: prefix /4 is out of range; use a prefix from /8 to /29, e.g. `192.168.101.0/24`"]);
}

#[test]
fn filter_validation_edges() {
    let mut spec = NetworkFilterSpec::predecessor_default();
    spec.egress.push(EgressRule {
        protocol: Protocol::Tcp,
        ports: vec![PortRange::range(8000, 8100)],
        destinations: vec![
            "10.1.2.3/8".parse().unwrap(),
            "140.82.112.0/20".parse().unwrap(),
        ],
        domains: vec![],
        description: None,
    });
    assert_eq!(
        errors_of(&NetworkFilter::new("f", spec.clone()).into()),
        vec!["spec.egress[3].destinations[0]: `10.1.2.3/8` has host bits set; write `10.0.0.0/8` (the network) or `10.1.2.3/32` (one address)"]
    );
    spec.egress = (0..257)
        .map(|p| EgressRule::new(Protocol::Tcp, [PortRange::single(1000 + p)]))
        .collect();
    let errors = errors_of(&NetworkFilter::new("f", spec).into());
    assert_eq!(errors, vec!["spec.egress: 257 rules; a filter holds at most 256 (use port ranges and CIDRs to combine rules)"]);
}

#[test]
fn workspace_and_git_rules() {
    let run = |ws: Workspace| {
        let mut spec = AgentRunSpec::command("p", "ls", vec![]);
        spec.workspace = Some(ws);
        errors_of(&AgentRun::new("r", spec).into())
    };
    let ws = |host: Option<&str>, url: Option<&str>, git_ref: Option<&str>, path: &str| Workspace {
        host_path: host.map(Into::into),
        git_url: url.map(Into::into),
        git_ref: git_ref.map(Into::into),
        path: path.into(),
    };
    for url in [
        "https://github.com/a/b.git",
        "git@github.com:a/b.git",
        "ssh://git@host/x",
        "git://host/x",
    ] {
        assert!(
            run(ws(None, Some(url), Some("main"), "/workspace")).is_empty(),
            "{url}"
        );
    }
    assert_eq!(
        run(ws(Some("./x"), None, Some("main"), "/workspace")),
        vec!["spec.workspace.gitRef: only applies with `gitUrl`; remove it"]
    );
    assert_eq!(
        run(ws(None, Some("https://h/x"), Some("--force"), "/workspace")),
        vec!["spec.workspace.gitRef: `--force` is not a branch, tag or commit name"]
    );
    assert_eq!(run(ws(None, None, None, "/")), vec![
        "spec.workspace: no source; set `hostPath` (a host directory) or `gitUrl` (a repository)",
        "spec.workspace.path: `/` is the guest's root directory; use a subdirectory such as /workspace",
    ]);
    let mut spec = AgentRunSpec::command("p", "ls", vec![]);
    spec.workspace = Some(ws(Some("./x"), None, None, "/src"));
    assert_eq!(spec.effective_working_dir(), "/src");
}

#[test]
fn relative_host_paths_resolve_against_the_manifest_directory() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("run.yaml");
    std::fs::write(
        &file,
        "apiVersion: agentvm.dev/v1alpha1\nkind: AgentRun\nmetadata:\n  name: r\nspec:\n  poolRef: p\n  command: {program: ls}\n  workspace: {hostPath: ./src}\n  files:\n    - {path: /a, fromFile: data/a.txt}\n    - {path: /b, fromFile: /etc/hostname}\n  secretEnv:\n    - {name: K, fromFile: key}\n",
    )
    .unwrap();
    let mut parsed = parse_file(&file).unwrap().remove(0);
    parsed.resolve_host_paths();
    let Resource::AgentRun(run) = &parsed.resource else {
        panic!()
    };
    let base = std::path::absolute(dir.path()).unwrap();
    assert_eq!(
        run.spec.workspace.as_ref().unwrap().host_path.as_deref(),
        Some(base.join("./src").as_path())
    );
    assert_eq!(
        run.spec.files[0].from_file.as_deref(),
        Some(base.join("data/a.txt").as_path())
    );
    assert_eq!(
        run.spec.files[1].from_file.as_deref(),
        Some(std::path::Path::new("/etc/hostname"))
    );
    assert_eq!(
        run.spec.secret_env[0].from_file.as_deref(),
        Some(base.join("key").as_path())
    );
}

#[test]
fn spec_hash_is_pinned() {
    // Changing the canonical form (field names, defaults that serialize)
    // makes every stored object look drifted after an upgrade: do it
    // knowingly, and update this value.
    let hash = spec_hash(&Image::new("i", ImageSpec::default()).into());
    let mut canonical = String::new();
    resource::write_canonical_json(
        &serde_json::to_value(ImageSpec::default()).unwrap(),
        &mut canonical,
    );
    assert_eq!(
        canonical,
        r#"{"diskSizeMib":2048,"distro":"debian","kernel":"host","suite":"bookworm"}"#
    );
    assert_eq!(hash.len(), 64);
    assert!(hash
        .chars()
        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_uppercase()));
}

#[test]
fn domain_rules_are_validated() {
    let filter = |domains: Vec<&str>, protocol: Protocol, dest: bool| {
        let mut rule = EgressRule::domains(domains);
        rule.protocol = protocol;
        if dest {
            rule.destinations = vec!["10.0.0.0/8".parse().unwrap()];
        }
        let spec = NetworkFilterSpec {
            egress: vec![rule],
            allow_dhcp: true,
            allow_established: true,
        };
        errors_of(&NetworkFilter::new("f", spec).into())
    };
    let ok = vec![
        "api.anthropic.com",
        "github.com",
        "*.githubusercontent.com",
        "PyPI.org",
        "xn--bcher-kva.example",
    ];
    assert_eq!(filter(ok, Protocol::Tcp, false), Vec::<String>::new());
    let bad = vec![
        "",
        "10.1.2.3",
        "::1",
        "[2001:db8::1]",
        "api.*.com",
        "a*.example.com",
        "*.com",
        "localhost",
        "example.com.",
        "exa mple.com",
        "-bad.example.com",
        "a..b.com",
        "bücher.example",
        "1.2.3.4.5",
    ];
    assert_eq!(
        filter(bad, Protocol::Tcp, false),
        vec![
            "spec.egress[0].domains[0]: is empty; write a name such as `api.example.com`",
            "spec.egress[0].domains[1]: `10.1.2.3` is an IP address, not a domain name; allow addresses with `destinations` (CIDR) in a rule without `domains`",
            "spec.egress[0].domains[2]: `::1` is an IP address, not a domain name; allow addresses with `destinations` (CIDR) in a rule without `domains`",
            "spec.egress[0].domains[3]: `[2001:db8::1]` is an IP address, not a domain name; allow addresses with `destinations` (CIDR) in a rule without `domains`",
            "spec.egress[0].domains[4]: `api.*.com` has a `*` that is not the whole first label; only a leading `*.` wildcard is supported (e.g. `*.example.com`)",
            "spec.egress[0].domains[5]: `a*.example.com` has a `*` that is not the whole first label; only a leading `*.` wildcard is supported (e.g. `*.example.com`)",
            "spec.egress[0].domains[6]: `*.com` matches a whole top-level domain; name at least two labels after `*.`",
            "spec.egress[0].domains[7]: `localhost` is a single label; write a fully qualified name such as `localhost.example.com`",
            "spec.egress[0].domains[8]: `example.com.` ends with a dot; write `example.com`",
            "spec.egress[0].domains[9]: `exa mple.com` has characters other than letters, digits, `-` and `_` (write internationalised names in their `xn--` form)",
            "spec.egress[0].domains[10]: `-bad.example.com` has a label starting or ending with `-`",
            "spec.egress[0].domains[11]: `a..b.com` has an empty label (`..`)",
            "spec.egress[0].domains[12]: `bücher.example` has characters other than letters, digits, `-` and `_` (write internationalised names in their `xn--` form)",
            "spec.egress[0].domains[13]: `1.2.3.4.5` ends in a numeric label, which no domain name does; for addresses use `destinations`",
        ]
    );
    assert_eq!(
        filter(vec!["example.com"], Protocol::Udp, true),
        vec![
            "spec.egress[0].protocol: `udp` with `domains`; domain rules are tcp only (names are read from TLS SNI or the HTTP Host header)",
            "spec.egress[0].destinations: cannot be combined with `domains` (the proxy checks that the address belongs to the name); put addresses in a rule of their own",
        ]
    );
    let many: Vec<String> = (0..1001).map(|i| format!("h{i}.example.com")).collect();
    assert_eq!(
        filter(many.iter().map(String::as_str).collect(), Protocol::Tcp, false),
        vec!["spec.egress: 1001 domain names; a filter holds at most 1000 (use `*.` wildcards to combine names)"]
    );
}

#[test]
fn domain_rules_match_names_and_ports() {
    let mut rule = EgressRule::domains(["api.example.com", "*.cdn.example.net"]);
    let spec = NetworkFilterSpec {
        egress: vec![rule.clone()],
        allow_dhcp: true,
        allow_established: true,
    };
    assert!(spec.has_domain_rules());
    assert!(spec.allows_domain("api.example.com", 443));
    assert!(spec.allows_domain("API.Example.COM", 80));
    assert!(!spec.allows_domain("api.example.com", 8080));
    assert!(!spec.allows_domain("example.com", 443));
    assert!(!spec.allows_domain("xapi.example.com", 443));
    assert!(spec.allows_domain("a.cdn.example.net", 443));
    assert!(spec.allows_domain("a.b.cdn.example.net", 443));
    assert!(!spec.allows_domain("cdn.example.net", 443));
    assert!(!spec.allows_domain("evilcdn.example.net", 443));
    rule.ports = vec![PortRange::single(8443)];
    assert!(rule.allows_domain("api.example.com"));
    assert_eq!(rule.domain_ports(), vec![PortRange::single(8443)]);
    assert!(!NetworkFilterSpec::predecessor_default().has_domain_rules());
}

#[test]
fn egress_summaries_count_every_connection_and_list_at_most_50_destinations() {
    let mut s = agentvm_api::EgressSummary::default();
    s.add("a.example.com", 443, "allowed", 10, 100);
    s.add("b.example.com", 443, "denied", 0, 0);
    s.add("a.example.com", 443, "allowed", 5, 50);
    assert_eq!((s.connections, s.allowed, s.refused), (3, 2, 1));
    assert_eq!((s.bytes_out, s.bytes_in), (15, 150));
    assert_eq!(s.destinations[0].domain, "a.example.com", "busiest first");
    assert_eq!(s.destinations[0].connections, 2);
    for i in 0..100 {
        s.add(&format!("h{i}.example.com"), 80, "denied", 0, 0);
    }
    assert_eq!(s.destinations.len(), 50);
    assert!(s.truncated);
    assert_eq!(s.connections, 103, "the totals still count them");
}
