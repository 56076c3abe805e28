// The store's rules, whatever holds its records: included by `tests.rs` once per
// record store (the local file, a real etcd), where `temp_store` gives a fresh store.

#[test]
fn generation_follows_spec_changes_only() {
    let (_d, store) = temp_store();
    let o = store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    assert_eq!(o, ApplyOutcome::Created);
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.generation(), 1);
    // Same object again: unchanged, nothing written.
    let o = store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    assert_eq!(o, ApplyOutcome::Unchanged);
    assert_eq!(store.get(Kind::Image, "base").unwrap().unwrap(), got);
    // A label: configured, generation unchanged.
    let mut labelled = image("base", "bookworm");
    labelled
        .metadata_mut()
        .labels
        .insert("team".into(), "a".into());
    let o = store.apply(labelled, Manager::Api, API).unwrap();
    assert_eq!(o, ApplyOutcome::Configured);
    assert_eq!(
        store
            .get(Kind::Image, "base")
            .unwrap()
            .unwrap()
            .generation(),
        1
    );
    // A spec change: generation 2; a generation in the input is ignored.
    let mut changed = image("base", "trixie");
    changed.metadata_mut().generation = 40;
    let o = store.apply(changed, Manager::Api, API).unwrap();
    assert_eq!(o, ApplyOutcome::Configured);
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.generation(), 2);
    assert!(got.resource.metadata().labels.is_empty());
    // Dry run reports, writes nothing.
    let o = store
        .apply(
            image("base", "bookworm"),
            Manager::Api,
            ApplyOptions {
                dry_run: true,
                ..API
            },
        )
        .unwrap();
    assert_eq!(o, ApplyOutcome::Configured);
    assert_eq!(
        store
            .get(Kind::Image, "base")
            .unwrap()
            .unwrap()
            .generation(),
        2
    );
}

#[test]
fn status_is_kept_by_apply_and_does_not_bump_generation() {
    let (_d, store) = temp_store();
    store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    let status = ImageStatus {
        phase: agentvm_api::ImagePhase::Ready,
        observed_generation: Some(1),
        ..ImageStatus::default()
    };
    assert!(store.update_status("base", status.clone()).unwrap());
    assert!(!store.update_status("base", status).unwrap());
    // A status in the applied object is ignored; the stored one stays.
    let mut with_status = image("base", "trixie");
    if let Resource::Image(i) = &mut with_status {
        i.status = Some(ImageStatus::default());
    }
    store.apply(with_status, Manager::Api, API).unwrap();
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.generation(), 2);
    assert_eq!(got.status_json()["phase"], "Ready");
    assert_eq!(got.status_json()["observedGeneration"], 1);
    // A status of another kind's name is not found.
    let err = store
        .update_status("base", agentvm_api::VmPoolStatus::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)), "{err}");
    let err = store
        .update_status("nope", ImageStatus::default())
        .unwrap_err();
    assert!(matches!(err, StoreError::NotFound(_)));
    // A changed field is written.
    let mut st = ImageStatus::of(&got.resource).cloned().unwrap();
    st.digest = Some("abc".into());
    assert!(store.update_status("base", st).unwrap());
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.status_json()["digest"], "abc");
}

#[test]
fn invalid_objects_are_refused() {
    let (_d, store) = temp_store();
    let mut bad = image("base", "bookworm");
    bad.metadata_mut().name = "Bad_Name".into();
    let err = store.apply(bad, Manager::Api, API).unwrap_err();
    assert!(matches!(err, StoreError::Invalid { .. }), "{err}");
    assert!(err.to_string().contains("metadata.name"), "{err}");
    assert!(store.is_empty().unwrap());
}

