//! One HTTP/1 accept loop for the controller's servers (the API on its Unix socket, the
//! metrics endpoint on TCP), defending them against bad clients: a cap on connections served
//! at once (further clients wait in the listener's backlog), a deadline for each request
//! head, a cap on the head's size, and a bounded graceful shutdown. Each connection's
//! client identity ([`Caller`], from the socket's peer credentials where there are any) is
//! attached to every request on it as an `axum::Extension`.

use std::sync::Arc;
use std::time::Duration;

use axum::serve::Listener;
use axum::{Extension, Router};
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinSet;

use agentvm_store::caller::Caller;

/// The smallest head buffer hyper accepts.
const MIN_HEAD_BYTES: usize = 8 * 1024;

/// What one server allows its clients.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time a client has to send a request's line and headers; then the connection closes.
    pub header_timeout: Duration,
    /// Largest request head read; larger ones get 431. hyper's minimum, 8 KiB, applies
    /// below that.
    pub max_head_bytes: usize,
    /// How long shutdown waits for requests in progress before dropping their connections.
    pub shutdown_grace: Duration,
}

/// The client of a Unix socket connection, from its peer credentials (`SO_PEERCRED`).
pub fn unix_peer(stream: &tokio::net::UnixStream) -> Option<Caller> {
    let cred = stream.peer_cred().ok()?;
    Some(Caller::from_peer(cred.uid(), cred.gid(), cred.pid()))
}

/// No client identity (TCP).
pub fn no_peer<T>(_: &T) -> Option<Caller> {
    None
}

/// Serves `app` on `listener` within `limits` until `shutdown` resolves. `name` labels log
/// lines; `identify` names each connection's client, which requests on it find as
/// `Extension<Caller>`. Long-lived responses should end on their own when the process shuts
/// down (the API flips a watch for its streams); whatever is still open after
/// `shutdown_grace` is dropped.
pub async fn serve<L: Listener>(
    name: &'static str,
    mut listener: L,
    app: Router,
    identify: fn(&L::Io) -> Option<Caller>,
    limits: Limits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) {
    let slots = Arc::new(Semaphore::new(limits.max_connections));
    let (closing, _) = watch::channel(false);
    let mut connections = JoinSet::new();
    tokio::pin!(shutdown);
    loop {
        let slot = tokio::select! {
            slot = slots.clone().acquire_owned() => match slot {
                Ok(s) => s,
                Err(_) => break,
            },
            _ = &mut shutdown => break,
        };
        // axum's listeners retry failed accepts (out of file descriptors, say) after a pause.
        let (stream, _) = tokio::select! {
            accepted = listener.accept() => accepted,
            _ = &mut shutdown => break,
        };
        let app = match identify(&stream) {
            Some(caller) => app.clone().layer(Extension(caller)),
            None => app.clone(),
        };
        let service = hyper_util::service::TowerToHyperService::new(app);
        let mut closing = closing.subscribe();
        connections.spawn(async move {
            let _slot = slot;
            let conn = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_timeout)
                // A client may shut down its write side and wait for the answer.
                .half_close(true)
                .max_buf_size(limits.max_head_bytes.max(MIN_HEAD_BYTES))
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service)
                // `POST /v1/sandboxes/{name}/attach` switches protocols.
                .with_upgrades();
            tokio::pin!(conn);
            tokio::select! {
                _ = conn.as_mut() => return,
                _ = closing.wait_for(|c| *c) => conn.as_mut().graceful_shutdown(),
            }
            let _ = conn.await;
        });
        while connections.try_join_next().is_some() {}
    }
    drop(listener);
    let _ = closing.send(true);
    let drained = tokio::time::timeout(limits.shutdown_grace, async {
        while connections.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        tracing::warn!(
            "{name}: dropping {} connection(s) still open after {:?}",
            connections.len(),
            limits.shutdown_grace
        );
        connections.abort_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::routing::get;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    #[tokio::test]
    async fn silent_clients_are_cut_off_and_cannot_hold_every_slot() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let app = Router::new().route("/", get(|| async { "hi\n" }));
        let limits = Limits {
            max_connections: 2,
            header_timeout: Duration::from_millis(300),
            max_head_bytes: MIN_HEAD_BYTES,
            shutdown_grace: Duration::from_millis(100),
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve("test", listener, app, no_peer, limits, async {
            let _ = rx.await;
        }));
        // Two clients take both slots and send nothing.
        let mut silent = vec![
            TcpStream::connect(addr).await.unwrap(),
            TcpStream::connect(addr).await.unwrap(),
        ];
        tokio::time::sleep(Duration::from_millis(50)).await;
        // A third gets its answer once the silent ones are cut off at the head deadline.
        let t = std::time::Instant::now();
        let mut c = TcpStream::connect(addr).await.unwrap();
        c.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        let mut out = String::new();
        tokio::time::timeout(Duration::from_secs(5), c.read_to_string(&mut out))
            .await
            .expect("the third client was never served")
            .unwrap();
        assert!(
            out.starts_with("HTTP/1.1 200") && out.ends_with("hi\n"),
            "{out}"
        );
        assert!(
            t.elapsed() >= Duration::from_millis(200),
            "{:?}",
            t.elapsed()
        );
        for s in &mut silent {
            let mut buf = [0u8; 256];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .expect("a silent client was never cut off");
            // Closed (0 bytes or reset), perhaps after a 408.
            if let Ok(n) = n {
                let text = String::from_utf8_lossy(&buf[..n]);
                assert!(n == 0 || text.starts_with("HTTP/1.1 408"), "{text}");
            }
        }
        // An oversized head is refused.
        let mut big = TcpStream::connect(addr).await.unwrap();
        let head = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Pad: {}\r\n\r\n",
            "a".repeat(4 * MIN_HEAD_BYTES)
        );
        let _ = big.write_all(head.as_bytes()).await;
        let mut out = Vec::new();
        let _ = tokio::time::timeout(Duration::from_secs(5), big.read_to_end(&mut out)).await;
        let text = String::from_utf8_lossy(&out);
        assert!(
            text.is_empty() || text.starts_with("HTTP/1.1 431"),
            "{text}"
        );
        tx.send(()).unwrap();
        server.await.unwrap();
    }
}
