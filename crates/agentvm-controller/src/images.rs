//! From `Image` manifests to image-builder recipes.

use agentvm_api::ImageSpec;
use agentvm_image::Recipe;

/// The builder recipe for an `Image` spec. The default `ImageSpec` maps to
/// [`default_recipe`], so `agentvm exec`, the tests and `Image` objects with default specs
/// share one cached image.
pub fn recipe_for(spec: &ImageSpec) -> Recipe {
    Recipe {
        suite: spec.suite.clone(),
        packages: spec.packages.clone(),
        setup_commands: spec.setup_commands.clone(),
        disk_size_mib: u64::from(spec.disk_size_mib),
        mirror: spec.mirror.clone(),
        ..Recipe::default()
    }
}

/// The recipe of the default image (`Image` with an empty spec).
pub fn default_recipe() -> Recipe {
    recipe_for(&ImageSpec::default())
}
