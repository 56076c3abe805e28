//! Host configuration: defaults, overridden by a YAML config file, overridden by `AGENTVM_*`
//! environment variables.

use std::path::{Path, PathBuf};
use std::time::Duration;

use agentvm_backend::AcceleratorChoice;
use serde::Deserialize;

/// Environment variable naming the config file.
pub const CONFIG_ENV: &str = "AGENTVM_CONFIG";

/// Default address of the metrics endpoint.
pub const DEFAULT_METRICS_ADDRESS: &str = "127.0.0.1:9090";

/// agentvm's host configuration.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// libvirt URI (`AGENTVM_LIBVIRT_URI`, default `qemu:///system`).
    pub libvirt_uri: String,
    /// Per-VM files, store (`AGENTVM_STATE_DIR`, default `/var/lib/agentvm`).
    pub state_dir: PathBuf,
    /// Built images (`AGENTVM_CACHE_DIR`, default `/var/cache/agentvm`).
    pub cache_dir: PathBuf,
    /// Accelerator (`AGENTVM_ACCEL`: auto, kvm, tcg; default auto).
    pub accelerator: AcceleratorChoice,
    /// Seconds to wait for a booting guest's agent (`AGENTVM_BOOT_TIMEOUT_SECONDS`, default 120).
    pub boot_timeout_seconds: u64,
    /// TCP address of the metrics endpoint (`/metrics`, `/healthz`, `/readyz`)
    /// (`AGENTVM_METRICS_ADDR`, default `127.0.0.1:9090`; `off` or empty disables it; port 0
    /// picks a free port, logged at start).
    pub metrics_address: String,
    /// Group that may use the API socket besides root (`socketGroup`,
    /// `AGENTVM_SOCKET_GROUP`; a group name from `/etc/group` or a numeric GID). The socket
    /// is always mode 0660 and owned by the controller's user; by default its group is the
    /// controller's own group (root's for a root controller), so only root can connect.
    pub socket_group: Option<String>,
    /// Seconds between two samples of the VMs' statistics (`AGENTVM_VM_STATS_INTERVAL_SECONDS`,
    /// default 5).
    pub vm_stats_interval_seconds: u64,
    /// The audit log (`AGENTVM_AUDIT_LOG`, default `<stateDir>/audit.log`).
    pub audit_log: Option<PathBuf>,
    /// Size at which the audit log is rotated (`AGENTVM_AUDIT_LOG_MAX_BYTES`, default 64 MiB).
    pub audit_log_max_bytes: u64,
    /// The controller's environment variables that runs submitted by users other than root
    /// may name in `secretEnv[].fromEnv` (`secretEnvAllowList`,
    /// `AGENTVM_SECRET_ENV_ALLOW_LIST` comma-separated; default none). Root may name any.
    pub secret_env_allow_list: Vec<String>,
    /// Seconds a `workspace.gitUrl` clone (and checkout) may take before it is killed and
    /// the run fails (`gitCloneTimeoutSeconds`, `AGENTVM_GIT_CLONE_TIMEOUT_SECONDS`,
    /// default 120).
    pub git_clone_timeout_seconds: u64,
    /// The network namespace libvirt's networks live in (libvirtd runs there), by its name
    /// under `/run/netns` (`egressNetns`, `AGENTVM_EGRESS_NETNS`; default: the controller's
    /// own). The egress proxy listens and steers guest traffic there.
    pub egress_netns: Option<String>,
    /// The DNS server the egress proxy asks (`egressResolver`, `AGENTVM_EGRESS_RESOLVER`,
    /// `ADDRESS:PORT`; default: the guest network's own resolver, port 53 on its gateway).
    pub egress_resolver: Option<std::net::SocketAddr>,
    /// QEMU's TCG translation cache per VM, MiB (`tcgTranslationCacheMib`,
    /// `AGENTVM_TCG_TRANSLATION_CACHE_MIB`, default 64; `0` keeps QEMU's 1 GiB). Only under
    /// TCG; see [`agentvm_backend::vm::DEFAULT_TCG_TB_CACHE_MIB`].
    pub tcg_translation_cache_mib: u64,
}

