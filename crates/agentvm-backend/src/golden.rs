//! Golden state of a warm VM (memory + disk) and resetting the VM to it after each use.
//!
//! A VM is booted once, optionally warmed up, and *parked*: its memory and disk are captured.
//! After a run, *reset* brings memory and disk back to exactly that state, so a file the run
//! wrote (on disk or in tmpfs) and any process it started are gone. Three ways to do it were
//! measured (`cargo bench -p agentvm-backend --bench reset`: TCG, 1 vCPU, 2 busy host cores,
//! medians of 5 resets until the agent answers and the clock is set):
//!
//! | strategy | 512 MiB guest | 256 MiB guest |
//! |---|---|---|
//! | [`ResetStrategy::SnapshotLoadvm`] (default) | 0.44 s | 0.43 s |
//! | [`ResetStrategy::SnapshotRevert`] (libvirt revert: restarts QEMU) | 3.1 s | – |
//! | baseline `virsh snapshot-revert` + ping | 2.7 s | – |
//! | [`ResetStrategy::SavedMemory`] (destroy + fresh overlay + restore) | 2.4 s | 2.4 s |
//!
//! libvirt 9's `virDomainRevertToSnapshot` on a running domain kills QEMU and starts a new
//! process with `-loadvm`, and on these hosts a QEMU process takes over a second just to exit;
//! saved-memory restore pays the same exit plus a new process. Loading the internal snapshot
//! inside the *running* QEMU (`loadvm`) avoids both, so it is the default.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use virt::domain::Domain;
use virt::sys;

use crate::error::{io_err, BackendError, Result};
use crate::guest::Guest;
use crate::libvirt::{DomainAgent, Libvirt};
use crate::vm::{create_overlay, VmFiles};

/// Name of the internal snapshot holding the golden state (also its qcow2 tag).
pub const GOLDEN_SNAPSHOT: &str = "agentvm-golden";

/// How a VM is brought back to its golden state.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum ResetStrategy {
    /// Internal qcow2 snapshot (memory + disk) taken through libvirt, loaded *in place* in the
    /// running QEMU process with `loadvm` (through libvirt's monitor passthrough). No QEMU
    /// restart. Fastest measured: the default.
    #[default]
    SnapshotLoadvm,
    /// The same internal snapshot, reverted with libvirt's `virDomainRevertToSnapshot`.
    /// libvirt 9 stops QEMU and starts a new process to do it, which costs seconds here.
    SnapshotRevert,
    /// Memory saved to a file (`virDomainSaveFlags`) with the disk frozen as a golden qcow2
    /// overlay; a reset destroys QEMU, puts a fresh overlay on the golden one and restores.
    SavedMemory,
}

impl ResetStrategy {
    /// Every strategy, default first.
    pub const ALL: [ResetStrategy; 3] = [
        ResetStrategy::SnapshotLoadvm,
        ResetStrategy::SnapshotRevert,
        ResetStrategy::SavedMemory,
    ];

    /// A short stable name (`snapshot-loadvm`, `snapshot-revert`, `saved-memory`).
    pub fn as_str(self) -> &'static str {
        match self {
            ResetStrategy::SnapshotLoadvm => "snapshot-loadvm",
            ResetStrategy::SnapshotRevert => "snapshot-revert",
            ResetStrategy::SavedMemory => "saved-memory",
        }
    }

    /// What kind of golden state this strategy resets to.
    pub fn kind(self) -> GoldenKind {
        match self {
            ResetStrategy::SnapshotLoadvm | ResetStrategy::SnapshotRevert => {
                GoldenKind::InternalSnapshot
            }
            ResetStrategy::SavedMemory => GoldenKind::SavedMemory,
        }
    }
}

impl std::fmt::Display for ResetStrategy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl std::str::FromStr for ResetStrategy {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        ResetStrategy::ALL
            .into_iter()
            .find(|r| r.as_str() == s)
            .ok_or_else(|| {
                format!(
                    "unknown reset strategy {s:?}; expected one of: {}",
                    ResetStrategy::ALL.map(|r| r.as_str()).join(", ")
                )
            })
    }
}

/// How the golden state is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum GoldenKind {
    /// An internal qcow2 snapshot named [`GOLDEN_SNAPSHOT`] in the VM's overlay.
    InternalSnapshot,
    /// `golden.save` (memory) + `golden.qcow2` (frozen disk) in the VM directory.
    SavedMemory,
}