#[test]
fn the_last_submitter_is_recorded_and_a_new_one_is_a_change() {
    let (_d, store) = temp_store();
    let alice = Caller {
        uid: 1000,
        gid: 1000,
        groups: vec![998],
        user: Some("alice".into()),
    };
    let as_ = |who: &Caller| {
        store
            .apply_batch(
                vec![ApplyItem {
                    resource: run("r"),
                    manager: Manager::Api,
                    submitter: who.clone(),
                    force: false,
                }],
                false,
            )
            .unwrap()
            .remove(0)
            .unwrap()
    };
    assert_eq!(as_(&Caller::root()), ApplyOutcome::Created);
    assert_eq!(as_(&Caller::root()), ApplyOutcome::Unchanged);
    // The same spec from someone else: it now runs with their rights.
    assert_eq!(as_(&alice), ApplyOutcome::Configured);
    let got = store.get(Kind::AgentRun, "r").unwrap().unwrap();
    assert_eq!(got.submitter.as_ref(), Some(&alice));
    assert_eq!(got.generation(), 1);
    assert_eq!(as_(&alice), ApplyOutcome::Unchanged);
    // Who asked for the deletion is kept too.
    assert!(store
        .request_delete_as(Kind::AgentRun, "r", Some(&Manager::Api), Some(&alice))
        .unwrap());
    let got = store.get(Kind::AgentRun, "r").unwrap().unwrap();
    assert_eq!(got.deletion_requested_by, Some(alice));
    // Records from before submitters were recorded still load.
    let mut old = serde_json::to_value(&got).unwrap();
    old.as_object_mut().unwrap().remove("submitter");
    let old: StoredObject = serde_json::from_value(old).unwrap();
    assert_eq!(old.submitter, None);
}

#[test]
fn managers_conflict_unless_forced() {
    let (_d, store) = temp_store();
    store
        .apply(image("base", "bookworm"), spec_dir("a.yaml"), API)
        .unwrap();
    let err = store
        .apply(image("base", "trixie"), Manager::Api, API)
        .unwrap_err();
    match &err {
        StoreError::Conflict { manager, .. } => assert_eq!(*manager, spec_dir("a.yaml")),
        other => panic!("{other}"),
    }
    assert!(err.to_string().contains("spec-dir file a.yaml"), "{err}");
    // Another spec-dir file is another manager too.
    let err = store
        .apply(image("base", "bookworm"), spec_dir("b.yaml"), API)
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    // Deleting through the API is refused as well.
    let err = store
        .request_delete(Kind::Image, "base", Some(&Manager::Api))
        .unwrap_err();
    assert!(matches!(err, StoreError::Conflict { .. }));
    // Forced takeover: configured (the manager changed), generation unchanged.
    let o = store
        .apply(
            image("base", "bookworm"),
            Manager::Api,
            ApplyOptions { force: true, ..API },
        )
        .unwrap();
    assert_eq!(o, ApplyOutcome::Configured);
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.manager, Manager::Api);
    assert_eq!(got.generation(), 1);
}

#[test]
fn deletion_is_two_phase() {
    let (_d, store) = temp_store();
    let mut events = store.subscribe();
    store.apply(run("r1"), Manager::Api, API).unwrap();
    store
        .append_output("r1", OutputStream::Stdout, b"hello", 1 << 20)
        .unwrap();
    assert!(!store.finalize_delete(Kind::AgentRun, "r1").unwrap());
    assert!(store
        .request_delete(Kind::AgentRun, "r1", Some(&Manager::Api))
        .unwrap());
    assert!(store.request_delete(Kind::AgentRun, "r1", None).unwrap());
    let got = store.get(Kind::AgentRun, "r1").unwrap().unwrap();
    assert!(got.is_deleting());
    assert_eq!(store.list(None).unwrap().len(), 1);
    assert!(store.finalize_delete(Kind::AgentRun, "r1").unwrap());
    assert!(store.get(Kind::AgentRun, "r1").unwrap().is_none());
    assert!(!store.request_delete(Kind::AgentRun, "r1", None).unwrap());
    // The output went with the run: a new run of that name starts empty.
    store.apply(run("r1"), Manager::Api, API).unwrap();
    assert_eq!(store.read_output("r1", 0, 1 << 20).unwrap().total, 0);
    let changes: Vec<Change> = std::iter::from_fn(|| events.try_recv().ok())
        .map(|e| e.change)
        .collect();
    assert_eq!(
        changes,
        [
            Change::Applied,
            Change::DeleteRequested,
            Change::Removed,
            Change::Applied
        ]
    );
}