/// The config file's shape; every field optional.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ConfigFile {
    libvirt_uri: Option<String>,
    state_dir: Option<PathBuf>,
    cache_dir: Option<PathBuf>,
    accelerator: Option<String>,
    boot_timeout_seconds: Option<u64>,
    metrics_address: Option<String>,
    socket_group: Option<String>,
    vm_stats_interval_seconds: Option<u64>,
    audit_log: Option<PathBuf>,
    audit_log_max_bytes: Option<u64>,
    secret_env_allow_list: Option<Vec<String>>,
    git_clone_timeout_seconds: Option<u64>,
    egress_netns: Option<String>,
    egress_resolver: Option<String>,
    tcg_translation_cache_mib: Option<u64>,
}

/// A configuration problem.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("reading config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The config file is not valid.
    #[error("config file {path}: {message}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A value (from file or environment) is not valid.
    #[error("{source_name}: {message}")]
    Value {
        /// Where the value came from (`AGENTVM_ACCEL`, a file path).
        source_name: String,
        /// What is wrong.
        message: String,
    },
}

impl Default for Config {
    fn default() -> Self {
        Config {
            libvirt_uri: "qemu:///system".into(),
            state_dir: "/var/lib/agentvm".into(),
            cache_dir: "/var/cache/agentvm".into(),
            accelerator: AcceleratorChoice::Auto,
            boot_timeout_seconds: 120,
            metrics_address: DEFAULT_METRICS_ADDRESS.into(),
            socket_group: None,
            vm_stats_interval_seconds: 5,
            audit_log: None,
            audit_log_max_bytes: crate::audit::DEFAULT_MAX_BYTES,
            secret_env_allow_list: Vec::new(),
            git_clone_timeout_seconds: agentvm_run::host_access::DEFAULT_GIT_CLONE_TIMEOUT_SECONDS,
            egress_netns: None,
            egress_resolver: None,
            tcg_translation_cache_mib: agentvm_backend::vm::DEFAULT_TCG_TB_CACHE_MIB,
        }
    }
}

/// The default config file: `$AGENTVM_CONFIG`, else `$XDG_CONFIG_HOME/agentvm/config.yaml`,
/// else `~/.config/agentvm/config.yaml`.
pub fn default_config_path() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os(CONFIG_ENV) {
        return Some(PathBuf::from(p));
    }
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("agentvm").join("config.yaml"))
}

impl Config {
    /// How long a `workspace.gitUrl` clone may take: `git_clone_timeout_seconds`, at least
    /// one second.
    pub fn git_clone_timeout(&self) -> Duration {
        Duration::from_secs(self.git_clone_timeout_seconds.max(1))
    }