/// A parked VM's golden state: which domain, where its files are, how it is stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GoldenState {
    /// Domain name.
    pub name: String,
    /// The VM's files; saved state and golden overlays live in the same directory.
    pub files: VmFiles,
    /// How the state is stored.
    pub kind: GoldenKind,
    /// Strategy [`Libvirt::reset_to_golden`] uses.
    pub strategy: ResetStrategy,
    /// Time it took to park (snapshot, or save + restore).
    pub park_time: Duration,
}

impl GoldenState {
    /// Saved memory image (saved-memory golden states).
    pub fn save_file(&self) -> PathBuf {
        save_file(&self.files)
    }
    /// Frozen golden disk overlay (saved-memory golden states).
    pub fn golden_disk(&self) -> PathBuf {
        golden_disk(&self.files)
    }
}

fn save_file(files: &VmFiles) -> PathBuf {
    files.dir.join("golden.save")
}
fn golden_disk(files: &VmFiles) -> PathBuf {
    files.dir.join("golden.qcow2")
}
fn overlay_template(files: &VmFiles) -> PathBuf {
    files.dir.join("overlay-template.qcow2")
}

/// Timings of one reset.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResetReport {
    /// Strategy used.
    pub strategy: ResetStrategy,
    /// From start to the guest agent answering again and the clock set: the reset's cost.
    pub total: Duration,
    /// Bringing memory and disk back (revert, loadvm, or destroy + overlay + restore).
    pub restore: Duration,
    /// Waiting for the guest agent to answer after the restore.
    pub agent: Duration,
    /// Reseeding the guest kernel's random number generator with host entropy and setting
    /// the guest clock (one guest process, see [`refresh_guest`]): both are where they were
    /// at parking time after a reset.
    pub refresh: Duration,
    /// False when setting the clock failed (the reset itself still succeeded; a failed reseed
    /// fails the reset).
    pub clock_synced: bool,
}

fn path_str(p: &Path) -> Result<&str> {
    p.to_str().ok_or_else(|| BackendError::Io {
        op: "use non-UTF-8 path",
        path: p.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })
}

/// `virDomainSaveFlags`: save the running domain's memory to `path` and stop it.
/// The `virt` crate 0.5 has no wrapper for it.
#[allow(unsafe_code)]
fn save_domain_memory(dom: &Domain, name: &str, path: &Path) -> Result<()> {
    let c_path = std::ffi::CString::new(path_str(path)?).map_err(|_| BackendError::Io {
        op: "use path with NUL byte",
        path: path.to_path_buf(),
        source: std::io::Error::from(std::io::ErrorKind::InvalidInput),
    })?;
    // SAFETY: `dom.as_ptr()` is the live virDomainPtr owned by `dom`, which outlives the call;
    // `c_path` is a NUL-terminated string alive for the whole call; `dxml` may be NULL
    // (documented by libvirt); libvirt keeps neither pointer after returning.
    let rc = unsafe { sys::virDomainSaveFlags(dom.as_ptr(), c_path.as_ptr(), std::ptr::null(), 0) };
    if rc < 0 {
        return Err(BackendError::from_virt(
            virt::error::Error::last_error(),
            "domain",
            name,
        ));
    }
    Ok(())
}

/// Wall clock as (seconds, nanoseconds) since the epoch.
fn now_unix() -> (i64, i32) {
    let d = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    (d.as_secs() as i64, d.subsec_nanos() as i32)
}

impl Libvirt {
    fn owned_domain(&self, name: &str) -> Result<Domain> {
        if self.domain_owner(name)?.is_none() {
            return Err(BackendError::NotOwned {
                kind: "domain",
                name: name.to_string(),
            });
        }
        self.raw()
            .lookup_domain_by_name(name)
            .map_err(|e| BackendError::from_virt(e, "domain", name))
    }

    /// [`Libvirt::take_golden`], then the guest's RNG reseeded and clock set through its
    /// agent (waited for at most `agent_timeout`): the VM goes on from the golden state, and
    /// its first run must not see the kernel RNG state that every later reset brings back.
    pub fn park_golden(
        &self,
        name: &str,
        files: &VmFiles,
        strategy: ResetStrategy,
        agent_timeout: Duration,
    ) -> Result<GoldenState> {
        let mut golden = self.take_golden(name, files, strategy)?;
        let start = Instant::now();
        let agent = self.agent(name)?;
        Guest::new(&agent).wait_ready(agent_timeout)?;
        refresh_guest(&agent, agent_timeout)?;
        golden.park_time += start.elapsed();
        Ok(golden)
    }

