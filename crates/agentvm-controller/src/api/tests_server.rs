//! The API server and client together, over a real Unix socket.

use std::io::Read;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;

use agentvm_api::{AgentRun, AgentRunSpec, Kind};
use tokio::sync::watch;

use super::server::{bind, serve, ApiState};
use agentvm_client::Client;
use agentvm_client::{ApplyRequest, WatchChange};
use agentvm_store::{ApplyOptions, ApplyOutcome, Manager, OutputStream, Store, STORE_FILE};

struct TestServer {
    _dir: tempfile::TempDir,
    store: Store,
    socket: PathBuf,
    stop: watch::Sender<bool>,
    rt: tokio::runtime::Runtime,
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.stop.send(true);
    }
}

fn start() -> TestServer {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
    let socket = dir.path().join("run").join("api.sock");
    let (stop, rx) = watch::channel(false);
    let listener = {
        let _guard = rt.enter();
        bind(&socket).unwrap()
    };
    let state = ApiState {
        store: store.clone(),
        spec_dir: None,
        shutdown: rx.clone(),
        sandboxes: Some(super::server::SandboxAccess {
            backend: std::sync::Arc::new(agentvm_backend::fake::FakeBackend::new()),
            sandboxes: std::sync::Arc::new(crate::reconcilers::Sandboxes::new()),
        }),
        audit: None,
        membership: None,
    };
    let mut until = rx;
    rt.spawn(serve(listener, state, async move {
        let _ = until.wait_for(|v| *v).await;
    }));
    TestServer {
        _dir: dir,
        store,
        socket,
        stop,
        rt,
    }
}

fn example(name: &str) -> ApplyRequest {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../examples")
        .join(name);
    let parsed = agentvm_api::parse_file(&path).unwrap();
    ApplyRequest {
        objects: parsed
            .iter()
            .map(|p| serde_json::to_value(&p.resource).unwrap())
            .collect(),
        sources: parsed.iter().map(|p| p.source.to_string()).collect(),
        ..ApplyRequest::default()
    }
}

fn outcomes(resp: &agentvm_client::ApplyResponse) -> Vec<String> {
    resp.results
        .iter()
        .map(|r| {
            format!(
                "{}/{} {}",
                r.kind,
                r.name,
                r.outcome
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| r.error.clone().unwrap_or_default())
            )
        })
        .collect()
}

#[test]
fn apply_get_list_delete() {
    let s = start();
    let c = Client::new(&s.socket);
    let mode = std::fs::metadata(&s.socket).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o660);
    assert!(c.health().unwrap().ok);

    let req = example("hello-isolated.yaml");
    let resp = c.apply(&req).unwrap();
    assert_eq!(
        outcomes(&resp),
        [
            "Image/debian-base created",
            "VmPool/sandbox created",
            "AgentRun/hello created"
        ]
    );
    assert!(resp.results[0]
        .source
        .as_deref()
        .unwrap()
        .ends_with("hello-isolated.yaml:10"));
    let resp = c.apply(&req).unwrap();
    assert!(resp
        .results
        .iter()
        .all(|r| r.outcome == Some(ApplyOutcome::Unchanged)));

    // Dry run of a change: reported, not written.
    let mut changed = req.clone();
    changed.objects[1]["spec"]["maxSize"] = 5.into();
    changed.dry_run = true;
    let resp = c.apply(&changed).unwrap();
    assert!(resp.dry_run);
    assert_eq!(resp.results[1].outcome, Some(ApplyOutcome::Configured));
    assert_eq!(c.get(Kind::VmPool, "sandbox").unwrap().generation(), 1);

    // List, filter, get.
    assert_eq!(c.list(None, None).unwrap().len(), 3);
    let pools = c.list(Some(Kind::VmPool), Some("tier=untrusted")).unwrap();
    assert_eq!(pools.len(), 1);
    assert!(c
        .list(Some(Kind::VmPool), Some("tier=trusted"))
        .unwrap()
        .is_empty());
    let got = c.get(Kind::AgentRun, "hello").unwrap();
    assert_eq!(got.manager, Manager::Api);
    let err = c.get(Kind::AgentRun, "nope").unwrap_err();
    assert!(err.is_not_found());
    assert_eq!(err.to_string(), "AgentRun/nope not found");

    // Unknown kinds in the URL get a did-you-mean.
    let mut resp = c
        .request("GET", "/v1/objects/VmPol/sandbox", None, None)
        .unwrap();
    let mut body = String::new();
    resp.body.read_to_string(&mut body).unwrap();
    assert_eq!(resp.status, 400);
    assert!(body.contains("did you mean `VmPool`"), "{body}");

    // Delete: marked (no dispatcher runs here), 404 for a missing one.
    let d = c.delete(Kind::AgentRun, "hello", false).unwrap();
    assert!(d.deletion_requested);
    assert!(c.get(Kind::AgentRun, "hello").unwrap().is_deleting());
    assert!(c
        .delete(Kind::AgentRun, "ghost", false)
        .unwrap_err()
        .is_not_found());
    drop(s);
}