    /// Defaults, then the file at `path` if it exists, then the environment.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let mut cfg = Config::default();
        if let Some(path) = path {
            match std::fs::read_to_string(path) {
                Ok(text) => cfg.apply_file(path, &text)?,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(source) => {
                    return Err(ConfigError::Read {
                        path: path.to_path_buf(),
                        source,
                    })
                }
            }
        }
        cfg.apply_env(|k| std::env::var(k).ok())?;
        Ok(cfg)
    }

    fn apply_file(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let f: ConfigFile = if text.trim().is_empty() {
            ConfigFile::default()
        } else {
            serde_yaml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?
        };
        if let Some(v) = f.libvirt_uri {
            self.libvirt_uri = v;
        }
        if let Some(v) = f.state_dir {
            self.state_dir = v;
        }
        if let Some(v) = f.cache_dir {
            self.cache_dir = v;
        }
        if let Some(v) = f.accelerator {
            self.accelerator =
                v.parse()
                    .map_err(|e: agentvm_backend::accel::UnknownAccelerator| {
                        ConfigError::Value {
                            source_name: format!("{}: accelerator", path.display()),
                            message: e.to_string(),
                        }
                    })?;
        }
        if let Some(v) = f.boot_timeout_seconds {
            self.boot_timeout_seconds = v;
        }
        if let Some(v) = f.metrics_address {
            self.metrics_address = v;
        }
        if let Some(v) = f.socket_group {
            self.socket_group = Some(v).filter(|g| !g.is_empty());
        }
        if let Some(v) = f.vm_stats_interval_seconds {
            self.vm_stats_interval_seconds = v;
        }
        if let Some(v) = f.audit_log {
            self.audit_log = Some(v);
        }
        if let Some(v) = f.audit_log_max_bytes {
            self.audit_log_max_bytes = v;
        }
        if let Some(v) = f.secret_env_allow_list {
            self.secret_env_allow_list =
                env_names(v, &format!("{}: secretEnvAllowList", path.display()))?;
        }
        if let Some(v) = f.git_clone_timeout_seconds {
            self.git_clone_timeout_seconds =
                clone_timeout(v, &format!("{}: gitCloneTimeoutSeconds", path.display()))?;
        }
        if let Some(v) = f.egress_netns {
            self.egress_netns = netns_name(v, &format!("{}: egressNetns", path.display()))?;
        }
        if let Some(v) = f.egress_resolver {
            self.egress_resolver = Some(socket_address(
                &v,
                &format!("{}: egressResolver", path.display()),
            )?);
        }
        if let Some(v) = f.tcg_translation_cache_mib {
            self.tcg_translation_cache_mib =
                tb_cache(v, &format!("{}: tcgTranslationCacheMib", path.display()))?;
        }
        Ok(())
    }

    fn apply_env(&mut self, get: impl Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        if let Some(v) = get("AGENTVM_LIBVIRT_URI") {
            self.libvirt_uri = v;
        }
        if let Some(v) = get("AGENTVM_STATE_DIR") {
            self.state_dir = v.into();
        }
        if let Some(v) = get("AGENTVM_CACHE_DIR") {
            self.cache_dir = v.into();
        }
        if let Some(v) = get("AGENTVM_ACCEL") {
            self.accelerator =
                v.parse()
                    .map_err(|e: agentvm_backend::accel::UnknownAccelerator| {
                        ConfigError::Value {
                            source_name: "AGENTVM_ACCEL".into(),
                            message: e.to_string(),
                        }
                    })?;
        }
        if let Some(v) = get("AGENTVM_BOOT_TIMEOUT_SECONDS") {
            self.boot_timeout_seconds = v.parse().map_err(|_| ConfigError::Value {
                source_name: "AGENTVM_BOOT_TIMEOUT_SECONDS".into(),
                message: format!("{v:?} is not a whole number of seconds"),
            })?;
        }
        if let Some(v) = get("AGENTVM_METRICS_ADDR") {
            self.metrics_address = v;
        }
        if let Some(v) = get("AGENTVM_SOCKET_GROUP") {
            self.socket_group = Some(v).filter(|g| !g.is_empty());
        }
        if let Some(v) = get("AGENTVM_VM_STATS_INTERVAL_SECONDS") {
            self.vm_stats_interval_seconds = v.parse().map_err(|_| ConfigError::Value {
                source_name: "AGENTVM_VM_STATS_INTERVAL_SECONDS".into(),
                message: format!("{v:?} is not a whole number of seconds"),
            })?;
        }
        if let Some(v) = get("AGENTVM_AUDIT_LOG") {
            self.audit_log = Some(v.into());
        }
        if let Some(v) = get("AGENTVM_AUDIT_LOG_MAX_BYTES") {
            self.audit_log_max_bytes = v.parse().map_err(|_| ConfigError::Value {
                source_name: "AGENTVM_AUDIT_LOG_MAX_BYTES".into(),
                message: format!("{v:?} is not a whole number of bytes"),
            })?;
        }
        if let Some(v) = get("AGENTVM_SECRET_ENV_ALLOW_LIST") {
            let names = v
                .split(',')
                .map(str::trim)
                .filter(|n| !n.is_empty())
                .map(String::from)
                .collect();
            self.secret_env_allow_list = env_names(names, "AGENTVM_SECRET_ENV_ALLOW_LIST")?;
        }
        if let Some(v) = get("AGENTVM_GIT_CLONE_TIMEOUT_SECONDS") {
            let secs = v.parse().map_err(|_| ConfigError::Value {
                source_name: "AGENTVM_GIT_CLONE_TIMEOUT_SECONDS".into(),
                message: format!("{v:?} is not a whole number of seconds"),
            })?;
            self.git_clone_timeout_seconds =
                clone_timeout(secs, "AGENTVM_GIT_CLONE_TIMEOUT_SECONDS")?;
        }
        if let Some(v) = get("AGENTVM_EGRESS_NETNS") {
            self.egress_netns = netns_name(v, "AGENTVM_EGRESS_NETNS")?;
        }
        if let Some(v) = get("AGENTVM_EGRESS_RESOLVER") {
            self.egress_resolver = Some(socket_address(&v, "AGENTVM_EGRESS_RESOLVER")?);
        }
        if let Some(v) = get("AGENTVM_TCG_TRANSLATION_CACHE_MIB") {
            let mib = v.parse().map_err(|_| ConfigError::Value {
                source_name: "AGENTVM_TCG_TRANSLATION_CACHE_MIB".into(),
                message: format!("{v:?} is not a whole number of MiB"),
            })?;
            self.tcg_translation_cache_mib = tb_cache(mib, "AGENTVM_TCG_TRANSLATION_CACHE_MIB")?;
        }
        Ok(())
    }

    /// The translation cache for [`agentvm_backend::LibvirtBackend::with_tcg_translation_cache`]:
    /// `None` for QEMU's default.
    pub fn tcg_tb_cache(&self) -> Option<u64> {
        (self.tcg_translation_cache_mib > 0).then_some(self.tcg_translation_cache_mib)
    }

    /// The GID of [`Config::socket_group`], if set: a number as it is, a name looked up in
    /// `/etc/group`.
    pub fn socket_gid(&self) -> Result<Option<u32>, ConfigError> {
        let Some(group) = &self.socket_group else {
            return Ok(None);
        };
        if let Ok(gid) = group.parse::<u32>() {
            return Ok(Some(gid));
        }
        let groups = std::fs::read_to_string("/etc/group").unwrap_or_default();
        lookup_group(&groups, group)
            .map(Some)
            .ok_or_else(|| ConfigError::Value {
                source_name: "socketGroup".into(),
                message: format!(
                    "group {group:?} is not in /etc/group: create it (`groupadd {group}`) or give a numeric GID"
                ),
            })
    }

    /// The audit log's path: `auditLog`, else `<stateDir>/audit.log`.
    pub fn audit_log_path(&self) -> PathBuf {
        self.audit_log
            .clone()
            .unwrap_or_else(|| self.state_dir.join(crate::audit::AUDIT_FILE))
    }
}

