//! MLflow's tracking API on the worker's HTTP port, passed to a live
//! coordinator: a command job's rank logs through its own worker
//! (`MLFLOW_TRACKING_URI`), so an unchanged `mlflow` script keeps logging
//! while a coordinator fails over.
//!
//! `/api/2.0/mlflow/*` and `/api/2.0/mlflow-artifacts/*` go to the
//! coordinators' HTTP ports, the one that answered last first, then the others
//! (their list comes from the cluster's status, refreshed when a call finds
//! none). The request's method, path, query, body and `authorization` and
//! `content-type` headers travel unchanged; the coordinator checks the token.
//! A request body is held whole (at most [`MAX_BODY_BYTES`], so it can be sent
//! again to another coordinator); larger artifacts travel through MLflow's
//! multipart upload in parts below that, which the ranks' environment turns
//! on (the part URLs name this worker: the Host header travels). Answers
//! stream back. At most [`MAX_IN_FLIGHT`] requests are passed on at once; the
//! rest wait, once their body has arrived. Only a call that reached no
//! coordinator, or a read refused with 503, goes to the next coordinator: a
//! write that may have been applied is not sent twice.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::Full;
use kiln_common::client::ClusterClient;
use kiln_common::https::HttpClient;
use kiln_proto::v1::ClusterStatusRequest;
use tokio::sync::Semaphore;

/// Largest request body passed on: a multipart part of MLflow's upload is
/// smaller ([`MULTIPART_CHUNK_BYTES`]).
pub const MAX_BODY_BYTES: usize = 40 << 20;
/// The part size the ranks' MLflow client uses for large artifacts, and the
/// size from which it uploads in parts.
pub const MULTIPART_CHUNK_BYTES: usize = 32 << 20;
/// Requests passed on at once (each holds its body).
pub const MAX_IN_FLIGHT: usize = 8;
/// Longest one coordinator may take to answer.
const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Rounds over the coordinators before giving up, and the pause between them
/// (a failover takes a few seconds).
const ROUNDS: usize = 10;
const ROUND_PAUSE: Duration = Duration::from_millis(500);

/// What the forwarder needs.
#[derive(Clone)]
pub struct TrackingProxy {
    client: HttpClient,
    cluster: Arc<ClusterClient>,
    scheme: &'static str,
    /// The coordinators' HTTP addresses, the one that answered last first.
    coordinators: Arc<Mutex<Vec<String>>>,
    in_flight: Arc<Semaphore>,
}

impl std::fmt::Debug for TrackingProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackingProxy")
            .field("coordinators", &self.known())
            .finish_non_exhaustive()
    }
}