#[test]
fn apply_cancels_a_pending_deletion() {
    let (_d, store) = temp_store();
    store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    store.request_delete(Kind::Image, "base", None).unwrap();
    let o = store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    assert_eq!(o, ApplyOutcome::Configured);
    assert!(!store
        .get(Kind::Image, "base")
        .unwrap()
        .unwrap()
        .is_deleting());
    // A reconciler that finished its cleanup meanwhile cannot remove it.
    assert!(!store.finalize_delete(Kind::Image, "base").unwrap());
    assert!(store.get(Kind::Image, "base").unwrap().is_some());
}

#[test]
fn list_is_sorted_and_filtered() {
    let (_d, store) = temp_store();
    for name in ["zeta", "alpha", "mid"] {
        store
            .apply(image(name, "bookworm"), Manager::Api, API)
            .unwrap();
        store.apply(run(name), Manager::Api, API).unwrap();
    }
    let names: Vec<String> = store
        .list(None)
        .unwrap()
        .iter()
        .map(|o| o.key().to_string())
        .collect();
    assert_eq!(
        names,
        [
            "Image/alpha",
            "Image/mid",
            "Image/zeta",
            "AgentRun/alpha",
            "AgentRun/mid",
            "AgentRun/zeta"
        ]
    );
    assert_eq!(store.list(Some(Kind::AgentRun)).unwrap().len(), 3);
    assert!(store.list(Some(Kind::VmPool)).unwrap().is_empty());
}

#[test]
fn concurrent_readers_see_whole_objects() {
    let (_d, store) = temp_store();
    store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let readers: Vec<_> = (0..4)
        .map(|_| {
            let store = store.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let mut reads = 0u64;
                while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                    let obj = store.get(Kind::Image, "base").unwrap().unwrap();
                    // Generation and spec always belong together.
                    let suite = obj.resource.spec_json()["suite"].clone();
                    let g = obj.generation();
                    let want = if g % 2 == 1 { "bookworm" } else { "trixie" };
                    assert_eq!(suite, want, "generation {g}");
                    assert_eq!(store.list(None).unwrap().len(), 1);
                    reads += 1;
                }
                reads
            })
        })
        .collect();
    for i in 0..50 {
        let suite = if i % 2 == 0 { "trixie" } else { "bookworm" };
        store
            .apply(image("base", suite), Manager::Api, API)
            .unwrap();
    }
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads: u64 = readers.into_iter().map(|r| r.join().unwrap()).sum();
    assert!(reads > 0);
    assert_eq!(
        store
            .get(Kind::Image, "base")
            .unwrap()
            .unwrap()
            .generation(),
        51
    );
}

#[test]
fn batch_results_are_per_object() {
    let (_d, store) = temp_store();
    store
        .apply(image("taken", "bookworm"), spec_dir("a.yaml"), API)
        .unwrap();
    let items = vec![
        ApplyItem {
            resource: image("fresh", "bookworm"),
            manager: Manager::Api,
            submitter: crate::caller::Caller::root(),
            force: false,
        },
        ApplyItem {
            resource: image("taken", "bookworm"),
            manager: Manager::Api,
            submitter: crate::caller::Caller::root(),
            force: false,
        },
    ];
    let results = store.apply_batch(items, false).unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &ApplyOutcome::Created);
    assert!(matches!(results[1], Err(StoreError::Conflict { .. })));
    assert!(store.get(Kind::Image, "fresh").unwrap().is_some());
}