/// `names`, each checked to be an environment variable name.
/// A network namespace name (a file name under `/run/netns`); empty means none.
fn netns_name(name: String, source: &str) -> Result<Option<String>, ConfigError> {
    if name.is_empty() {
        return Ok(None);
    }
    if name.len() > 64
        || name == "."
        || name == ".."
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
    {
        return Err(ConfigError::Value {
            source_name: source.into(),
            message: format!(
                "{name:?} is not a network namespace name (letters, digits, `-`, `_`, `.`; as listed by `ip netns list`)"
            ),
        });
    }
    Ok(Some(name))
}

fn socket_address(text: &str, source: &str) -> Result<std::net::SocketAddr, ConfigError> {
    text.parse().map_err(|_| ConfigError::Value {
        source_name: source.into(),
        message: format!("{text:?} is not ADDRESS:PORT, e.g. `192.168.1.1:53`"),
    })
}

fn env_names(names: Vec<String>, source: &str) -> Result<Vec<String>, ConfigError> {
    for n in &names {
        let valid = !n.is_empty()
            && !n.as_bytes()[0].is_ascii_digit()
            && n.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
        if !valid {
            return Err(ConfigError::Value {
                source_name: source.to_string(),
                message: format!(
                    "{n:?} is not an environment variable name: use letters, digits and '_', not starting with a digit"
                ),
            });
        }
    }
    Ok(names)
}

