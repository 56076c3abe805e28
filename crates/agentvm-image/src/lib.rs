//! agentvm guest images: a debootstrapped Debian root file system with
//! agentvm's own PID 1, turned into a qcow2 base disk plus kernel and initrd
//! for direct kernel boot, cached under `<cache>/images/<recipe hash>/`.
//!
//! ```no_run
//! use agentvm_image::{build, default_cache_dir, BuildEvent, Recipe};
//! let image = build(&Recipe::default(), &default_cache_dir(), &mut |event| {
//!     if let BuildEvent::Step { index, total, name } = event {
//!         eprintln!("[{index}/{total}] {name}");
//!     }
//! })?;
//! println!("boot {} with {:?}", image.disk.display(), image.cmdline);
//! # Ok::<(), agentvm_image::ImageError>(())
//! ```
//!
//! Guarantees: an image directory only ever appears complete (it is built in
//! `<cache>/images/.tmp-<hash>-<pid>/` and renamed into place, `image.json`
//! written last); two builds of one recipe never run at once (the second waits
//! for the first and reuses its image); leftovers of builds that died are
//! removed by the next build. Building needs root; looking up does not.

mod build;
mod cache;
mod command;
mod error;
pub mod guest;
mod kernel;
mod mounts;
mod recipe;

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

pub use build::build;
pub use cache::{
    default_cache_dir, FileEntry, ImageFiles, ImageMetadata, DISK_FILE, INITRD_FILE, KERNEL_FILE,
    METADATA_FILE,
};
pub use error::ImageError;
pub use kernel::{FileIdentity, KernelSource, ResolvedKernel};
pub use recipe::{Recipe, BASE_PACKAGES, DEFAULT_DISK_SIZE_MIB, KERNEL_CMDLINE};

/// A complete image in the cache: everything needed to boot a VM from it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuiltImage {
    /// The image directory, `<cache>/images/<recipe_hash>/`.
    pub dir: PathBuf,
    /// The qcow2 base disk (root file system on the whole disk, ext4, label
    /// `agentvm-root`). Never write to it: give each VM a qcow2 overlay.
    pub disk: PathBuf,
    /// The kernel, for direct kernel boot.
    pub kernel: PathBuf,
    /// The initrd matching [`BuiltImage::kernel`].
    pub initrd: PathBuf,
    /// Kernel command line (root=/dev/vda, console on ttyS0, agentvm's init).
    pub cmdline: String,
    /// The [`Recipe::hash`] this image was built from.
    pub recipe_hash: String,
}

/// Progress of [`build`], for a CLI to display.
#[derive(Debug, Clone, PartialEq)]
pub enum BuildEvent {
    /// A build phase starts (`index` counts from 1 to `total`).
    Step {
        /// Number of this step, from 1.
        index: usize,
        /// Number of steps in the build.
        total: usize,
        /// What the step does, e.g. "debootstrap bookworm".
        name: String,
    },
    /// A line of output from the running step (debootstrap's `I: Retrieving …`,
    /// setup command output, or a note from the builder).
    Line(String),
    /// The image is built and in place.
    Done {
        /// The new image.
        image: BuiltImage,
        /// How long the whole build took.
        elapsed: Duration,
    },
    /// An image for this recipe was already in the cache; nothing was built.
    Reused,
}

/// Finds the cached image of `recipe` under `cache_dir`, without building.
///
/// Fast (a few `stat` calls and reading `image.json`). `Ok(None)` when there is
/// no complete image; errors only when the recipe's kernel cannot be resolved.
pub fn lookup(recipe: &Recipe, cache_dir: &Path) -> Result<Option<BuiltImage>, ImageError> {
    let hash = recipe.try_hash()?;
    Ok(cache::read_image(
        &cache::images_dir(cache_dir).join(&hash),
        &hash,
    ))
}
