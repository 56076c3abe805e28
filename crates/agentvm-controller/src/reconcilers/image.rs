//! `Image` → a built guest image in the image cache (`<cache>/images/<recipe hash>/`).
//!
//! Every pass looks the recipe up (a few `stat` calls, well under a millisecond): found →
//! `Ready` with the artifact paths and the recipe hash. Missing (new object, or a changed
//! recipe) → a build starts on its own thread and the phase is `Building`, with the build's
//! current step in the `Progressing` condition; the reconciler polls every 2 s. A failed
//! build is `Failed`/`Degraded` with the error and retried after a growing delay (30 s,
//! doubling, at most 1 h) or at once when the recipe changes. Deleting an `Image` leaves the
//! cache alone (other objects may share the recipe).
//!
//! The recipe hash covers the host's kernel and guest agent (a directory listing, a few
//! `stat`s and a read of the kernel's header, then 10 KB of JSON hashed: about 70 µs), and
//! the lookup reads the image's metadata: together most of a no-op resync when 1,000 objects
//! share a recipe. So an image found in the cache is remembered per recipe for
//! [`FOUND_FRESH`]: the objects of one resync pass with the same spec cost one hash and one
//! lookup. A kernel or agent upgrade, or an image removed from the cache, is seen by the
//! first pass after that (nothing triggers a reconcile on those anyway but the resync).

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use agentvm_api::{ImagePhase, ImageSpec, ImageStatus, Kind, Reason, Resource};
use agentvm_image::{BuildEvent, BuiltImage, Recipe};

use super::{status_of, write_status, Conditions};
use crate::images::recipe_for;
use crate::reconcile::{Action, Ctx, ReconcileError, Reconciler};
use agentvm_store::StoredObject;

/// How often a running build is polled.
const BUILD_POLL: Duration = Duration::from_secs(2);
/// First retry delay after a failed build.
const RETRY_BASE: Duration = Duration::from_secs(30);
/// Longest retry delay after failed builds.
const RETRY_MAX: Duration = Duration::from_secs(3600);
/// How long an image found in the cache is trusted for the same spec without hashing the
/// recipe and looking it up again.
pub const FOUND_FRESH: Duration = Duration::from_secs(1);

/// Where built images come from: the real cache and builder, or a fake in tests.
pub trait ImageBuilder: Send + Sync {
    /// The built image of `recipe`, if it is in the cache. Must be cheap.
    fn lookup(&self, recipe: &Recipe) -> Result<Option<BuiltImage>, String>;
    /// Builds `recipe` (minutes), reporting progress lines.
    fn build(
        &self,
        recipe: &Recipe,
        progress: &mut dyn FnMut(String),
    ) -> Result<BuiltImage, String>;
}

/// [`ImageBuilder`] over `agentvm_image`'s cache directory.
#[derive(Debug, Clone)]
pub struct ImageCache {
    /// The cache directory (images live under `images/`).
    pub dir: PathBuf,
}

impl ImageBuilder for ImageCache {
    fn lookup(&self, recipe: &Recipe) -> Result<Option<BuiltImage>, String> {
        agentvm_image::lookup(recipe, &self.dir).map_err(|e| e.to_string())
    }

    fn build(
        &self,
        recipe: &Recipe,
        progress: &mut dyn FnMut(String),
    ) -> Result<BuiltImage, String> {
        agentvm_image::build(recipe, &self.dir, &mut |event| match event {
            BuildEvent::Step { index, total, name } => {
                progress(format!("step {index}/{total}: {name}"))
            }
            BuildEvent::Done { elapsed, .. } => {
                progress(format!("built in {:.0}s", elapsed.as_secs_f64()))
            }
            BuildEvent::Line(_) | BuildEvent::Reused => {}
        })
        .map_err(|e| e.to_string())
    }
}

#[derive(Debug, Clone)]
enum Build {
    Running {
        progress: String,
    },
    Failed {
        error: String,
        at: Instant,
        failures: u32,
    },
}

/// An image found in the cache for a spec, and when it was looked up.
#[derive(Debug, Clone)]
struct Found {
    spec: ImageSpec,
    image: BuiltImage,
    at: Instant,
}

/// Reconciles `Image` objects into built images.
pub struct ImageReconciler {
    builder: Arc<dyn ImageBuilder>,
    builds: Arc<Mutex<HashMap<String, Build>>>,
    /// Recently found images, one per distinct spec (few: most objects share a recipe).
    found: Mutex<Vec<Found>>,
}

impl ImageReconciler {
    /// A reconciler looking up and building through `builder`.
    pub fn new(builder: Arc<dyn ImageBuilder>) -> Self {
        Self {
            builder,
            builds: Arc::default(),
            found: Mutex::default(),
        }
    }

