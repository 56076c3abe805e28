//! The metrics endpoint: `/metrics` (Prometheus text format 0.0.4), `/healthz` (the process
//! answers) and `/readyz` (see [`Readiness`]) over HTTP on a TCP address, within [`LIMITS`].

use std::net::SocketAddr;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use tokio::net::TcpListener;

use crate::health::Readiness;
use crate::metrics::{Metrics, CONTENT_TYPE};

/// What the handlers read.
#[derive(Clone)]
struct EndpointState {
    metrics: Metrics,
    readiness: Readiness,
}

/// The endpoint's routes.
pub fn router(metrics: Metrics, readiness: Readiness) -> Router {
    Router::new()
        .route("/metrics", get(metrics_text))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready))
        .with_state(EndpointState { metrics, readiness })
}

async fn metrics_text(State(s): State<EndpointState>) -> Response {
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], s.metrics.render()).into_response()
}

async fn ready(State(s): State<EndpointState>) -> Response {
    match s.readiness.check() {
        Ok(()) => (StatusCode::OK, "ok\n").into_response(),
        Err(why) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {why}\n"),
        )
            .into_response(),
    }
}

/// Binds `addr` (port 0 picks a free port; the listener's `local_addr` says which).
pub async fn bind(addr: &str) -> std::io::Result<TcpListener> {
    TcpListener::bind(addr).await
}

/// Parses the `metricsAddress` setting: `None` for `off` or empty (disabled).
pub fn parse_address(text: &str) -> Option<&str> {
    let t = text.trim();
    (!t.is_empty() && !t.eq_ignore_ascii_case("off")).then_some(t)
}

/// Serves the endpoint on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: TcpListener,
    metrics: Metrics,
    readiness: Readiness,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    crate::http_serve::serve(
        "metrics endpoint",
        listener,
        router(metrics, readiness),
        crate::http_serve::no_peer,
        LIMITS,
        shutdown,
    )
    .await;
    Ok(())
}

/// The endpoint serves scrapers and probes, not the public: a few connections at once, each
/// with 10 s to send its request head (a client holding connections open without sending
/// cannot starve scrapes for longer), heads up to 16 KiB.
pub const LIMITS: crate::http_serve::Limits = crate::http_serve::Limits {
    max_connections: 32,
    header_timeout: std::time::Duration::from_secs(10),
    max_head_bytes: 16 * 1024,
    shutdown_grace: std::time::Duration::from_secs(2),
};

/// The address a listener is bound to, for logs (`127.0.0.1:9090`).
pub fn bound_address(listener: &TcpListener) -> Option<SocketAddr> {
    listener.local_addr().ok()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(
            format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn serves_metrics_health_and_readiness() {
        let metrics = Metrics::new();
        metrics.pool_size("p", 2);
        let readiness = Readiness::default();
        let listener = bind("127.0.0.1:0").await.unwrap();
        let addr = bound_address(&listener).unwrap();
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(serve(listener, metrics, readiness.clone(), async {
            let _ = rx.await;
        }));
        let m = get(addr, "/metrics").await;
        assert!(m.starts_with("HTTP/1.1 200"), "{m}");
        assert!(
            m.to_ascii_lowercase()
                .contains("content-type: text/plain; version=0.0.4"),
            "{m}"
        );
        assert!(m.contains("agent_vm_pool_size{pool_id=\"p\"} 2"), "{m}");
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let r = get(addr, "/readyz").await;
        assert!(r.starts_with("HTTP/1.1 503"), "{r}");
        assert!(r.contains("not ready: the store is not open"), "{r}");
        readiness.set_store_open(true);
        readiness.set_dispatcher_running(true);
        assert!(get(addr, "/readyz").await.starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/nope").await.starts_with("HTTP/1.1 404"));
        tx.send(()).unwrap();
        task.await.unwrap().unwrap();
    }

    #[test]
    fn off_or_empty_disables() {
        assert_eq!(parse_address("off"), None);
        assert_eq!(parse_address(" "), None);
        assert_eq!(parse_address("OFF"), None);
        assert_eq!(parse_address("0.0.0.0:9100"), Some("0.0.0.0:9100"));
    }
}
