//! A cached connection that is checked before each use and reopened when it has died (after
//! libvirtd restarts, every call on the old connection fails, and libvirt's client only
//! notices the closed socket when it next talks to the daemon).

use std::sync::{Arc, Mutex};

/// One shared connection of type `T`, opened lazily, reopened when found dead.
#[derive(Debug)]
pub struct Reconnecting<T> {
    slot: Mutex<Option<Arc<T>>>,
}

impl<T> Default for Reconnecting<T> {
    fn default() -> Self {
        Reconnecting {
            slot: Mutex::new(None),
        }
    }
}

impl<T> Reconnecting<T> {
    /// No connection yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// The cached connection if `alive` says it still works, else a new one from `open`
    /// (which replaces it; users holding the old one keep it until they drop it). An error
    /// of `open` is returned and the next call tries again.
    pub fn get<E>(
        &self,
        alive: impl FnOnce(&T) -> bool,
        open: impl FnOnce() -> Result<T, E>,
    ) -> Result<Arc<T>, E> {
        let mut slot = self.slot.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(c) = slot.as_ref() {
            if alive(c) {
                return Ok(c.clone());
            }
            tracing::warn!("the libvirt connection is dead; reconnecting");
        }
        *slot = None;
        let c = Arc::new(open()?);
        *slot = Some(c.clone());
        Ok(c)
    }

    /// Forgets the cached connection: the next [`get`](Self::get) opens a new one.
    pub fn invalidate(&self) {
        *self.slot.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    /// A connection to a fake daemon: dead once the daemon restarted after it was opened.
    struct FakeConn {
        epoch: usize,
    }

    struct FakeDaemon {
        epoch: AtomicUsize,
        up: AtomicBool,
        opened: AtomicUsize,
    }

    impl FakeDaemon {
        fn new() -> Self {
            FakeDaemon {
                epoch: AtomicUsize::new(0),
                up: AtomicBool::new(true),
                opened: AtomicUsize::new(0),
            }
        }
        fn open(&self) -> Result<FakeConn, String> {
            if !self.up.load(Ordering::SeqCst) {
                return Err("cannot connect: daemon down".into());
            }
            self.opened.fetch_add(1, Ordering::SeqCst);
            Ok(FakeConn {
                epoch: self.epoch.load(Ordering::SeqCst),
            })
        }
        /// The probe: a round trip that fails on a connection from before a restart.
        fn alive(&self, c: &FakeConn) -> bool {
            self.up.load(Ordering::SeqCst) && c.epoch == self.epoch.load(Ordering::SeqCst)
        }
        fn restart(&self, down_for_calls: bool) {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.up.store(!down_for_calls, Ordering::SeqCst);
        }
    }

    fn get(r: &Reconnecting<FakeConn>, d: &FakeDaemon) -> Result<Arc<FakeConn>, String> {
        r.get(|c| d.alive(c), || d.open())
    }

    #[test]
    fn a_live_connection_is_reused_and_a_dead_one_replaced_after_a_daemon_restart() {
        let d = FakeDaemon::new();
        let r = Reconnecting::new();
        let a = get(&r, &d).unwrap();
        let b = get(&r, &d).unwrap();
        assert!(Arc::ptr_eq(&a, &b), "a live connection was reopened");
        assert_eq!(d.opened.load(Ordering::SeqCst), 1);

        d.restart(false);
        let c = get(&r, &d).unwrap();
        assert!(!Arc::ptr_eq(&a, &c), "the dead connection was handed out");
        assert_eq!(c.epoch, 1);
        assert_eq!(d.opened.load(Ordering::SeqCst), 2);
        assert!(Arc::ptr_eq(&c, &get(&r, &d).unwrap()));
    }

    #[test]
    fn while_the_daemon_is_down_calls_fail_and_the_first_call_after_it_is_back_reconnects() {
        let d = FakeDaemon::new();
        let r = Reconnecting::new();
        get(&r, &d).unwrap();
        d.restart(true);
        for _ in 0..3 {
            assert_eq!(
                get(&r, &d).err().as_deref(),
                Some("cannot connect: daemon down")
            );
        }
        d.up.store(true, Ordering::SeqCst);
        let c = get(&r, &d).unwrap();
        assert_eq!(c.epoch, 1);
        assert_eq!(d.opened.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn invalidate_forces_a_new_connection() {
        let d = FakeDaemon::new();
        let r = Reconnecting::new();
        let a = get(&r, &d).unwrap();
        r.invalidate();
        let b = get(&r, &d).unwrap();
        assert!(!Arc::ptr_eq(&a, &b));
        assert_eq!(d.opened.load(Ordering::SeqCst), 2);
    }
}