/// A clone timeout of at least one second.
/// Below this a TCG guest spends its time translating its code again (16 MiB doubled the
/// boot); above QEMU's own default there is nothing to gain.
const TB_CACHE_RANGE: std::ops::RangeInclusive<u64> = 32..=1024;

fn tb_cache(mib: u64, source: &str) -> Result<u64, ConfigError> {
    if mib != 0 && !TB_CACHE_RANGE.contains(&mib) {
        return Err(ConfigError::Value {
            source_name: source.to_string(),
            message: format!(
                "{mib} MiB: must be 0 (QEMU's default) or {} to {} MiB",
                TB_CACHE_RANGE.start(),
                TB_CACHE_RANGE.end()
            ),
        });
    }
    Ok(mib)
}

fn clone_timeout(secs: u64, source: &str) -> Result<u64, ConfigError> {
    if secs == 0 {
        return Err(ConfigError::Value {
            source_name: source.to_string(),
            message: "must be at least 1 second".into(),
        });
    }
    Ok(secs)
}

/// The GID of `name` in the `/etc/group` text `groups`.
fn lookup_group(groups: &str, name: &str) -> Option<u32> {
    groups.lines().find_map(|line| {
        let mut fields = line.split(':');
        (fields.next()? == name)
            .then(|| fields.nth(1)?.trim().parse().ok())
            .flatten()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn git_clone_timeout_is_at_least_a_second() {
        let mut c = Config::default();
        assert_eq!(c.git_clone_timeout(), Duration::from_secs(120));
        c.git_clone_timeout_seconds = 0;
        assert_eq!(c.git_clone_timeout(), Duration::from_secs(1));
    }

    #[test]
    fn socket_group_by_name_or_number() {
        let groups = "root:x:0:\nagentvm:x:998:alice,bob\nbroken:x:\n";
        assert_eq!(lookup_group(groups, "agentvm"), Some(998));
        assert_eq!(lookup_group(groups, "root"), Some(0));
        assert_eq!(lookup_group(groups, "broken"), None);
        assert_eq!(lookup_group(groups, "agent"), None);
        let mut c = Config::default();
        assert_eq!(c.socket_gid().unwrap(), None);
        c.apply_file(Path::new("c.yaml"), "socketGroup: \"4242\"\n")
            .unwrap();
        assert_eq!(c.socket_gid().unwrap(), Some(4242));
        c.apply_env(|k| (k == "AGENTVM_SOCKET_GROUP").then(|| "no-such-group-here".into()))
            .unwrap();
        let e = c.socket_gid().unwrap_err().to_string();
        assert!(
            e.starts_with("socketGroup: group \"no-such-group-here\" is not in /etc/group"),
            "{e}"
        );
    }

    #[test]
    fn file_then_env_override_defaults() {
        let mut c = Config::default();
        c.apply_file(
            Path::new("c.yaml"),
            "accelerator: kvm\nstateDir: /srv/agentvm\n",
        )
        .unwrap();
        assert_eq!(c.accelerator, AcceleratorChoice::Kvm);
        c.apply_env(|k| (k == "AGENTVM_ACCEL").then(|| "tcg".to_string()))
            .unwrap();
        assert_eq!(c.accelerator, AcceleratorChoice::Tcg);
        assert_eq!(c.state_dir, PathBuf::from("/srv/agentvm"));
    }

    #[test]
    fn observability_settings() {
        let mut c = Config::default();
        assert_eq!(c.metrics_address, "127.0.0.1:9090");
        assert_eq!(c.vm_stats_interval_seconds, 5);
        assert_eq!(c.audit_log_path(), Path::new("/var/lib/agentvm/audit.log"));
        c.apply_file(
            Path::new("c.yaml"),
            "metricsAddress: off\nauditLog: /var/log/agentvm/audit.log\nauditLogMaxBytes: 1024\nvmStatsIntervalSeconds: 10\n",
        )
        .unwrap();
        assert_eq!(c.metrics_address, "off");
        assert_eq!(c.audit_log_path(), Path::new("/var/log/agentvm/audit.log"));
        assert_eq!(
            (c.audit_log_max_bytes, c.vm_stats_interval_seconds),
            (1024, 10)
        );
        c.apply_env(|k| (k == "AGENTVM_METRICS_ADDR").then(|| "0.0.0.0:9100".to_string()))
            .unwrap();
        assert_eq!(c.metrics_address, "0.0.0.0:9100");
    }

    #[test]
    fn secret_env_allow_list_and_clone_timeout() {
        let mut c = Config::default();
        assert!(c.secret_env_allow_list.is_empty());
        assert_eq!(c.git_clone_timeout_seconds, 120);
        c.apply_file(
            Path::new("c.yaml"),
            "secretEnvAllowList: [ANTHROPIC_API_KEY, GH_TOKEN]\ngitCloneTimeoutSeconds: 30\n",
        )
        .unwrap();
        assert_eq!(c.secret_env_allow_list, ["ANTHROPIC_API_KEY", "GH_TOKEN"]);
        assert_eq!(c.git_clone_timeout_seconds, 30);
        c.apply_env(|k| match k {
            "AGENTVM_SECRET_ENV_ALLOW_LIST" => Some(" A_1, B ,".into()),
            "AGENTVM_GIT_CLONE_TIMEOUT_SECONDS" => Some("5".into()),
            _ => None,
        })
        .unwrap();
        assert_eq!(c.secret_env_allow_list, ["A_1", "B"]);
        assert_eq!(c.git_clone_timeout_seconds, 5);
        // The translation cache: default, environment, 0 for QEMU's, out of range refused.
        assert_eq!(Config::default().tcg_tb_cache(), Some(64));
        for (v, want) in [("128", Some(128)), ("0", None)] {
            let mut c = Config::default();
            c.apply_env(|k| (k == "AGENTVM_TCG_TRANSLATION_CACHE_MIB").then(|| v.into()))
                .unwrap();
            assert_eq!(c.tcg_tb_cache(), want, "{v}");
        }
        for bad in ["8", "4096", "lots"] {
            let err = Config::default()
                .apply_env(|k| (k == "AGENTVM_TCG_TRANSLATION_CACHE_MIB").then(|| bad.into()))
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("AGENTVM_TCG_TRANSLATION_CACHE_MIB"),
                "{bad}: {err}"
            );
        }
        let e = c
            .apply_file(Path::new("c.yaml"), "secretEnvAllowList: [\"A-B\"]\n")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "c.yaml: secretEnvAllowList: \"A-B\" is not an environment variable name: use letters, digits and '_', not starting with a digit"
        );
        let e = c
            .apply_env(|k| (k == "AGENTVM_GIT_CLONE_TIMEOUT_SECONDS").then(|| "0".into()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "AGENTVM_GIT_CLONE_TIMEOUT_SECONDS: must be at least 1 second"
        );
    }

    #[test]
    fn bad_values_name_their_source() {
        let mut c = Config::default();
        let e = c
            .apply_file(Path::new("c.yaml"), "acclerator: kvm\n")
            .unwrap_err();
        assert!(e.to_string().contains("unknown field `acclerator`"), "{e}");
        let e = c
            .apply_env(|k| (k == "AGENTVM_ACCEL").then(|| "hvf".to_string()))
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "AGENTVM_ACCEL: unknown accelerator \"hvf\": use auto, kvm or tcg"
        );
    }
}
