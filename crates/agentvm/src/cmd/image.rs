//! `agentvm image build|path`: the guest image, built once per recipe and cached.

use std::io::IsTerminal;
use std::time::Duration;

use agentvm_backend::vm::BootImage;
use agentvm_controller::Config;
use agentvm_image::{BuildEvent, BuiltImage, Recipe};
use clap::{Args, Subcommand};
use indicatif::{ProgressBar, ProgressStyle};

/// Guest image commands.
#[derive(Debug, Subcommand)]
pub enum ImageCommand {
    /// Build the guest image for a recipe (a no-op when it is cached already).
    Build(RecipeArgs),
    /// Print the cache directory of a recipe's image; exit 1 if it is not built.
    Path(RecipeArgs),
}

/// What goes into an image.
#[derive(Debug, Args, Clone)]
pub struct RecipeArgs {
    /// Debian suite.
    #[arg(long, default_value = "bookworm")]
    suite: String,
    /// Extra Debian package (repeatable).
    #[arg(long = "package", value_name = "PKG")]
    packages: Vec<String>,
    /// Command run in the image after packages are installed (repeatable).
    #[arg(long = "setup", value_name = "CMD")]
    setup_commands: Vec<String>,
    /// Root disk size in MiB.
    #[arg(long, default_value_t = 2048)]
    disk_size_mib: u64,
}

impl RecipeArgs {
    fn recipe(&self) -> Recipe {
        Recipe {
            suite: self.suite.clone(),
            packages: self.packages.clone(),
            setup_commands: self.setup_commands.clone(),
            disk_size_mib: self.disk_size_mib,
            ..Recipe::default()
        }
    }
}

impl ImageCommand {
    /// Run the subcommand.
    pub fn run(self, cfg: &Config) -> anyhow::Result<i32> {
        match self {
            ImageCommand::Build(a) => {
                let img = ensure_image(cfg, &a.recipe())?;
                println!("{}", img.dir.display());
                Ok(0)
            }
            ImageCommand::Path(a) => match agentvm_image::lookup(&a.recipe(), &cfg.cache_dir)? {
                Some(img) => {
                    println!("{}", img.dir.display());
                    Ok(0)
                }
                None => {
                    eprintln!("not built; run `agentvm image build`");
                    Ok(1)
                }
            },
        }
    }
}

/// The image for `recipe`, built first if it is not cached. Shows progress on stderr.
pub fn ensure_image(cfg: &Config, recipe: &Recipe) -> anyhow::Result<BuiltImage> {
    if let Some(img) = agentvm_image::lookup(recipe, &cfg.cache_dir)? {
        return Ok(img);
    }
    let tty = std::io::stderr().is_terminal();
    let bar = if tty {
        let b = ProgressBar::new_spinner();
        b.set_style(
            ProgressStyle::with_template("{spinner} [{elapsed}] {prefix} {wide_msg}")
                .expect("valid template"),
        );
        b.enable_steady_tick(Duration::from_millis(120));
        Some(b)
    } else {
        None
    };
    eprintln!(
        "building guest image (recipe {}) into {}",
        &recipe.hash()[..12],
        cfg.cache_dir.display()
    );
    let mut on_event = |ev: BuildEvent| match (&bar, ev) {
        (Some(b), BuildEvent::Step { index, total, name }) => {
            b.set_prefix(format!("[{index}/{total}] {name}"));
        }
        (Some(b), BuildEvent::Line(l)) => b.set_message(l),
        (None, BuildEvent::Step { index, total, name }) => {
            eprintln!("image: [{index}/{total}] {name}");
        }
        (None, BuildEvent::Line(_)) => {}
        (_, other) => tracing::debug!(?other, "image build event"),
    };
    let img = agentvm_image::build(recipe, &cfg.cache_dir, &mut on_event);
    if let Some(b) = bar {
        b.finish_and_clear();
    }
    let img = img?;
    eprintln!("image ready: {}", img.dir.display());
    Ok(img)
}

/// The backend's view of a built image.
pub fn boot_image(img: &BuiltImage) -> BootImage {
    BootImage {
        disk: img.disk.clone(),
        kernel: img.kernel.clone(),
        initrd: img.initrd.clone(),
        cmdline: img.cmdline.clone(),
    }
}
