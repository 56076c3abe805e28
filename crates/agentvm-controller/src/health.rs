//! `Readiness`: what `/readyz` reports: the store is open, the dispatcher runs (or the node
//! stands by in a cluster, serving the API while another node reconciles), and (when the
//! controller samples VM statistics) the last sample reached libvirt.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

/// Readiness flags, set by the controller's components. Cheap to clone (shared).
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    inner: Arc<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    store_open: AtomicBool,
    dispatcher_running: AtomicBool,
    standby: AtomicBool,
    libvirt_required: AtomicBool,
    /// Result of the last statistics sample; `None` before the first.
    libvirt: Mutex<Option<Result<(), String>>>,
}

impl Readiness {
    /// The store was opened.
    pub fn set_store_open(&self, open: bool) {
        self.inner.store_open.store(open, Ordering::SeqCst);
    }

    /// The dispatcher started (`true`) or stopped (`false`).
    pub fn set_dispatcher_running(&self, running: bool) {
        self.inner
            .dispatcher_running
            .store(running, Ordering::SeqCst);
    }

    /// A cluster node waiting to be elected (`true`): it serves the API, and its dispatcher
    /// is not expected to run.
    pub fn set_standby(&self, standby: bool) {
        self.inner.standby.store(standby, Ordering::SeqCst);
    }

    /// Readiness also needs a successful libvirt statistics sample.
    pub fn require_libvirt(&self) {
        self.inner.libvirt_required.store(true, Ordering::SeqCst);
    }

    /// Outcome of the latest libvirt statistics sample.
    pub fn set_libvirt(&self, result: Result<(), String>) {
        *self.inner.libvirt.lock().unwrap_or_else(|e| e.into_inner()) = Some(result);
    }

    /// `Ok` when ready, else why not.
    pub fn check(&self) -> Result<(), String> {
        let i = &self.inner;
        if !i.store_open.load(Ordering::SeqCst) {
            return Err("the store is not open".into());
        }
        if !i.dispatcher_running.load(Ordering::SeqCst) && !i.standby.load(Ordering::SeqCst) {
            return Err("the dispatcher is not running".into());
        }
        if i.libvirt_required.load(Ordering::SeqCst) {
            match &*i.libvirt.lock().unwrap_or_else(|e| e.into_inner()) {
                None => return Err("libvirt not sampled yet".into()),
                Some(Err(e)) => return Err(format!("libvirt unreachable: {e}")),
                Some(Ok(())) => {}
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_part_is() {
        let h = Readiness::default();
        assert_eq!(h.check().unwrap_err(), "the store is not open");
        h.set_store_open(true);
        assert_eq!(h.check().unwrap_err(), "the dispatcher is not running");
        h.set_dispatcher_running(true);
        assert!(h.check().is_ok());
        h.require_libvirt();
        assert_eq!(h.check().unwrap_err(), "libvirt not sampled yet");
        h.set_libvirt(Ok(()));
        assert!(h.check().is_ok());
        h.set_dispatcher_running(false);
        assert!(h.check().is_err());
        h.set_standby(true);
        assert!(h.check().is_ok(), "a standby cluster node serves the API");
    }
}