#[test]
fn invalid_requests_are_refused_with_details() {
    let s = start();
    let c = Client::new(&s.socket);
    let mut req = example("hello-isolated.yaml");
    req.objects[1]["metadata"]["name"] = "Bad_Name".into();
    req.objects[2]["spec"]["timeoutSeconds"] = 0.into();
    let err = c.apply(&req).unwrap_err();
    assert_eq!(err.status(), Some(422));
    let text = err.to_string();
    assert!(
        text.starts_with("invalid objects; nothing was applied"),
        "{text}"
    );
    assert!(
        text.contains("hello-isolated.yaml:20: metadata.name:"),
        "{text}"
    );
    assert!(text.contains("spec.timeoutSeconds"), "{text}");
    assert!(s.store.is_empty().unwrap());

    // A duplicate in one request.
    let mut dup = example("hello-isolated.yaml");
    dup.objects.push(dup.objects[0].clone());
    assert_eq!(c.apply(&dup).unwrap_err().status(), Some(422));

    // Not JSON at all.
    let mut resp = c
        .request("POST", "/v1/apply", Some(b"{nope"), None)
        .unwrap();
    assert_eq!(resp.status, 400);
    let mut body = String::new();
    resp.body.read_to_string(&mut body).unwrap();
    assert!(body.contains("invalid request body"), "{body}");

    // Too large.
    let big = vec![b' '; agentvm_client::MAX_BODY_BYTES + 1];
    let mut resp = c.request("POST", "/v1/apply", Some(&big), None).unwrap();
    assert_eq!(resp.status, 413);
    let mut body = String::new();
    resp.body.read_to_string(&mut body).unwrap();
    assert!(body.contains("larger than 8 MiB"), "{body}");
}

#[test]
fn spec_dir_objects_are_protected_from_the_api() {
    let s = start();
    let c = Client::new(&s.socket);
    let req = example("hello-isolated.yaml");
    let image: agentvm_api::Resource = serde_json::from_value(req.objects[0].clone()).unwrap();
    s.store
        .apply(
            image,
            Manager::SpecDir {
                file: "base.yaml".into(),
            },
            ApplyOptions::default(),
        )
        .unwrap();
    let resp = c.apply(&req).unwrap();
    let err = resp.results[0].error.as_deref().unwrap();
    assert!(
        err.starts_with("Image/debian-base is managed by spec-dir file base.yaml"),
        "{err}"
    );
    assert_eq!(resp.results[1].outcome, Some(ApplyOutcome::Created));
    let err = c.delete(Kind::Image, "debian-base", false).unwrap_err();
    assert_eq!(err.status(), Some(409));
    // Forced.
    let mut forced = req.clone();
    forced.force = true;
    let resp = c.apply(&forced).unwrap();
    assert_eq!(resp.results[0].outcome, Some(ApplyOutcome::Configured));
    assert_eq!(
        c.get(Kind::Image, "debian-base").unwrap().manager,
        Manager::Api
    );
}

#[test]
fn watch_streams_events() {
    let s = start();
    let c = Client::new(&s.socket);
    c.apply(&example("hello-isolated.yaml")).unwrap();
    let mut events = c.watch(Some(Kind::VmPool), true).unwrap();
    let first = events.next().unwrap().unwrap();
    assert_eq!(first.change, WatchChange::Initial);
    assert_eq!(first.name.as_deref(), Some("sandbox"));
    // An Image change is filtered out; the pool's status change comes through.
    s.store
        .update_status_json(
            Kind::Image,
            "debian-base",
            serde_json::json!({"phase": "Ready"}),
        )
        .unwrap();
    s.store
        .update_status_json(
            Kind::VmPool,
            "sandbox",
            serde_json::json!({"phase": "Ready", "ready": 1}),
        )
        .unwrap();
    let e = events.next().unwrap().unwrap();
    assert_eq!(e.change, WatchChange::StatusChanged);
    assert_eq!(e.kind, Some(Kind::VmPool));
    assert_eq!(e.object.unwrap().status_json()["ready"], 1);
    s.store
        .request_delete(Kind::VmPool, "sandbox", None)
        .unwrap();
    s.store.finalize_delete(Kind::VmPool, "sandbox").unwrap();
    assert_eq!(
        events.next().unwrap().unwrap().change,
        WatchChange::DeleteRequested
    );
    let removed = events.next().unwrap().unwrap();
    assert_eq!(removed.change, WatchChange::Removed);
    assert!(removed.object.is_none());
    // Shutdown ends the stream.
    s.stop.send(true).unwrap();
    assert!(events.next().is_none());
}

