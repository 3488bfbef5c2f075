//! The worker's HTTP server: KServe v2 health endpoints and Prometheus metrics.
//!
//! - `GET /v2/health/live`: 200 `{"live":true}` while the process serves at all.
//! - `GET /v2/health/ready`: 200 `{"ready":true}` while the coordinators know this
//!   worker, else 503 `{"ready":false}`.
//! - `GET /metrics`: [`Metrics::render`]. With TLS it needs a bearer token that may
//!   read cluster state (viewer or more), checked against the worker's
//!   [`TokenBook`]; the health endpoints stay open for probes.
//!
//! - KServe v2 inference (see `serving::router`): `GET /v2` (server metadata),
//!   `GET /v2/models/{m}[/versions/{v}]` (model metadata),
//!   `GET /v2/models/{m}[/versions/{v}]/ready`, and
//!   `POST /v2/models/{m}[/versions/{v}]/infer` (JSON tensors or the binary tensor
//!   extension; no Content-Type required). The model name is the deployment's.
//!   With TLS they need a token that may call models, unless the deployment is
//!   public.
//! - Triton's statistics extension: `GET /v2/models/stats` (every deployment
//!   the caller may see), `GET /v2/models/{m}[/versions/{v}]/stats`, summed over
//!   the cluster's replicas (see `serving::router`), with the authorization of
//!   model metadata.
//! - Triton's model repository extension: `POST /v2/repository/index` (body
//!   `{"ready": bool}`, optional) lists the deployments the caller may see;
//!   `POST /v2/repository/models/{m}/load` and `.../unload` answer 501 naming
//!   `kiln deploy` and `kiln deployments rm`.
//! - `POST /v2/models/{m}/feedback`: labels for earlier requests' ids (see
//!   `serving::feedback`), with the same authorization as inference; the body
//!   is at most [`MAX_FEEDBACK_BODY_BYTES`].
//! - `/api/2.0/mlflow/*` and `/api/2.0/mlflow-artifacts/*`: MLflow's tracking
//!   API, passed to a live coordinator (`crate::tracking_proxy`), for the
//!   ranks of command jobs on this worker.

use std::future::Future;
use std::sync::Arc;