    /// The image found for `spec` less than [`FOUND_FRESH`] ago.
    fn recently_found(&self, spec: &ImageSpec) -> Option<BuiltImage> {
        self.found
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
            .find(|f| f.spec == *spec && f.at.elapsed() < FOUND_FRESH)
            .map(|f| f.image.clone())
    }

    /// Remembers what the lookup for `spec` found (or forgets it when nothing was).
    fn remember(&self, spec: &ImageSpec, image: Option<&BuiltImage>) {
        let mut found = self.found.lock().unwrap_or_else(|e| e.into_inner());
        found.retain(|f| f.spec != *spec && f.at.elapsed() < FOUND_FRESH);
        if let Some(image) = image {
            found.push(Found {
                spec: spec.clone(),
                image: image.clone(),
                at: Instant::now(),
            });
        }
    }

    /// `Ready` with the image's paths.
    fn ready(
        &self,
        obj: &StoredObject,
        ctx: &Ctx,
        mut status: ImageStatus,
        img: &BuiltImage,
    ) -> Result<Action, ReconcileError> {
        built(&mut status, img);
        write_status(ctx, obj, &status)?;
        Ok(Action::AwaitChange)
    }

    fn start_build(&self, hash: &str, recipe: Recipe, failures: u32) {
        let builds = self.builds.clone();
        let builder = self.builder.clone();
        let hash = hash.to_string();
        builds.lock().unwrap_or_else(|e| e.into_inner()).insert(
            hash.clone(),
            Build::Running {
                progress: "starting".into(),
            },
        );
        std::thread::spawn(move || {
            let set = |b: Build| {
                builds
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .insert(hash.clone(), b);
            };
            let result = builder.build(&recipe, &mut |line| {
                set(Build::Running { progress: line });
            });
            match result {
                Ok(img) => {
                    tracing::info!(image = %img.dir.display(), "image built");
                    builds
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .remove(&hash);
                }
                Err(error) => {
                    tracing::warn!(recipe = %hash, %error, "image build failed");
                    set(Build::Failed {
                        error,
                        at: Instant::now(),
                        failures: failures + 1,
                    });
                }
            }
        });
    }
}

/// When a failed build of a recipe may start again. This schedule is the build's, not the
/// work queue's per-object backoff: a pass that reports a failed build succeeds (the
/// failure is the object's state, `Failed`), and the pass that starts the retry succeeds
/// too, which resets the queue's count; with it, a failing build of several minutes would
/// start again every second or two.
fn retry_delay(failures: u32) -> Duration {
    crate::reconcile::backoff_delay(failures, RETRY_BASE, RETRY_MAX)
}

/// `Ready` with the artifact paths and recipe hash of `img`.
fn built(status: &mut ImageStatus, img: &BuiltImage) {
    status.phase = ImagePhase::Ready;
    status.disk_path = Some(img.disk.display().to_string());
    status.kernel_path = Some(img.kernel.display().to_string());
    status.initrd_path = Some(img.initrd.display().to_string());
    status.built_spec_hash = Some(img.recipe_hash.clone());
    Conditions(&mut status.conditions)
        .ready(Reason::Built, format!("image {}", img.disk.display()));
}

impl Reconciler for ImageReconciler {
    fn kind(&self) -> Kind {
        Kind::Image
    }

