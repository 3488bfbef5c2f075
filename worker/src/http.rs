//! The worker's HTTP server: KServe v2 health endpoints and Prometheus metrics.
//!
//! - `GET /v2/health/live`: 200 `{"live":true}` while the process serves at all.
//! - `GET /v2/health/ready`: 200 `{"ready":true}` while the coordinators know this
//!   worker, else 503 `{"ready":false}`.
//! - `GET /metrics`: [`Metrics::render`].
//!
//! The inference routes join this server when serving arrives.

use std::future::Future;
use std::sync::Arc;

use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::Registration;
use crate::metrics::{self, Metrics};

/// What the HTTP handlers read: snapshots and counters, never the agent itself.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub registration: watch::Receiver<Registration>,
}

impl HttpState {
    fn registered(&self) -> bool {
        self.registration.borrow().is_registered()
    }
}

/// Returns the router of the worker's HTTP endpoints.
pub fn router(state: HttpState) -> Router {
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/metrics", get(metrics))
        .with_state(state)
}

/// Serves [`router`] on `listener` until `shutdown` completes, then lets open
/// requests finish.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown)
        .await
}

async fn live() -> impl IntoResponse {
    Json(json!({ "live": true }))
}

async fn ready(State(state): State<HttpState>) -> impl IntoResponse {
    let ready = state.registered();
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(json!({ "ready": ready })))
}

async fn metrics(State(state): State<HttpState>) -> impl IntoResponse {
    let text = state.metrics.render(state.registered());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_proto::v1::Resources;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;
    use tokio_util::sync::CancellationToken;

    /// Sends `GET path` over a fresh connection; returns the status and the body.
    pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        let status = response
            .split(' ')
            .nth(1)
            .and_then(|code| code.parse().ok())
            .expect("status line");
        let body = response
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_string())
            .expect("body");
        (status, body)
    }

    #[tokio::test]
    async fn endpoints_answer() {
        let metrics = Arc::new(Metrics::new(&Resources {
            cpu_cores: 4,
            ..Default::default()
        }));
        let (registration_tx, registration) = watch::channel(Registration::Unregistered);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(
            listener,
            HttpState {
                metrics,
                registration,
            },
            stop.clone().cancelled_owned(),
        ));

        assert_eq!(
            http_get(addr, "/v2/health/live").await,
            (200, r#"{"live":true}"#.to_string())
        );
        assert_eq!(
            http_get(addr, "/v2/health/ready").await,
            (503, r#"{"ready":false}"#.to_string())
        );
        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 200);
        assert!(body.contains("\nkiln_worker_registered 0\n"), "{body}");
        assert!(body.contains("\nkiln_worker_cpu_cores 4\n"), "{body}");

        registration_tx.send_replace(Registration::Registered { incarnation: 3 });
        assert_eq!(
            http_get(addr, "/v2/health/ready").await,
            (200, r#"{"ready":true}"#.to_string())
        );
        let (_, body) = http_get(addr, "/metrics").await;
        assert!(body.contains("\nkiln_worker_registered 1\n"), "{body}");
        assert_eq!(http_get(addr, "/nowhere").await.0, 404);

        stop.cancel();
        tokio::time::timeout(std::time::Duration::from_secs(5), server)
            .await
            .expect("server stops")
            .expect("join")
            .expect("serve");
    }
}
