//! Builds (or reuses) the default guest image and prints where it is.
//!
//! `cargo run -p agentvm-image --example build-image [CACHE_DIR]` (as root);
//! the cache dir defaults to `$AGENTVM_CACHE_DIR` or `/var/cache/agentvm`.

use agentvm_image::{build, default_cache_dir, BuildEvent, Recipe};

fn main() {
    let cache = std::env::args_os()
        .nth(1)
        .map(Into::into)
        .unwrap_or_else(default_cache_dir);
    let result = build(&Recipe::default(), &cache, &mut |event| match event {
        BuildEvent::Step { index, total, name } => eprintln!("[{index}/{total}] {name}"),
        BuildEvent::Line(line) => eprintln!("    {line}"),
        BuildEvent::Done { elapsed, .. } => eprintln!("built in {:.1} s", elapsed.as_secs_f64()),
        BuildEvent::Reused => eprintln!("already built"),
    });
    match result {
        Ok(image) => println!("{}", serde_json::to_string_pretty(&image).unwrap()),
        Err(e) => {
            eprintln!("error: {e}");
            std::process::exit(1);
        }
    }
}
