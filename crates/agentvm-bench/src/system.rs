//! What the numbers were measured on: machine, kernel, libvirt/QEMU, revision, date, load;
//! and reading a process's resident memory.

use std::path::Path;
use std::process::Command;

/// First line of a command's standard output, if it ran.
fn first_line(cmd: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(cmd).args(args).output().ok()?;
    if !out.status.success() {
        return None;
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .map(|l| l.trim().to_string())
}

fn proc_field(file: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        (k.trim() == key).then(|| v.trim().to_string())
    })
}

/// `VmRSS` and `VmHWM` (peak) of process `pid`, in KiB.
pub fn rss_kib(pid: u32) -> Option<(u64, u64)> {
    let status = format!("/proc/{pid}/status");
    let kib = |key| {
        proc_field(&status, key)?
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()
    };
    Some((kib("VmRSS")?, kib("VmHWM")?))
}

/// The 1-, 5- and 15-minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|| "unknown".into())
}

/// `git describe`-like revision of the checkout in the current directory (`+dirty` when
/// tracked files changed).
pub fn git_revision() -> String {
    let Some(rev) = first_line("git", &["rev-parse", "--short=12", "HEAD"]) else {
        return "unknown".into();
    };
    let dirty = Command::new("git")
        .args(["status", "--porcelain", "--untracked-files=no"])
        .output()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    if dirty {
        format!("{rev}+dirty")
    } else {
        rev
    }
}

/// Markdown lines describing the machine and the run.
pub fn describe(accelerator: &str, libvirt: &str) -> Vec<String> {
    let cpu = proc_field("/proc/cpuinfo", "model name").unwrap_or_else(|| "unknown".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let mem = proc_field("/proc/meminfo", "MemTotal")
        .and_then(|v| v.trim_end_matches("kB").trim().parse::<u64>().ok())
        .map(|k| format!("{:.1} GiB", k as f64 / 1024.0 / 1024.0))
        .unwrap_or_else(|| "unknown".into());
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "unknown".into());
    let os = proc_field_eq("/etc/os-release", "PRETTY_NAME").unwrap_or_else(|| "unknown".into());
    let qemu = first_line("qemu-system-x86_64", &["--version"]).unwrap_or_else(|| "unknown".into());
    let kvm = if Path::new("/dev/kvm").exists() {
        "present"
    } else {
        "absent"
    };
    vec![
        format!("- machine: {cpu}, {cores} cores, {mem} RAM"),
        format!("- OS: {os}, kernel {kernel}"),
        format!("- accelerator: {accelerator} (`/dev/kvm` {kvm}); {qemu}; libvirt {libvirt}"),
        format!("- revision: {}", git_revision()),
        format!(
            "- date: {}",
            humantime::format_rfc3339_seconds(std::time::SystemTime::now())
        ),
    ]
}

fn proc_field_eq(file: &str, key: &str) -> Option<String> {
    std::fs::read_to_string(file).ok()?.lines().find_map(|l| {
        let (k, v) = l.split_once('=')?;
        (k == key).then(|| v.trim_matches('"').to_string())
    })
}
