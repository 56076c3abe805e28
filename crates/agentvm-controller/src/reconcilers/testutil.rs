//! Test helpers: a store in a temp dir, a fake backend, manifests applied from YAML.

use std::sync::Arc;

use agentvm_api::Kind;
use agentvm_backend::fake::FakeBackend;
use agentvm_backend::Backend;

use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use crate::Config;
use agentvm_store::{ApplyOptions, Manager, Store, STORE_FILE};

pub(crate) struct Setup {
    _dir: tempfile::TempDir,
    pub store: Store,
    pub fake: Arc<FakeBackend>,
    pub ctx: Ctx,
}

impl Setup {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path().join(STORE_FILE)).unwrap();
        let ctx = Ctx::new(
            store.clone(),
            Arc::new(Config {
                state_dir: dir.path().to_path_buf(),
                cache_dir: dir.path().join("cache"),
                ..Config::default()
            }),
        );
        Setup {
            _dir: dir,
            store,
            fake: Arc::new(FakeBackend::new()),
            ctx,
        }
    }

    pub fn backend(&self) -> Arc<dyn Backend> {
        self.fake.clone()
    }

    pub fn apply(&self, yaml: &str) {
        for p in agentvm_api::parse_str(yaml, "test.yaml").unwrap() {
            self.store
                .apply(p.resource, Manager::Api, ApplyOptions::default())
                .unwrap();
        }
    }

    /// Applies object `kind/name` again through the API as submitted by user `uid` (not
    /// root, not its owner).
    pub fn resubmit_as(&self, kind: Kind, name: &str, uid: u32) {
        let obj = self.store.get(kind, name).unwrap().expect("object exists");
        self.store
            .apply_batch(
                vec![agentvm_store::ApplyItem {
                    resource: obj.resource,
                    manager: Manager::Api,
                    submitter: agentvm_store::caller::Caller {
                        uid,
                        gid: uid,
                        groups: vec![],
                        user: None,
                    },
                    force: false,
                }],
                false,
            )
            .unwrap();
    }

    pub fn reconcile(
        &self,
        r: &dyn Reconciler,
        kind: Kind,
        name: &str,
    ) -> Result<Action, ReconcileError> {
        let obj = Arc::new(self.store.get(kind, name).unwrap().expect("object exists"));
        // As the dispatcher does: a failure goes through the error policy.
        r.reconcile(obj.clone(), &self.ctx).inspect_err(|e| {
            r.error_policy(obj, e, &self.ctx);
        })
    }

    pub fn status(&self, kind: Kind, name: &str) -> serde_json::Value {
        self.store.get(kind, name).unwrap().unwrap().status_json()
    }

    /// Image `img`, as if built: Ready with its artifact paths.
    pub fn image_ready(&self) {
        self.apply(
            "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {name: img}\nspec: {}\n",
        );
        self.store
            .update_status_json(Kind::Image,
                "img",
                serde_json::json!({"phase": "Ready", "diskPath": "/c/disk.qcow2", "kernelPath": "/c/vmlinuz", "initrdPath": "/c/initrd.img"}),
            )
            .unwrap();
    }
}

/// (status, reason) of condition `type_`.
pub(crate) fn cond(status: &serde_json::Value, type_: &str) -> (String, String) {
    let c = status["conditions"]
        .as_array()
        .and_then(|a| a.iter().find(|c| c["type"] == type_))
        .unwrap_or_else(|| panic!("no condition {type_} in {status}"));
    (
        c["status"].as_str().unwrap().to_string(),
        c["reason"].as_str().unwrap_or("").to_string(),
    )
}

pub(crate) fn attached_pool(name: &str, net: &str, filter: &str) -> String {
    format!("apiVersion: agentvm.dev/v1alpha1\nkind: VmPool\nmetadata: {{name: {name}}}\nspec:\n  template:\n    imageRef: img\n    network: {{mode: attached, networkRef: {net}, filterRef: {filter}}}\n")
}