    /// Park the running, owned domain `name` (whose files are `files`) at its current state.
    /// The guest agent should be answering. Afterwards the VM is running at the golden state.
    ///
    /// - Snapshot strategies: an internal snapshot with memory ([`GOLDEN_SNAPSHOT`]).
    /// - [`ResetStrategy::SavedMemory`]: the memory is saved to `golden.save` (this stops
    ///   QEMU), `disk.qcow2` becomes the frozen `golden.qcow2`, and the VM is restored over a
    ///   fresh overlay on it.
    pub fn take_golden(
        &self,
        name: &str,
        files: &VmFiles,
        strategy: ResetStrategy,
    ) -> Result<GoldenState> {
        let dom = self.owned_domain(name)?;
        let start = Instant::now();
        // The guest gives back what it does not need before the state every reset loads.
        crate::lean::settle_before_golden(self, name, &dom);
        crate::agent_conn::forget(name);
        match strategy.kind() {
            GoldenKind::InternalSnapshot => {
                // Fixed content, no user data: nothing to escape.
                let xml = format!(
                    "<domainsnapshot><name>{GOLDEN_SNAPSHOT}</name>\
                     <description>agentvm golden state</description></domainsnapshot>"
                );
                dom.create_snapshot_xml(&xml, sys::VIR_DOMAIN_SNAPSHOT_CREATE_ATOMIC)
                    .map_err(|e| BackendError::from_virt(e, "snapshot", GOLDEN_SNAPSHOT))?;
            }
            GoldenKind::SavedMemory => {
                let save = save_file(files);
                save_domain_memory(&dom, name, &save)?;
                let golden = golden_disk(files);
                std::fs::rename(files.disk(), &golden).map_err(io_err("rename", &golden))?;
                let template = overlay_template(files);
                // No size: the template (and every fresh overlay copied from it) has the
                // golden disk's virtual size, i.e. the size the VM was created with.
                create_overlay(&golden, &template, None)?;
                fresh_overlay(&template, &files.disk())?;
                self.raw()
                    .restore_domain(path_str(&save)?)
                    .map_err(|e| BackendError::from_virt(e, "domain", name))?;
            }
        }
        Ok(GoldenState {
            name: name.to_string(),
            files: files.clone(),
            kind: strategy.kind(),
            strategy,
            park_time: start.elapsed(),
        })
    }

    /// Reset the VM to its golden state with the golden state's strategy.
    pub fn reset_to_golden(
        &self,
        golden: &GoldenState,
        agent_timeout: Duration,
    ) -> Result<ResetReport> {
        self.reset_to_golden_with(golden, golden.strategy, agent_timeout)
    }

    /// Reset with a given strategy, which must fit how the state is stored (the two snapshot
    /// strategies share one internal snapshot). Waits until the guest agent answers (at most
    /// `agent_timeout`), then sets the guest clock to the host's.
    pub fn reset_to_golden_with(
        &self,
        golden: &GoldenState,
        strategy: ResetStrategy,
        agent_timeout: Duration,
    ) -> Result<ResetReport> {
        let name = golden.name.as_str();
        if strategy.kind() != golden.kind {
            return Err(BackendError::Protocol {
                what: format!("reset of {name}"),
                message: format!(
                    "strategy {strategy} needs a {:?} golden state, this one is {:?}",
                    strategy.kind(),
                    golden.kind
                ),
            });
        }
        let dom = self.owned_domain(name)?;
        let start = Instant::now();
        // The guest's agentvm-guest goes back to the golden moment with it: sync anew.
        crate::agent_conn::forget(name);
        match strategy {
            ResetStrategy::SnapshotLoadvm => loadvm(&dom, name, GOLDEN_SNAPSHOT)?,
            ResetStrategy::SnapshotRevert => {
                let snap = Domain::lookup_snapshot_by_name(&dom, GOLDEN_SNAPSHOT, 0)
                    .map_err(|e| BackendError::from_virt(e, "snapshot", GOLDEN_SNAPSHOT))?;
                snap.revert(sys::VIR_DOMAIN_SNAPSHOT_REVERT_RUNNING)
                    .map_err(|e| BackendError::from_virt(e, "snapshot", GOLDEN_SNAPSHOT))?;
            }
            ResetStrategy::SavedMemory => {
                if dom.is_active().unwrap_or(false) {
                    if let Err(e) = dom.destroy() {
                        if dom.is_active().unwrap_or(false) {
                            return Err(BackendError::from_virt(e, "domain", name));
                        }
                    }
                }
                fresh_overlay(&overlay_template(&golden.files), &golden.files.disk())?;
                self.raw()
                    .restore_domain(path_str(&save_file(&golden.files))?)
                    .map_err(|e| BackendError::from_virt(e, "domain", name))?;
            }
        }
        let restore = start.elapsed();
        let agent = self.agent(name)?;
        let agent_wait = Guest::new(&agent).wait_ready(agent_timeout)?;
        let t = Instant::now();
        let clock_synced = refresh_guest(&agent, agent_timeout)?;
        let refresh = t.elapsed();
        Ok(ResetReport {
            strategy,
            total: start.elapsed(),
            restore,
            agent: agent_wait,
            refresh,
            clock_synced,
        })
    }