impl TrackingProxy {
    pub fn new(client: HttpClient, cluster: Arc<ClusterClient>, tls: bool) -> TrackingProxy {
        TrackingProxy {
            client,
            cluster,
            scheme: kiln_common::https::scheme(tls),
            coordinators: Arc::new(Mutex::new(Vec::new())),
            in_flight: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }

    fn known(&self) -> Vec<String> {
        self.coordinators
            .lock()
            .map(|c| c.clone())
            .unwrap_or_default()
    }

    /// Reads the coordinators' HTTP addresses from the cluster's status.
    async fn refresh(&self) {
        let status = self
            .cluster
            .call(|mut c| async move {
                c.cluster_status(ClusterStatusRequest {})
                    .await
                    .map(|r| r.into_inner())
            })
            .await;
        if let Ok(status) = status {
            let mut addrs: Vec<String> = status
                .coordinators
                .iter()
                .filter(|c| !c.http_addr.is_empty())
                .map(|c| c.http_addr.clone())
                .collect();
            // The leader first: writes land there without a hop.
            if let Some(leader) = status
                .coordinators
                .iter()
                .find(|c| c.id == status.leader_id)
            {
                addrs.retain(|a| *a != leader.http_addr);
                addrs.insert(0, leader.http_addr.clone());
            }
            if let Ok(mut known) = self.coordinators.lock() {
                *known = addrs;
            }
        }
    }

    /// Puts `addr` first: it answered.
    fn answered(&self, addr: &str) {
        if let Ok(mut known) = self.coordinators.lock() {
            if let Some(at) = known.iter().position(|a| a == addr) {
                let first = known.remove(at);
                known.insert(0, first);
            }
        }
    }

    /// Passes one request on; see the module docs.
    async fn pass(&self, request: Request) -> Response {
        let (parts, body) = request.into_parts();
        let read = tokio::time::timeout(CALL_TIMEOUT, axum::body::to_bytes(body, MAX_BODY_BYTES));
        let body = match read.await {
            Ok(Ok(bytes)) => bytes,
            Err(_) => {
                return refusal(
                    StatusCode::REQUEST_TIMEOUT,
                    &format!("the request's body did not arrive within {} s", CALL_TIMEOUT.as_secs()),
                )
            }
            Ok(Err(_)) => {
                return refusal(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    &format!(
                        "a request through the worker's tracking port holds at most {MAX_BODY_BYTES} bytes; upload larger artifacts in parts (MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD=true, which command jobs' ranks have)"
                    ),
                )
            }
        };
        // Held from here: a slow sender does not hold a slot.
        let Ok(_slot) = self.in_flight.acquire().await else {
            return refusal(StatusCode::SERVICE_UNAVAILABLE, "the worker is stopping");
        };
        let path = parts
            .uri
            .path_and_query()
            .map_or(parts.uri.path(), |p| p.as_str())
            .to_string();
        let mut last_error = String::from("no coordinator is known");
        for round in 0..ROUNDS {
            if round > 0 {
                tokio::time::sleep(ROUND_PAUSE).await;
            }
            let mut addrs = self.known();
            if addrs.is_empty() || round > 0 {
                self.refresh().await;
                addrs = self.known();
            }
            for addr in addrs {
                match self.send(&addr, &parts, &path, body.clone()).await {
                    Ok(response) => {
                        let failed = [StatusCode::BAD_GATEWAY, StatusCode::GATEWAY_TIMEOUT];
                        if !failed.contains(&response.status()) {
                            self.answered(&addr);
                        }
                        return response;
                    }
                    Err(e) => last_error = format!("{addr}: {e}"),
                }
            }
        }
        refusal(
            StatusCode::SERVICE_UNAVAILABLE,
            &format!("no coordinator answered the tracking call; last: {last_error}"),
        )
    }

    /// One try on one coordinator; `Err` when it cannot answer now (no
    /// connection, or it has no leader: 503), so another is tried.
    async fn send(
        &self,
        addr: &str,
        parts: &axum::http::request::Parts,
        path: &str,
        body: Bytes,
    ) -> Result<Response, String> {
        let mut request = hyper::Request::builder()
            .method(parts.method.clone())
            .uri(format!("{}://{addr}{path}", self.scheme));
        // Host too: the coordinator names this worker in the part URLs of a
        // multipart upload, so the parts come back through it.
        for name in [
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::ACCEPT,
            header::HOST,
        ] {
            if let Some(value) = parts.headers.get(&name) {
                request = request.header(name, value.clone());
            }
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| format!("build the request: {e}"))?;
        // Only a request that never reached a coordinator (no connection) or
        // that it refused whole goes to another: a write that may have been
        // applied is not sent twice; the client decides.
        let answer = match tokio::time::timeout(CALL_TIMEOUT, self.client.request(request)).await {
            Ok(Ok(answer)) => answer,
            Ok(Err(e)) if e.is_connect() => return Err(e.to_string()),
            Ok(Err(e)) => {
                return Ok(refusal(
                    StatusCode::BAD_GATEWAY,
                    &format!("coordinator {addr} failed during the tracking call: {e}"),
                ))
            }
            Err(_) => {
                return Ok(refusal(
                    StatusCode::GATEWAY_TIMEOUT,
                    &format!(
                        "coordinator {addr} did not answer the tracking call within {} s",
                        CALL_TIMEOUT.as_secs()
                    ),
                ))
            }
        };
        // A coordinator answers 503 when it has no leader, but also when a
        // write's outcome is unknown: only a read goes to the next one.
        if answer.status() == StatusCode::SERVICE_UNAVAILABLE
            && parts.method == axum::http::Method::GET
        {
            return Err("unavailable (no leader yet)".into());
        }
        // The answer streams back (an artifact's download may be large).
        let (answer, body) = answer.into_parts();
        let mut response = Response::new(Body::new(body));
        *response.status_mut() = answer.status;
        for name in [header::CONTENT_TYPE, header::CONTENT_DISPOSITION] {
            if let Some(value) = answer.headers.get(&name) {
                response.headers_mut().insert(name, value.clone());
            }
        }
        Ok(response)
    }
}

/// An answer in MLflow's error shape.
fn refusal(status: StatusCode, message: &str) -> Response {
    let body = serde_json::json!({
        "error_code": if status == StatusCode::PAYLOAD_TOO_LARGE {
            "INVALID_PARAMETER_VALUE"
        } else {
            "TEMPORARILY_UNAVAILABLE"
        },
        "message": message,
    });
    let mut response = (status, body.to_string()).into_response();
    response.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    response
}

/// The axum handler: every method on the tracking paths.
pub async fn forward(State(proxy): State<TrackingProxy>, request: Request) -> Response {
    proxy.pass(request).await
}

/// The routes of MLflow's tracking and artifact APIs on the worker's port.
pub fn routes(proxy: TrackingProxy) -> axum::Router {
    axum::Router::new()
        .route("/api/2.0/mlflow/*rest", axum::routing::any(forward))
        .route(
            "/api/2.0/mlflow-artifacts/*rest",
            axum::routing::any(forward),
        )
        .with_state(proxy)
}
