//! Validation of AgentRun specs.

use super::*;

impl Validator {
    pub(super) fn agent_run(&mut self, path: &FieldPath, spec: &AgentRunSpec) {
        match (spec.pool_ref.is_empty(), &spec.sandbox_ref) {
            (true, None) => self.error(
                path.key("poolRef"),
                "where should it run? set `poolRef` (a VmPool: a fresh VM, reset after) or `sandboxRef` (a Sandbox: kept)",
            ),
            (false, Some(_)) => self.error(
                path.key("sandboxRef"),
                "`poolRef` and `sandboxRef` are both set; keep exactly one of them",
            ),
            (false, None) => self.dns_label(&path.key("poolRef"), &spec.pool_ref, "VmPool name"),
            (true, Some(s)) => self.dns_label(&path.key("sandboxRef"), s, "Sandbox name"),
        }
        match (&spec.script, &spec.command) {
            (None, None) => self.error(
                path.clone(),
                "nothing to run; set exactly one of `script` (source + interpreter) or `command` (program + args)",
            ),
            (Some(_), Some(_)) => self.error(
                path.key("command"),
                "`script` and `command` are both set; keep exactly one of them",
            ),
            _ => {}
        }
        if let Some(script) = &spec.script {
            let sp = path.key("script");
            let interp = &script.interpreter;
            if interp.is_empty() || interp.chars().any(|c| c.is_whitespace() || c.is_control()) {
                self.error(
                    sp.key("interpreter"),
                    format!("{} is not a program name: give one word such as `python3`, `bash` or `/usr/bin/node` (use `command` for arguments)", show(interp)),
                );
            }
            if self.non_empty(sp.key("source"), &script.source, "write the program to run") {
                self.inline_size(sp.key("source"), &script.source);
            }
        }
        if let Some(command) = &spec.command {
            let cp = path.key("command");
            self.non_empty(
                cp.key("program"),
                &command.program,
                "name the program to run, e.g. `claude`",
            );
            for (i, arg) in command.args.iter().enumerate() {
                self.no_nul(cp.key("args").index(i), arg);
            }
        }

        self.run_env(path, spec);
        self.run_files(path, spec);
        self.run_workspace(path, spec);
        if let Some(dir) = &spec.working_dir {
            self.guest_path(path.key("workingDir"), dir);
        }
        if let Some(artifacts) = &spec.artifacts {
            let ap = path.key("artifacts");
            if artifacts.paths.is_empty() {
                self.error(
                    ap.key("paths"),
                    "is empty; list guest paths to collect, or remove `artifacts`",
                );
            }
            for (i, p) in artifacts.paths.iter().enumerate() {
                self.guest_path(ap.key("paths").index(i), p);
            }
            self.range(
                ap.key("maxSizeMib"),
                artifacts.max_size_mib,
                (1, agent_run::MAX_ARTIFACTS_MAX_SIZE_MIB),
                "",
            );
        }
        self.range(
            path.key("timeoutSeconds"),
            spec.timeout_seconds,
            (1, agent_run::MAX_TIMEOUT_SECONDS),
            if spec.timeout_seconds > agent_run::MAX_TIMEOUT_SECONDS {
                " (one hour); split the work into several runs"
            } else {
                ""
            },
        );
        self.range(
            path.key("output").key("maxMib"),
            spec.output.max_mib,
            (1, agent_run::MAX_OUTPUT_MAX_MIB),
            if spec.output.max_mib > agent_run::MAX_OUTPUT_MAX_MIB {
                " per stream; write big results to a file and collect it as an artifact"
            } else {
                ""
            },
        );
    }