    /// Destroy and undefine a golden VM (with its snapshot metadata and managed save) and
    /// remove its directory: overlays, golden disk, saved memory, logs. Succeeds when already
    /// gone. Internal snapshots live inside the overlay, which is deleted with it.
    pub fn remove_golden(&self, name: &str, files: &VmFiles) -> Result<()> {
        crate::agent_conn::forget(name);
        let gone = |e: BackendError| if e.is_not_found() { Ok(()) } else { Err(e) };
        self.destroy_domain(name)
            .or_else(gone)
            .and_then(|_| self.undefine_domain(name).or_else(gone))?;
        // Only once the domain is gone: while it is still defined (libvirtd went away
        // mid-teardown, say), its directory is what makes it one of ours in
        // `Backend::list_vms`, so a later pass finds it and removes both.
        files.remove()
    }
}

/// Loads internal snapshot `snapshot` into the running QEMU of domain `name` with HMP
/// `loadvm`, which stops the vCPUs, loads memory, device state and every disk's internal
/// snapshot, and lets the vCPUs run again if they ran before: all inside the QEMU process.
pub(crate) fn loadvm(dom: &Domain, name: &str, snapshot: &str) -> Result<()> {
    let out = dom
        .qemu_monitor_command(
            &format!("loadvm {snapshot}"),
            sys::VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
        )
        .map_err(|e| BackendError::from_virt(e, "domain", name))?;
    let command = || format!("loadvm {snapshot} (QEMU monitor of {name})");
    if !out.trim().is_empty() {
        return Err(BackendError::Command {
            command: command(),
            message: out.trim().to_string(),
        });
    }
    if !dom.is_active().unwrap_or(false) {
        return Err(BackendError::Command {
            command: command(),
            message: "the domain is no longer running".into(),
        });
    }
    Ok(())
}

/// Bytes of host randomness written into the guest's kernel RNG after every reset and park.
pub const RESEED_BYTES: usize = 64;

/// The Perl program [`refresh_guest`] runs in the guest (Perl is in every Debian system:
/// `perl-base` is essential; it starts in a fraction of Python's time under TCG). Standard
/// input: [`RESEED_BYTES`] bytes from the host's CSPRNG; arguments: the host's time as
/// seconds and nanoseconds since the epoch.
/// 1. `RNDADDENTROPY` mixes the bytes into the input pool (and credits them);
/// 2. `RNDRESEEDCRNG` reseeds the CRNG from that pool at once, so every `getrandom` and
///    `/dev/urandom` read from here on depends on the host's bytes. Without it the kernel
///    would only pick them up at its next periodic reseed (up to a minute later);
/// 3. `clock_settime(CLOCK_REALTIME)` (x86-64 system call 227) sets the clock.
///
/// Exit codes 10-13 mean the reseed failed, 20 that only the clock failed.
pub const REFRESH_SCRIPT: &str = "read(STDIN, my $seed, 1 + 64) == 64 or exit 10; \
sysopen(my $rng, '/dev/urandom', 1) or exit 11; \
ioctl($rng, 0x40085203, pack('ii', 8 * 64, 64) . $seed) or exit 12; \
ioctl($rng, 0x5207, 0) or exit 13; \
syscall(227, 0, pack('qq', $ARGV[0], $ARGV[1])) == 0 or exit 20;";