    fn reconcile(&self, obj: Arc<StoredObject>, ctx: &Ctx) -> Result<Action, ReconcileError> {
        let Resource::Image(image) = &obj.resource else {
            return Err(super::wrong_kind(&obj, Kind::Image));
        };
        if obj.is_deleting() {
            // The cache is shared by recipe; removing an object does not remove the image.
            ctx.store.finalize_delete(Kind::Image, image.name())?;
            return Ok(Action::AwaitChange);
        }
        let mut status: ImageStatus = status_of(&obj);
        status.observed_generation = Some(obj.generation());
        if let Some(img) = self.recently_found(&image.spec) {
            return self.ready(&obj, ctx, status, &img);
        }
        let recipe = recipe_for(&image.spec);
        let hash = match recipe.try_hash() {
            Ok(h) => h,
            Err(e) => {
                status.phase = ImagePhase::Failed;
                return Err(ReconcileError::new(Reason::RecipeInvalid, e.to_string())
                    .with_status(&obj, &status));
            }
        };
        let found = self
            .builder
            .lookup(&recipe)
            .map_err(|e| ReconcileError::new(Reason::CacheError, e))?;
        self.remember(&image.spec, found.as_ref());
        if let Some(img) = found {
            self.builds
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .remove(&hash);
            return self.ready(&obj, ctx, status, &img);
        }
        // Not in the cache: never report the paths of an older recipe.
        status.disk_path = None;
        status.kernel_path = None;
        status.initrd_path = None;
        status.built_spec_hash = None;
        let current = self
            .builds
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&hash)
            .cloned();
        match current {
            Some(Build::Running { progress }) => {
                status.phase = ImagePhase::Building;
                Conditions(&mut status.conditions).progressing(
                    Reason::Building,
                    format!("recipe {}: {progress}", &hash[..12]),
                );
                write_status(ctx, &obj, &status)?;
                Ok(Action::Requeue(BUILD_POLL))
            }
            Some(Build::Failed {
                error,
                at,
                failures,
            }) if at.elapsed() < retry_delay(failures) => {
                let err = ReconcileError::new(Reason::BuildFailed, error);
                status.phase = ImagePhase::Failed;
                Conditions(&mut status.conditions).degraded(&err, false);
                write_status(ctx, &obj, &status)?;
                Ok(Action::Requeue(
                    retry_delay(failures).saturating_sub(at.elapsed()),
                ))
            }
            previous => {
                let failures = match previous {
                    Some(Build::Failed { failures, .. }) => failures,
                    _ => 0,
                };
                self.start_build(&hash, recipe, failures);
                status.phase = ImagePhase::Building;
                Conditions(&mut status.conditions).progressing(
                    Reason::Building,
                    format!("recipe {}: starting", &hash[..12]),
                );
                write_status(ctx, &obj, &status)?;
                Ok(Action::Requeue(BUILD_POLL))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::reconcilers::testutil::*;
    use std::sync::mpsc;

    /// Builds wait for a message: `Ok(())` finishes, `Err(msg)` fails.
    struct FakeBuilder {
        built: Mutex<HashMap<String, BuiltImage>>,
        gate: Mutex<mpsc::Receiver<Result<(), String>>>,
        builds: Mutex<u32>,
        lookups: Mutex<u32>,
    }

    impl FakeBuilder {
        /// A builder whose builds end when `gate` says so.
        fn gated(gate: mpsc::Receiver<Result<(), String>>) -> Arc<Self> {
            Arc::new(FakeBuilder {
                built: Mutex::default(),
                gate: Mutex::new(gate),
                builds: Mutex::new(0),
                lookups: Mutex::new(0),
            })
        }
    }

    impl ImageBuilder for FakeBuilder {
        fn lookup(&self, recipe: &Recipe) -> Result<Option<BuiltImage>, String> {
            *self.lookups.lock().unwrap() += 1;
            Ok(self.built.lock().unwrap().get(&recipe.hash()).cloned())
        }
        fn build(
            &self,
            recipe: &Recipe,
            progress: &mut dyn FnMut(String),
        ) -> Result<BuiltImage, String> {
            *self.builds.lock().unwrap() += 1;
            progress("step 1/3: debootstrap".into());
            self.gate.lock().unwrap().recv().unwrap()?;
            let hash = recipe.hash();
            let dir = PathBuf::from("/cache/images").join(&hash);
            let img = BuiltImage {
                disk: dir.join("disk.qcow2"),
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
                cmdline: "x".into(),
                recipe_hash: hash.clone(),
                dir,
            };
            self.built.lock().unwrap().insert(hash, img.clone());
            Ok(img)
        }
    }

    fn wait_until(mut f: impl FnMut() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !f() {
            assert!(Instant::now() < deadline);
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    const IMG: &str =
        "apiVersion: agentvm.dev/v1alpha1\nkind: Image\nmetadata: {name: img}\nspec: {}\n";

    #[test]
    fn builds_when_missing_reports_progress_then_ready_and_rebuilds_on_recipe_change() {
        let t = Setup::new();
        t.apply(IMG);
        let (tx, rx) = mpsc::channel();
        let b = FakeBuilder::gated(rx);
        let r = ImageReconciler::new(b.clone());
        assert_eq!(
            t.reconcile(&r, Kind::Image, "img").unwrap(),
            Action::Requeue(BUILD_POLL)
        );
        assert_eq!(t.status(Kind::Image, "img")["phase"], "Building");
        wait_until(|| {
            t.reconcile(&r, Kind::Image, "img").unwrap();
            t.status(Kind::Image, "img")["conditions"]
                .to_string()
                .contains("debootstrap")
        });
        assert_eq!(
            cond(&t.status(Kind::Image, "img"), "Progressing"),
            ("True".into(), "Building".into())
        );
        // Passes during the build do not start another one.
        assert_eq!(*b.builds.lock().unwrap(), 1);
        tx.send(Ok(())).unwrap();
        wait_until(|| {
            t.reconcile(&r, Kind::Image, "img").unwrap();
            t.status(Kind::Image, "img")["phase"] == "Ready"
        });
        let s = t.status(Kind::Image, "img");
        let hash = recipe_for(&agentvm_api::ImageSpec::default()).hash();
        assert_eq!(s["builtSpecHash"], hash.as_str());
        assert!(s["diskPath"].as_str().unwrap().contains(&hash));
        assert_eq!(
            t.reconcile(&r, Kind::Image, "img").unwrap(),
            Action::AwaitChange
        );
        // A new recipe: Building again, and the old paths are gone from the status.
        t.apply(&IMG.replace("spec: {}", "spec: {packages: [git]}"));
        t.reconcile(&r, Kind::Image, "img").unwrap();
        let s = t.status(Kind::Image, "img");
        assert_eq!(s["phase"], "Building");
        assert!(s.get("diskPath").is_none());
        assert_eq!(s["observedGeneration"], 2);
        tx.send(Ok(())).unwrap();
    }

    #[test]
    fn a_failed_build_is_degraded_and_retried_later_not_in_a_loop() {
        let t = Setup::new();
        t.apply(IMG);
        let (tx, rx) = mpsc::channel();
        let b = FakeBuilder::gated(rx);
        let r = ImageReconciler::new(b.clone());
        t.reconcile(&r, Kind::Image, "img").unwrap();
        tx.send(Err("debootstrap: mirror unreachable".into()))
            .unwrap();
        wait_until(|| {
            t.reconcile(&r, Kind::Image, "img").unwrap();
            t.status(Kind::Image, "img")["phase"] == "Failed"
        });
        let s = t.status(Kind::Image, "img");
        assert_eq!(cond(&s, "Degraded"), ("True".into(), "BuildFailed".into()));
        assert!(s.to_string().contains("mirror unreachable"));
        let action = t.reconcile(&r, Kind::Image, "img").unwrap();
        assert!(
            matches!(action, Action::Requeue(d) if d > Duration::from_secs(20)),
            "{action:?}"
        );
        assert_eq!(*b.builds.lock().unwrap(), 1);
        // Deleting the object finalizes at once.
        t.store.request_delete(Kind::Image, "img", None).unwrap();
        t.reconcile(&r, Kind::Image, "img").unwrap();
        assert!(t.store.get(Kind::Image, "img").unwrap().is_none());
    }

    #[test]
    fn objects_sharing_a_found_recipe_cost_one_lookup_until_it_is_stale() {
        let t = Setup::new();
        let (_tx, rx) = mpsc::channel();
        let b = FakeBuilder::gated(rx);
        let hash = recipe_for(&agentvm_api::ImageSpec::default()).hash();
        let dir = PathBuf::from("/cache/images").join(&hash);
        b.built.lock().unwrap().insert(
            hash.clone(),
            BuiltImage {
                disk: dir.join("disk.qcow2"),
                kernel: dir.join("vmlinuz"),
                initrd: dir.join("initrd.img"),
                cmdline: "x".into(),
                recipe_hash: hash.clone(),
                dir,
            },
        );
        let r = ImageReconciler::new(b.clone());
        for i in 0..5 {
            t.apply(&IMG.replace("name: img", &format!("name: img{i}")));
            assert_eq!(
                t.reconcile(&r, Kind::Image, &format!("img{i}")).unwrap(),
                Action::AwaitChange
            );
            let s = t.status(Kind::Image, &format!("img{i}"));
            assert_eq!(s["phase"], "Ready");
            assert_eq!(s["builtSpecHash"], hash.as_str());
        }
        assert_eq!(*b.lookups.lock().unwrap(), 1);
        // Another spec is looked up on its own (and is missing: a build starts).
        t.apply(&IMG.replace("spec: {}", "spec: {packages: [git]}"));
        t.reconcile(&r, Kind::Image, "img").unwrap();
        assert_eq!(*b.lookups.lock().unwrap(), 2);
        assert_eq!(t.status(Kind::Image, "img")["phase"], "Building");
        // Past the freshness window the image is looked up again: removed from the cache,
        // it is no longer reported Ready.
        b.built.lock().unwrap().clear();
        std::thread::sleep(FOUND_FRESH);
        t.reconcile(&r, Kind::Image, "img0").unwrap();
        assert_eq!(*b.lookups.lock().unwrap(), 3);
        assert_eq!(t.status(Kind::Image, "img0")["phase"], "Building");
    }
}
