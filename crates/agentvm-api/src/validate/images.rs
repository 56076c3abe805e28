//! Validation of Image specs.

use super::*;

impl Validator {
    pub(super) fn image(&mut self, path: &FieldPath, spec: &ImageSpec) {
        if !image::KNOWN_DEBIAN_SUITES.contains(&spec.suite.as_str()) {
            let hint = closest(&spec.suite, image::KNOWN_DEBIAN_SUITES.iter().copied())
                .map(|s| format!(" (did you mean `{s}`?)"))
                .unwrap_or_default();
            self.error(
                path.key("suite"),
                format!(
                    "{} is not a known Debian suite{hint}; use one of {}",
                    show(&spec.suite),
                    image::KNOWN_DEBIAN_SUITES.join(", ")
                ),
            );
        }
        for (i, package) in spec.packages.iter().enumerate() {
            if !is_debian_package(package) {
                self.error(
                    path.key("packages").index(i),
                    format!("{} is not a Debian package name: use lowercase letters, digits, '+', '-' and '.', optionally `=version` (e.g. `python3` or `git=1:2.39.5-0+deb12u1`)", show(package)),
                );
            }
        }
        for (i, command) in spec.setup_commands.iter().enumerate() {
            self.non_empty(
                path.key("setupCommands").index(i),
                command,
                "remove it or write a shell command",
            );
        }
        self.range(
            path.key("diskSizeMib"),
            spec.disk_size_mib,
            (image::MIN_DISK_SIZE_MIB, image::MAX_DISK_SIZE_MIB),
            "",
        );
        if let Some(mirror) = &spec.mirror {
            let ok = (mirror.starts_with("http://") || mirror.starts_with("https://"))
                && !mirror.chars().any(|c| c.is_whitespace() || c.is_control());
            if !ok {
                self.error(
                    path.key("mirror"),
                    format!(
                        "{} is not an http(s) URL; write e.g. `http://deb.debian.org/debian`",
                        show(mirror)
                    ),
                );
            }
        }
    }
}