/// After a reset (or parking), make the guest current again: reseed its kernel RNG with
/// [`RESEED_BYTES`] fresh bytes from the host and set its clock to the host's — through
/// agentvm-guest (`Reseed` and `SetClock`, no process), or where it does not answer, with
/// one qemu-guest-agent exec of [`REFRESH_SCRIPT`].
///
/// A reset brings back the memory of the golden state, the kernel's CRNG state included:
/// without a reseed every run on the VM would draw the same "random" bytes (keys, nonces,
/// TCP sequence numbers, ASLR offsets of new processes) until the kernel's next periodic
/// reseed — measured here, on CPUs with and without RDRAND. The reseed has to succeed: an
/// error fails the reset, so such a VM is never handed out. The clock is best effort: returns
/// whether it was set. (`guest-set-time` would also run `hwclock -w`, which waits for the
/// RTC's next second: 0.2–1 s here; the RTC does not matter to a running guest.) The time is
/// taken when the command is sent, so the guest ends up behind by the process start-up
/// latency (tens of ms under TCG).
///
/// The agent can drop out right after answering its first ping (libvirt re-opens its
/// channel when the restored guest's serial port reconnects): then this waits for it again
/// (at most `agent_timeout`) and retries once.
pub(crate) fn refresh_guest(agent: &DomainAgent, agent_timeout: Duration) -> Result<bool> {
    use crate::guest::AgentChannel;
    match refresh_guest_once(agent) {
        Err(e) if e.is_transient() => {
            tracing::info!(vm = %agent.vm_name(), error = %e, "guest agent dropped out after the reset; waiting for it again");
            Guest::new(agent).wait_ready(agent_timeout)?;
            refresh_guest_once(agent)
        }
        other => other,
    }
}

fn refresh_guest_once(agent: &DomainAgent) -> Result<bool> {
    use crate::guest::AgentChannel;
    use base64::Engine;
    use std::io::Read;
    let vm = agent.vm_name().to_string();
    let mut seed = [0u8; RESEED_BYTES];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut seed))
        .map_err(io_err("read", Path::new("/dev/urandom")))?;
    // agentvm-guest does both itself (two frames, no process started).
    if let Some(a) = Guest::new(agent).agent() {
        a.reseed(&seed)?;
        return Ok(match a.set_clock() {
            Ok(()) => true,
            Err(e) => {
                tracing::warn!(vm = %vm, error = %e, "setting the guest clock failed (its RNG was reseeded)");
                false
            }
        });
    }
    let (secs, nsecs) = now_unix();
    let r = agent.command(
        &serde_json::json!({"execute": "guest-exec", "arguments": {
            "path": "/usr/bin/perl",
            "arg": ["-e", REFRESH_SCRIPT, secs.to_string(), nsecs.to_string()],
            "input-data": base64::engine::general_purpose::STANDARD.encode(seed),
            "capture-output": true,
        }}),
        Duration::from_secs(10),
    )?;
    let pid = r["pid"].as_i64().ok_or_else(|| BackendError::Protocol {
        what: "guest-exec perl (reseed and clock)".into(),
        message: format!("no pid in {r}"),
    })?;
    let start = Instant::now();
    let status = loop {
        let st = agent.command(
            &serde_json::json!({"execute": "guest-exec-status", "arguments": {"pid": pid}}),
            Duration::from_secs(10),
        )?;
        if st["exited"].as_bool() == Some(true) {
            break st;
        }
        if start.elapsed() > Duration::from_secs(10) {
            return Err(BackendError::Timeout {
                what: format!("reseeding the RNG and setting the clock in {vm}"),
                after: start.elapsed(),
            });
        }
        std::thread::sleep(Duration::from_millis(5));
    };
    match status["exitcode"].as_i64() {
        Some(0) => Ok(true),
        Some(20) => {
            tracing::warn!(vm = %vm, "setting the guest clock failed (its RNG was reseeded)");
            Ok(false)
        }
        _ => Err(BackendError::GuestCommand {
            vm,
            command: "reseeding the kernel RNG (perl: RNDADDENTROPY, RNDRESEEDCRNG)".into(),
            message: format!("{status}"),
        }),
    }
}

/// Replace `disk` with a copy of the empty overlay `template` (cheaper than `qemu-img`).
fn fresh_overlay(template: &Path, disk: &Path) -> Result<()> {
    match std::fs::remove_file(disk) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("remove", disk)(e)),
    }
    std::fs::copy(template, disk).map_err(io_err("copy overlay template to", disk))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strategies_round_trip_through_their_names_and_default_is_loadvm() {
        for s in ResetStrategy::ALL {
            assert_eq!(s.as_str().parse::<ResetStrategy>().unwrap(), s);
        }
        assert_eq!(ResetStrategy::default(), ResetStrategy::SnapshotLoadvm);
        assert_eq!(ResetStrategy::ALL[0], ResetStrategy::default());
        let err = "loadvm".parse::<ResetStrategy>().unwrap_err();
        assert!(err.contains("snapshot-loadvm"), "{err}");
    }

    #[test]
    fn snapshot_strategies_share_a_kind() {
        assert_eq!(
            ResetStrategy::SnapshotLoadvm.kind(),
            ResetStrategy::SnapshotRevert.kind()
        );
        assert_ne!(
            ResetStrategy::SnapshotLoadvm.kind(),
            ResetStrategy::SavedMemory.kind()
        );
    }
}
