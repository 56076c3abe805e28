//! A real etcd for tests: a one-member cluster on loopback ports, its data in a temporary
//! directory, ended when the handle is dropped or, at the latest, when the test process
//! exits. Debian's `etcd-server` package provides the binary (`scripts/host-setup.sh`
//! installs it); a missing binary fails the test with that advice, it never skips it.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use crate::{ClusterConfig, Store, STORE_FILE};

/// A running etcd server.
pub struct EtcdServer {
    child: Mutex<Option<Child>>,
    /// Its client URL.
    pub endpoint: String,
    _data: tempfile::TempDir,
}

/// A loopback port nothing listens on now.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .unwrap_or_else(|e| panic!("no free loopback port: {e}"))
}

impl EtcdServer {
    /// Starts a one-member etcd on loopback and waits until it answers.
    pub fn start() -> EtcdServer {
        let data = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary dir: {e}"));
        let (client, peer) = (free_port(), free_port());
        let endpoint = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let mut cmd = Command::new(etcd_binary());
        cmd.args(["--name", "test", "--data-dir"])
            .arg(data.path().join("member"))
            .args(["--listen-client-urls", &endpoint])
            .args(["--advertise-client-urls", &endpoint])
            .args(["--listen-peer-urls", &peer_url])
            .args(["--initial-advertise-peer-urls", &peer_url])
            .args(["--initial-cluster", &format!("test={peer_url}")])
            .args(["--log-level", "error"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::inherit());
        let child = spawn_ending_with_process(cmd);
        let server = EtcdServer {
            child: Mutex::new(Some(child)),
            endpoint,
            _data: data,
        };
        server.wait_ready();
        server
    }

    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        let addr = self.endpoint.trim_start_matches("http://").to_string();
        loop {
            if std::net::TcpStream::connect(&addr).is_ok() {
                let config = ClusterConfig {
                    timeout: Duration::from_secs(2),
                    ..ClusterConfig::new(vec![self.endpoint.clone()])
                };
                if crate::etcd::EtcdRecords::connect(&config).is_ok() {
                    return;
                }
            }
            assert!(
                Instant::now() < deadline,
                "etcd at {} did not answer within 30 s",
                self.endpoint
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Ends the server (SIGKILL) and waits for it.
    pub fn kill(&self) {
        let child = self.child.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(mut child) = child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// A cluster config for this server with its own key prefix (tests sharing one server
    /// do not see each other's objects).
    pub fn config(&self, prefix: &str) -> ClusterConfig {
        ClusterConfig {
            prefix: prefix.into(),
            timeout: Duration::from_secs(3),
            ..ClusterConfig::new(vec![self.endpoint.clone()])
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// `etcd` from `PATH` or Debian's location.
fn etcd_binary() -> PathBuf {
    let found = std::env::var_os("PATH")
        .map(|p| {
            std::env::split_paths(&p)
                .map(|d| d.join("etcd"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
        .into_iter()
        .chain([PathBuf::from("/usr/bin/etcd")])
        .find(|p| p.is_file());
    found.unwrap_or_else(|| {
        panic!(
            "etcd is not installed: the cluster store's tests run a real etcd \
             (install Debian's etcd-server, e.g. `scripts/host-setup.sh --packages-only`)"
        )
    })
}

/// Spawns `cmd` so that it is killed when this process exits, even by a signal: the
/// kernel's parent-death signal fires when the spawning thread ends, so a thread that
/// lives as long as the process spawns it.
#[allow(unsafe_code)] // `pre_exec`
fn spawn_ending_with_process(mut cmd: Command) -> Child {
    use std::os::unix::process::CommandExt;
    type Job = (Command, std::sync::mpsc::SyncSender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<std::sync::mpsc::Sender<Job>>> = OnceLock::new();
    // SAFETY: the closure only makes one async-signal-safe system call.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
    let spawner = SPAWNER.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("etcd-spawner".into())
            .spawn(move || {
                for (mut cmd, reply) in rx {
                    let _ = reply.send(cmd.spawn());
                }
                // The sender lives in a static: this loop ends only with the process.
                loop {
                    std::thread::park();
                }
            })
            .unwrap_or_else(|e| panic!("spawning the etcd spawner thread: {e}"));
        Mutex::new(tx)
    });
    let (reply, result) = std::sync::mpsc::sync_channel(1);
    spawner
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .send((cmd, reply))
        .unwrap_or_else(|e| panic!("the etcd spawner stopped: {e}"));
    result
        .recv()
        .unwrap_or_else(|e| panic!("the etcd spawner stopped: {e}"))
        .unwrap_or_else(|e| panic!("starting etcd: {e}"))
}

/// One etcd for every test of this process that does not need its own.
pub fn shared_etcd() -> Arc<EtcdServer> {
    static SHARED: OnceLock<Arc<EtcdServer>> = OnceLock::new();
    SHARED.get_or_init(|| Arc::new(EtcdServer::start())).clone()
}

/// A fresh cluster store on the shared etcd (a key prefix of its own) with its local
/// output file in a temporary directory, which the first value keeps.
pub fn etcd_store() -> (Box<dyn std::any::Any>, Store) {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let server = shared_etcd();
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let prefix = format!("/test-{}-{n}", std::process::id());
    let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("temporary dir: {e}"));
    let store = Store::open_cluster(&server.config(&prefix), dir.path().join(STORE_FILE))
        .unwrap_or_else(|e| panic!("opening the cluster store: {e}"));
    (Box::new(dir), store)
}