#[test]
fn logs_read_and_follow() {
    let s = start();
    let c = Client::new(&s.socket);
    s.store
        .apply(
            AgentRun::new("r", AgentRunSpec::command("p", "true", vec![])).into(),
            Manager::Api,
            ApplyOptions::default(),
        )
        .unwrap();
    s.store
        .append_output("r", OutputStream::Stdout, b"one\n", 1 << 20)
        .unwrap();
    let mut logs = c.logs("r", 0, false).unwrap();
    let mut text = String::new();
    logs.body.read_to_string(&mut text).unwrap();
    assert_eq!(text, "one\n");
    assert_eq!(logs.next_offset, Some(4));
    assert!(!logs.truncated);
    assert!(c.logs("ghost", 0, false).unwrap_err().is_not_found());

    // Follow from offset 4: sees later output, ends when the run ends.
    let follower = {
        let c = c.clone();
        std::thread::spawn(move || {
            let mut logs = c.logs("r", 4, true).unwrap();
            let mut text = String::new();
            logs.body.read_to_string(&mut text).unwrap();
            text
        })
    };
    std::thread::sleep(std::time::Duration::from_millis(100));
    s.store
        .append_output("r", OutputStream::Stderr, b"two\n", 1 << 20)
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(100));
    s.store
        .append_output("r", OutputStream::Stdout, b"three\n", 1 << 20)
        .unwrap();
    s.store
        .update_status_json(
            Kind::AgentRun,
            "r",
            serde_json::json!({"phase": "Succeeded", "exitCode": 0}),
        )
        .unwrap();
    assert_eq!(follower.join().unwrap(), "two\nthree\n");
    let _ = &s.rt;
}

#[test]
fn a_live_socket_is_not_stolen() {
    let s = start();
    let _guard = s.rt.enter();
    let err = bind(&s.socket).unwrap_err();
    assert!(err.to_string().contains("already listening"), "{err}");
    // A stale socket file (nobody listening) is replaced.
    let stale = s.socket.with_file_name("stale.sock");
    drop(std::os::unix::net::UnixListener::bind(&stale).unwrap());
    assert!(bind(&stale).is_ok());
}

fn sandbox(name: &str, state: &str) -> agentvm_api::Resource {
    agentvm_api::parse_str(
        &format!("apiVersion: agentvm.dev/v1alpha1\nkind: Sandbox\nmetadata: {{name: {name}}}\nspec: {{poolRef: p, state: {state}}}\n"),
        "t.yaml",
    )
    .unwrap()
    .remove(0)
    .resource
}

#[test]
fn sandbox_verbs_check_the_request_the_state_and_who_declares_it() {
    use agentvm_api::SandboxState;
    let s = start();
    let c = Client::new(&s.socket);
    let exec = |name: &str, command: &[&str]| {
        c.sandbox_exec(
            name,
            &agentvm_client::SandboxExecRequest {
                command: command.iter().map(|a| a.to_string()).collect(),
                env: Default::default(),
                workdir: None,
                timeout_seconds: None,
            },
        )
        .map(|_| ())
        .unwrap_err()
    };
    // Unknown sandbox; an empty command.
    let err = exec("nope", &["true"]);
    assert_eq!(err.status(), Some(404), "{err}");
    let err = exec("nope", &[]);
    assert_eq!(err.status(), Some(400), "{err}");
    assert!(err.to_string().contains("`command` is empty"), "{err}");
    let err = c.sandbox_state("nope", SandboxState::Paused).unwrap_err();
    assert_eq!(err.status(), Some(404), "{err}");

    // Paused: exec refused with the way out; the state verb edits the spec.
    s.store
        .apply(
            sandbox("a", "Paused"),
            Manager::Api,
            ApplyOptions::default(),
        )
        .unwrap();
    let err = exec("a", &["true"]);
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(
        err.to_string().contains("agentvm resume sandbox/a"),
        "{err}"
    );
    let obj = c.sandbox_state("a", SandboxState::Stopped).unwrap();
    assert_eq!(obj.generation(), 2);
    match obj.resource {
        agentvm_api::Resource::Sandbox(sb) => assert_eq!(sb.spec.state, SandboxState::Stopped),
        other => panic!("{other:?}"),
    }
    let err = exec("a", &["true"]);
    assert!(err.to_string().contains("agentvm start sandbox/a"), "{err}");

    // Declared in the spec directory: the directory stays the truth.
    s.store
        .apply(
            sandbox("b", "Running"),
            Manager::SpecDir {
                file: "b.yaml".into(),
            },
            ApplyOptions::default(),
        )
        .unwrap();
    let err = c.sandbox_state("b", SandboxState::Paused).unwrap_err();
    assert_eq!(err.status(), Some(409), "{err}");
    assert!(err.to_string().contains("file b.yaml"), "{err}");
    // Bad environment names never reach a guest.
    let err = c
        .sandbox_exec(
            "b",
            &agentvm_client::SandboxExecRequest {
                command: vec!["env".into()],
                env: [("A=B".to_string(), "x".to_string())].into(),
                workdir: Some("relative".into()),
                timeout_seconds: Some(0),
            },
        )
        .map(|_| ())
        .unwrap_err();
    assert_eq!(err.status(), Some(400), "{err}");
}