#[test]
fn a_pool_whose_disk_is_smaller_than_its_known_image_is_refused() {
    let (_d, store) = temp_store();
    let parse = |text: &str| {
        agentvm_api::parse_str(text, "t.yaml").unwrap()[0]
            .resource
            .clone()
    };
    let big_image = |name: &str| {
        parse(&format!("apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {{name: {name}}}\nspec: {{diskSizeMib: 4096}}\n"))
    };
    let pool = |name: &str, image: &str, disk: u32| {
        parse(&format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {name}}}\nspec:\n  template:\n    imageRef: {image}\n    resources: {{profile: custom, vcpu: 1, memoryMib: 512, diskGib: {disk}}}\n"))
    };
    let item = |resource| ApplyItem {
        resource,
        manager: Manager::Api,
        submitter: Caller::root(),
        force: false,
    };
    // The image in the same batch.
    let results = store
        .apply_batch(
            vec![item(big_image("big")), item(pool("small", "big", 3))],
            false,
        )
        .unwrap();
    assert_eq!(results[0].as_ref().unwrap(), &ApplyOutcome::Created);
    let err = results[1].as_ref().unwrap_err().to_string();
    assert!(
        err.contains(
            "spec.template.resources.diskGib: 3 GiB is smaller than Image `big`'s disk (4096 MiB)"
        ) && err.contains("at least 4 GiB"),
        "{err}"
    );
    // The image already stored.
    let err = store
        .apply(pool("small", "big", 2), Manager::Api, API)
        .unwrap_err()
        .to_string();
    assert!(err.contains("diskGib: 2 GiB is smaller"), "{err}");
    assert_eq!(
        store
            .apply(pool("fits", "big", 4), Manager::Api, API)
            .unwrap(),
        ApplyOutcome::Created
    );
    // The image unknown: accepted (the pool reports it once the image appears).
    assert_eq!(
        store
            .apply(pool("later", "nope", 1), Manager::Api, API)
            .unwrap(),
        ApplyOutcome::Created
    );
    assert!(store.get(Kind::VmPool, "small").unwrap().is_none());
}

#[test]
fn a_sandbox_keeps_its_status_when_its_spec_changes() {
    let (_d, store) = temp_store();
    let text = |state: &str| {
        format!(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata:\n  name: s\nspec:\n  poolRef: p\n  state: {state}\n"
        )
    };
    let sandbox = |state: &str| {
        agentvm_api::parse_str(&text(state), "s.yaml").unwrap()[0]
            .resource
            .clone()
    };
    store.apply(sandbox("Running"), Manager::Api, API).unwrap();
    let status = agentvm_api::SandboxStatus {
        vm: Some("vm-1".into()),
        ..Default::default()
    };
    store.update_status("s", status.clone()).unwrap();
    store.apply(sandbox("Paused"), Manager::Api, API).unwrap();
    let got = store.get(Kind::Sandbox, "s").unwrap().unwrap();
    assert_eq!(got.generation(), 2);
    assert_eq!(agentvm_api::SandboxStatus::of(&got.resource), Some(&status));
}

#[test]
fn concurrent_spec_and_status_writers_lose_nothing() {
    let (_d, store) = temp_store();
    store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    let writer = {
        let store = store.clone();
        std::thread::spawn(move || {
            for i in 0..30 {
                let suite = if i % 2 == 0 { "trixie" } else { "bookworm" };
                store
                    .apply(image("base", suite), Manager::Api, API)
                    .unwrap();
            }
        })
    };
    for i in 0..30 {
        let status = ImageStatus {
            digest: Some(format!("status {i}")),
            ..Default::default()
        };
        store.update_status("base", status).unwrap();
    }
    writer.join().unwrap();
    let got = store.get(Kind::Image, "base").unwrap().unwrap();
    assert_eq!(got.generation(), 31, "every spec change counted once");
    assert_eq!(
        ImageStatus::of(&got.resource).and_then(|s| s.digest.clone()),
        Some("status 29".into()),
        "no status write was undone by an apply"
    );
}

#[test]
fn events_name_each_change() {
    let (_d, store) = temp_store();
    let mut events = store.subscribe();
    store
        .apply(image("base", "bookworm"), Manager::Api, API)
        .unwrap();
    store
        .update_status(
            "base",
            ImageStatus {
                digest: Some("x".into()),
                ..Default::default()
            },
        )
        .unwrap();
    store.request_delete(Kind::Image, "base", None).unwrap();
    store.finalize_delete(Kind::Image, "base").unwrap();
    let seen: Vec<Change> = next_events(&mut events, 4)
        .into_iter()
        .map(|e| e.change)
        .collect();
    assert_eq!(
        seen,
        vec![
            Change::Applied,
            Change::StatusChanged,
            Change::DeleteRequested,
            Change::Removed
        ]
    );
}
