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

/// Where a QEMU process's memory is, KiB: resident (RSS) and proportional (PSS: a page shared
/// by n processes counts 1/n), and the PSS of the guest's RAM, of the TCG translation cache
/// and of everything else (heap, libraries, device buffers).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QemuMemory {
    pub rss_kib: u64,
    pub pss_kib: u64,
    pub guest_ram_pss_kib: u64,
    pub tcg_pss_kib: u64,
    /// Of the guest RAM's resident memory, how much is in transparent huge pages.
    pub guest_ram_huge_kib: u64,
}

impl QemuMemory {
    /// PSS outside guest RAM and translation cache.
    pub fn other_pss_kib(&self) -> u64 {
        self.pss_kib
            .saturating_sub(self.guest_ram_pss_kib + self.tcg_pss_kib)
    }

    /// Adds another process's numbers (a sum over VMs).
    pub fn add(&mut self, o: &QemuMemory) {
        self.rss_kib += o.rss_kib;
        self.pss_kib += o.pss_kib;
        self.guest_ram_pss_kib += o.guest_ram_pss_kib;
        self.tcg_pss_kib += o.tcg_pss_kib;
        self.guest_ram_huge_kib += o.guest_ram_huge_kib;
    }
}

/// [`QemuMemory`] of process `pid` (`/proc/PID/smaps`).
pub fn qemu_memory(pid: u32) -> Option<QemuMemory> {
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).ok()?;
    Some(parse_smaps(&smaps))
}

/// [`QemuMemory`] from the text of an smaps file. The guest's RAM is the largest mapping;
/// the translation cache is an anonymous writable and executable one (QEMU's TCG code
/// buffer; no other anonymous mapping of QEMU is executable).
pub fn parse_smaps(smaps: &str) -> QemuMemory {
    struct Mapping {
        size: u64,
        anon_rwx: bool,
        rss: u64,
        pss: u64,
        huge: u64,
    }
    let mut maps: Vec<Mapping> = Vec::new();
    for line in smaps.lines() {
        let mut words = line.split_whitespace();
        let (Some(first), Some(second)) = (words.next(), words.next()) else {
            continue;
        };
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                let path = words.nth(3);
                maps.push(Mapping {
                    size: hi.saturating_sub(lo) / 1024,
                    anon_rwx: second.starts_with("rwx") && path.is_none(),
                    rss: 0,
                    pss: 0,
                    huge: 0,
                });
                continue;
            }
        }
        let Some(m) = maps.last_mut() else { continue };
        let kib = || second.parse::<u64>().unwrap_or(0);
        match first {
            "Rss:" => m.rss = kib(),
            "Pss:" => m.pss = kib(),
            "AnonHugePages:" => m.huge = kib(),
            _ => {}
        }
    }
    let mut mem = QemuMemory::default();
    for m in &maps {
        mem.rss_kib += m.rss;
        mem.pss_kib += m.pss;
        if m.anon_rwx {
            mem.tcg_pss_kib += m.pss;
        }
    }
    if let Some(ram) = maps.iter().filter(|m| !m.anon_rwx).max_by_key(|m| m.size) {
        mem.guest_ram_pss_kib = ram.pss;
        mem.guest_ram_huge_kib = ram.huge;
    }
    mem
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

#[cfg(test)]
mod tests {
    use super::*;

    const SMAPS: &str = "\
55d0c0000000-55d0c0100000 r-xp 00000000 fe:01 1234        /usr/bin/qemu-system-x86_64
Size:               1024 kB
Rss:                 800 kB
Pss:                 400 kB
AnonHugePages:         0 kB
7f0000000000-7f0020000000 rw-p 00000000 00:00 0 
Size:             524288 kB
Rss:              200000 kB
Pss:              200000 kB
AnonHugePages:    180224 kB
7f1000000000-7f1004000000 rwxp 00000000 00:00 0 
Size:              65536 kB
Rss:               30000 kB
Pss:               30000 kB
AnonHugePages:         0 kB
7f2000000000-7f2001000000 rw-p 00000000 00:00 0          [heap]
Size:              16384 kB
Rss:                9000 kB
Pss:                9000 kB
VmFlags: rd wr mr mw me ac sd
";

    #[test]
    fn smaps_splits_into_guest_ram_translation_cache_and_the_rest() {
        let m = parse_smaps(SMAPS);
        assert_eq!(m.rss_kib, 800 + 200_000 + 30_000 + 9000);
        assert_eq!(m.pss_kib, 400 + 200_000 + 30_000 + 9000);
        assert_eq!(m.guest_ram_pss_kib, 200_000);
        assert_eq!(m.guest_ram_huge_kib, 180_224);
        assert_eq!(m.tcg_pss_kib, 30_000);
        assert_eq!(m.other_pss_kib(), 9400);
        let mut sum = m;
        sum.add(&m);
        assert_eq!(sum.pss_kib, 2 * m.pss_kib);
        assert_eq!(parse_smaps(""), QemuMemory::default());
    }
}