use axum::extract::Path;
use axum::extract::{Request, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use kiln_common::auth::{Permission, TokenBook};
use kiln_common::clock::now_ms;
use kiln_common::http::{authorization, error_response};
use serde_json::json;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::agent::Registration;
use crate::metrics::{self, Metrics};
use crate::serving::feedback::MAX_FEEDBACK_BODY_BYTES;
use crate::serving::router::{
    Router as ServingRouter, Version, MAX_BODY_BYTES, STATS_LOCAL_HEADER,
};

/// Largest repository index request body (`{"ready": true}` takes 15 bytes).
const MAX_INDEX_BODY_BYTES: usize = 64 << 10;

/// What the HTTP handlers read: snapshots and counters, never the agent itself.
#[derive(Debug, Clone)]
pub struct HttpState {
    pub metrics: Arc<Metrics>,
    pub registration: watch::Receiver<Registration>,
    /// The records bearer tokens are checked against; `None` without TLS.
    pub tokens: Option<Arc<TokenBook>>,
    /// Routes inference requests to the deployments' replicas.
    pub serving: Arc<ServingRouter>,
    /// Passes MLflow's tracking calls of command jobs' ranks to a coordinator.
    pub tracking: crate::tracking_proxy::TrackingProxy,
}

impl HttpState {
    fn registered(&self) -> bool {
        self.registration.borrow().is_registered()
    }
}

/// Returns the router of the worker's HTTP endpoints.
pub fn router(state: HttpState) -> Router {
    let guarded = Router::new().route("/metrics", get(metrics)).route_layer(
        axum::middleware::from_fn_with_state(state.clone(), require_viewer),
    );
    Router::new()
        .route("/v2/health/live", get(live))
        .route("/v2/health/ready", get(ready))
        .route("/v2", get(server_metadata))
        .route("/v2/models/:model", get(model_metadata))
        .route("/v2/models/:model/versions/:version", get(version_metadata))
        .route("/v2/models/:model/ready", get(model_ready))
        .route(
            "/v2/models/:model/versions/:version/ready",
            get(version_ready),
        )
        .route("/v2/models/stats", get(all_statistics))
        .route("/v2/models/:model/stats", get(model_statistics))
        .route(
            "/v2/models/:model/versions/:version/stats",
            get(version_statistics),
        )
        .route("/v2/repository/index", post(repository_index))
        .route("/v2/repository/models/:model/load", post(repository_change))
        .route(
            "/v2/repository/models/:model/unload",
            post(repository_change),
        )
        .route("/v2/models/:model/infer", post(infer))
        .route("/v2/models/:model/feedback", post(feedback))
        .route(
            "/v2/models/:model/versions/:version/infer",
            post(version_infer),
        )
        .merge(guarded)
        .with_state(state.clone())
        .merge(crate::tracking_proxy::routes(state.tracking))
}

async fn server_metadata() -> impl IntoResponse {
    Json(crate::serving::protocol::server_metadata(env!(
        "CARGO_PKG_VERSION"
    )))
}

async fn model_metadata(
    State(state): State<HttpState>,
    Path(model): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    state.serving.metadata(&model, Version::Any, &headers).await
}

async fn version_metadata(
    State(state): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
) -> Response {
    match Version::parse(Some(&version)) {
        Ok(version) => state.serving.metadata(&model, version, &headers).await,
        Err(e) => error_response(&e),
    }
}

async fn model_ready(State(state): State<HttpState>, Path(model): Path<String>) -> Response {
    state.serving.ready(&model, Version::Any)
}

async fn version_ready(
    State(state): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
) -> Response {
    match Version::parse(Some(&version)) {
        Ok(version) => state.serving.ready(&model, version),
        Err(e) => error_response(&e),
    }
}

async fn infer(
    State(state): State<HttpState>,
    Path(model): Path<String>,
    request: Request,
) -> Response {
    infer_version(state, model, Version::Any, request).await
}

async fn version_infer(
    State(state): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    request: Request,
) -> Response {
    match Version::parse(Some(&version)) {
        Ok(version) => infer_version(state, model, version, request).await,
        Err(e) => error_response(&e),
    }
}

/// Reads the body (at most [`MAX_BODY_BYTES`]; more is a 413 that says so) and
/// routes the request.
async fn infer_version(
    state: HttpState,
    model: String,
    version: Version,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    let body = match read_body(body, MAX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    state
        .serving
        .infer(&model, version, &parts.headers, body)
        .await
}

async fn all_statistics(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    statistics(&state, None, Version::Any, &headers).await
}

async fn model_statistics(
    State(state): State<HttpState>,
    Path(model): Path<String>,
    headers: HeaderMap,
) -> Response {
    statistics(&state, Some(&model), Version::Any, &headers).await
}

async fn version_statistics(
    State(state): State<HttpState>,
    Path((model, version)): Path<(String, String)>,
    headers: HeaderMap,
) -> Response {
    match Version::parse(Some(&version)) {
        Ok(version) => statistics(&state, Some(&model), version, &headers).await,
        Err(e) => error_response(&e),
    }
}

/// Answers Triton's statistics of `model` (every model when `None`).
async fn statistics(
    state: &HttpState,
    model: Option<&str>,
    version: Version,
    headers: &HeaderMap,
) -> Response {
    let local_only = headers.contains_key(STATS_LOCAL_HEADER);
    match state
        .serving
        .statistics(model, version, authorization(headers), local_only)
        .await
    {
        Ok(answer) => Json(answer).into_response(),
        Err(e) => error_response(&e),
    }
}

/// The body of a repository index request; every field is optional.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct IndexRequest {
    #[serde(default)]
    ready: bool,
}

/// Answers `POST /v2/repository/index`: `[{name, version, state, reason}]`.
async fn repository_index(State(state): State<HttpState>, request: Request) -> Response {
    let (parts, body) = request.into_parts();
    let body = match read_body(body, MAX_INDEX_BODY_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let asked: IndexRequest = if body.iter().all(u8::is_ascii_whitespace) {
        IndexRequest::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(asked) => asked,
            Err(e) => {
                return error_response(&kiln_common::Error::InvalidArgument(format!(
                    "parse the repository index request (optional {{\"ready\": true|false}}): {e}"
                )))
            }
        }
    };
    match state
        .serving
        .repository_index(authorization(&parts.headers), asked.ready)
        .await
    {
        Ok(entries) => Json(entries).into_response(),
        Err(e) => error_response(&e),
    }
}

/// Answers the repository's load and unload calls: 501, as kiln changes what
/// it serves through deployments.
async fn repository_change(Path(model): Path<String>) -> Response {
    (
        StatusCode::NOT_IMPLEMENTED,
        Json(json!({ "error": crate::serving::statistics::repository_change_refusal(&model) })),
    )
        .into_response()
}

/// Reads a feedback body (at most [`MAX_FEEDBACK_BODY_BYTES`]) and labels it.
async fn feedback(
    State(state): State<HttpState>,
    Path(model): Path<String>,
    request: Request,
) -> Response {
    let (parts, body) = request.into_parts();
    match read_body(body, MAX_FEEDBACK_BODY_BYTES).await {
        Ok(body) => {
            state
                .serving
                .post_feedback(&model, &parts.headers, &body)
                .await
        }
        Err(response) => response,
    }
}

/// Reads a whole body of at most `limit` bytes; more is a 413 that says so.
async fn read_body(body: axum::body::Body, limit: usize) -> Result<axum::body::Bytes, Response> {
    axum::body::to_bytes(body, limit).await.map_err(|_| {
        (
            StatusCode::PAYLOAD_TOO_LARGE,
            Json(json!({
                "error": format!("the request body is over the limit of {limit} bytes")
            })),
        )
            .into_response()
    })
}

/// Lets a request through when its bearer token may read cluster state.
async fn require_viewer(State(state): State<HttpState>, request: Request, next: Next) -> Response {
    if let Some(tokens) = &state.tokens {
        let header = authorization(request.headers());
        if let Err(e) = tokens.verify_fresh(header, Permission::Read, now_ms).await {
            return error_response(&e);
        }
    }
    next.run(request).await
}

/// Serves [`router`] on `listener` (HTTPS with `tls`) until `shutdown`
/// completes, then lets open requests finish.
pub async fn serve(
    listener: TcpListener,
    state: HttpState,
    tls: Option<kiln_common::https::TlsAcceptor>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    kiln_common::https::serve(listener, router(state), tls, shutdown).await
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
    let mut text = state.metrics.render(state.registered());
    text.push_str(&state.serving.table().render_metrics());
    text.push_str(&state.serving.feedback().render_metrics());
    ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use kiln_proto::v1::Resources;
    use std::net::SocketAddr;
    use tokio_util::sync::CancellationToken;

    /// Sends `GET path` without a token; returns the status and the body.
    pub(crate) async fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
        kiln_tests::http_get(&addr.to_string(), path, None).await
    }

    /// Sends `GET path` with a bearer token when given.
    pub(crate) async fn http_get_as(
        addr: SocketAddr,
        path: &str,
        token: Option<&str>,
    ) -> (u16, String) {
        kiln_tests::http_get(&addr.to_string(), path, token).await
    }

    /// A router with no deployments.
    fn no_serving() -> Arc<ServingRouter> {
        Arc::new(
            ServingRouter::new(
                "w".into(),
                Arc::default(),
                watch::channel(Vec::new()).1,
                None,
            )
            .expect("a plain http client"),
        )
    }

    /// A tracking forwarder with coordinators nowhere (the tests here do not
    /// call it).
    fn no_tracking() -> crate::tracking_proxy::TrackingProxy {
        let cluster = kiln_common::client::ClusterClient::new(
            vec!["127.0.0.1:1".into()],
            kiln_common::client::ClientOptions::default(),
        )
        .expect("a client");
        crate::tracking_proxy::TrackingProxy::new(
            kiln_common::https::http_client(None, Default::default()).expect("a client"),
            Arc::new(cluster),
            false,
        )
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
                tokens: None,
                serving: no_serving(),
                tracking: no_tracking(),
            },
            None,
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

    #[tokio::test]
    async fn metrics_need_a_token_that_may_read() {
        use kiln_common::auth::mint;
        use kiln_proto::v1::Role;
        let tokens = Arc::new(TokenBook::default());
        let (viewer, viewer_record) = mint("v", Role::Viewer, 1, 0);
        let (inference, inference_record) = mint("i", Role::Inference, 1, 0);
        tokens.replace(1, vec![viewer_record, inference_record]);
        let (_registration_tx, registration) = watch::channel(Registration::Unregistered);
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let stop = CancellationToken::new();
        let state = HttpState {
            metrics: Arc::new(Metrics::new(&Resources::default())),
            registration,
            tokens: Some(Arc::clone(&tokens)),
            serving: no_serving(),
            tracking: no_tracking(),
        };
        let server = tokio::spawn(serve(listener, state, None, stop.clone().cancelled_owned()));

        let (status, body) = http_get(addr, "/metrics").await;
        assert_eq!(status, 401, "{body}");
        assert!(body.contains("bearer token is required"), "{body}");
        assert_eq!(http_get_as(addr, "/metrics", Some(&inference)).await.0, 403);
        let (status, body) = http_get_as(addr, "/metrics", Some(&viewer)).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("kiln_worker_registered"));
        // Probes need no token.
        assert_eq!(http_get(addr, "/v2/health/live").await.0, 200);
        // A revocation is a newer version without the record.
        tokens.replace(2, vec![]);
        assert_eq!(http_get_as(addr, "/metrics", Some(&viewer)).await.0, 401);
        stop.cancel();
        let _ = server.await;
    }
}