    /// `env` and `secretEnv`: names, values and where each secret comes from.
    fn run_env(&mut self, path: &FieldPath, spec: &AgentRunSpec) {
        let envp = path.key("env");
        for (name, value) in &spec.env {
            if !is_env_name(name) {
                self.error(envp.key(name.clone()), format!("{} is not a valid environment variable name: use letters, digits and '_', not starting with a digit", show(name)));
            }
            self.no_nul(envp.key(name.clone()), value);
        }
        let mut secret_names = BTreeSet::new();
        for (i, secret) in spec.secret_env.iter().enumerate() {
            let sp = path.key("secretEnv").index(i);
            if !is_env_name(&secret.name) {
                self.error(sp.key("name"), format!("{} is not a valid environment variable name: use letters, digits and '_', not starting with a digit", show(&secret.name)));
            } else if spec.env.contains_key(&secret.name) {
                self.error(
                    sp.key("name"),
                    format!("`{}` is also set in `env`; remove one of them", secret.name),
                );
            } else if !secret_names.insert(secret.name.as_str()) {
                self.error(
                    sp.key("name"),
                    format!("`{}` is listed twice; remove one", secret.name),
                );
            }
            match (&secret.from_env, &secret.from_file) {
                (None, None) => self.error(
                    sp.clone(),
                    "no value source; set `fromEnv` (a host environment variable) or `fromFile` (a host file)",
                ),
                (Some(_), Some(_)) => self.error(sp.key("fromFile"), "`fromEnv` and `fromFile` are both set; keep one"),
                (Some(var), None) => {
                    if !is_env_name(var) {
                        self.error(sp.key("fromEnv"), format!("{} is not a valid environment variable name", show(var)));
                    }
                }
                (None, Some(file)) => self.host_path(sp.key("fromFile"), file),
            }
        }
    }

    /// `files`: guest paths (each once) and one source each.
    fn run_files(&mut self, path: &FieldPath, spec: &AgentRunSpec) {
        let mut file_paths = BTreeSet::new();
        for (i, file) in spec.files.iter().enumerate() {
            let fp = path.key("files").index(i);
            self.guest_path(fp.key("path"), &file.path);
            if file.path.ends_with('/') {
                self.error(
                    fp.key("path"),
                    format!(
                        "{} ends with `/`; give the file's full path",
                        show(&file.path)
                    ),
                );
            }
            if !file_paths.insert(file.path.as_str()) {
                self.error(
                    fp.key("path"),
                    format!(
                        "{} is written by an earlier entry too; remove one",
                        show(&file.path)
                    ),
                );
            }
            match (&file.content, &file.from_file) {
                (None, None) => self.error(
                    fp.clone(),
                    "no content; set `content` (inline text) or `fromFile` (a host file)",
                ),
                (Some(_), Some(_)) => self.error(
                    fp.key("fromFile"),
                    "`content` and `fromFile` are both set; keep one",
                ),
                (Some(content), None) => {
                    self.inline_size(fp.key("content"), content);
                }
                (None, Some(host)) => self.host_path(fp.key("fromFile"), host),
            }
            if file.mode_bits().is_none() || !(3..=4).contains(&file.mode.len()) {
                self.error(
                    fp.key("mode"),
                    format!(
                        "{} is not an octal file mode; write it quoted, e.g. \"0644\" or \"0755\"",
                        show(&file.mode)
                    ),
                );
            }
        }
    }

    /// `workspace`: one source (a host directory or a git repository) and where it goes.
    fn run_workspace(&mut self, path: &FieldPath, spec: &AgentRunSpec) {
        if let Some(ws) = &spec.workspace {
            let wp = path.key("workspace");
            match (&ws.host_path, &ws.git_url) {
                (None, None) => self.error(
                    wp.clone(),
                    "no source; set `hostPath` (a host directory) or `gitUrl` (a repository)",
                ),
                (Some(_), Some(_)) => self.error(
                    wp.key("gitUrl"),
                    "`hostPath` and `gitUrl` are both set; keep one",
                ),
                (Some(host), None) => self.host_path(wp.key("hostPath"), host),
                (None, Some(url)) => {
                    if !git_url_ok(url) {
                        self.error(wp.key("gitUrl"), format!("{} is not a git URL; use https://, http://, ssh://, git:// or user@host:path", show(url)));
                    }
                }
            }
            if let Some(git_ref) = &ws.git_ref {
                if ws.git_url.is_none() {
                    self.error(wp.key("gitRef"), "only applies with `gitUrl`; remove it");
                } else if git_ref.is_empty()
                    || git_ref.starts_with('-')
                    || git_ref.chars().any(|c| c.is_whitespace() || c.is_control())
                {
                    self.error(
                        wp.key("gitRef"),
                        format!("{} is not a branch, tag or commit name", show(git_ref)),
                    );
                }
            }
            self.guest_path(wp.key("path"), &ws.path);
            if ws.path.trim_end_matches('/').is_empty() && ws.path.starts_with('/') {
                self.error(
                    wp.key("path"),
                    "`/` is the guest's root directory; use a subdirectory such as /workspace",
                );
            }
        }
    }
}
