//! The router: every worker answers inference requests for every deployment and
//! sends each to one ready replica, on this worker or another.
//!
//! - The routes (each deployment's ready replicas, its canary share, whether it
//!   is public) arrive with every heartbeat answer.
//! - A request names no version: it goes to the canary with the canary's
//!   percentage, else to the primary; a request that names a version goes to a
//!   replica of that version.
//! - Among the candidates: the power of two choices on the requests this router
//!   has in flight to each replica.
//! - A replica on this worker is called in-process; one elsewhere through its
//!   worker's inference HTTP port, marked with [`REPLICA_HEADER`] so that worker
//!   serves it with that replica and does not route it again.
//! - When the chosen replica fails before answering (its worker is gone, the
//!   replica has drained), the request is retried once on another replica, on
//!   another worker when the deployment has one.
//! - The worker whose replica answers gives a request without an id one (the
//!   response carries it) and remembers the answer under it (`feedback`); a label
//!   posted to `/v2/models/{m}/feedback` on any worker is matched there, or on
//!   the deployment's other workers, each asked once and marked with
//!   [`FORWARDED_HEADER`] so that they do not ask again.
//! - Statistics (`GET /v2/models[/{m}[/versions/{v}]]/stats`, gRPC
//!   `ModelStatistics`) are summed over the cluster: this worker's replicas, and
//!   the other workers that serve the models, asked at once, each within
//!   [`STATS_TIMEOUT`] and marked with [`STATS_LOCAL_HEADER`] so that they answer
//!   for their own replicas only; the answer names the workers that did not
//!   answer (`statistics`).

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::body::Body;
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use kiln_common::auth::{Permission, TokenBook};
use kiln_common::clock::now_ms;
use kiln_common::http::error_response;
use kiln_common::https::{self, HttpClient};
use kiln_common::tls::TlsMaterial;
use kiln_common::{Error, Result};
use kiln_proto::v1::{Route, RouteEndpoint};
use rand::Rng;
use tokio::sync::watch;

use super::feedback::{
    self, Feedback, FeedbackAnswer, FeedbackItem, FORWARDED_HEADER, FORWARD_BUDGET,
    FORWARD_TIMEOUT, MAX_FEEDBACK_BODY_BYTES,
};
use super::protocol;
use super::replicas::{LocalReplica, ServingTable};
use super::statistics::{self, IndexEntry, ModelStats, StatsAnswer, StatsSum, Unanswered};

/// Marks a request forwarded by another worker's router: its value is the replica
/// to serve it with.
pub const REPLICA_HEADER: &str = "kiln-replica";
/// Marks an answer that says the replica a forwarded request named is not here,
/// which the forwarding router retries elsewhere.
pub const MISSING_HEADER: &str = "kiln-replica-missing";
/// The time left to a forwarded request, in microseconds: the forwarding
/// router's deadline (its own, or the caller's `timeout` parameter) passed on.
pub const TIMEOUT_HEADER: &str = "kiln-timeout-us";
/// The KServe binary extension's header: the JSON part's length.
pub const JSON_LENGTH_HEADER: &str = "inference-header-content-length";
/// Longest a request may take, queueing included, unless it asks for less.
pub const DEFAULT_DEADLINE: Duration = Duration::from_secs(30);
/// Largest inference request body.
pub const MAX_BODY_BYTES: usize = 64 << 20;
/// Most replicas the in-flight table tracks before it forgets idle ones.
const MAX_TRACKED: usize = 4096;
/// Longest wait for another worker's model metadata.
const METADATA_TIMEOUT: Duration = Duration::from_secs(5);
/// Largest model metadata answer read from another worker.
const MAX_METADATA_BYTES: usize = 16 << 20;
/// Marks a statistics request another worker's router sent: answer for this
/// worker's replicas only.
pub const STATS_LOCAL_HEADER: &str = "kiln-stats-local";
/// Longest wait for another worker's statistics; its counts are left out after.
pub const STATS_TIMEOUT: Duration = Duration::from_secs(2);
/// Most other workers asked for statistics by one request; the rest are named
/// as not asked.
pub const MAX_STATS_PEERS: usize = 64;
/// Largest statistics answer read from another worker.
const MAX_STATS_BYTES: usize = 4 << 20;

/// Which model version a request names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Any,
    Exactly(u64),
}

impl Version {
    /// Parses the `{v}` of `/versions/{v}`.
    pub fn parse(text: Option<&str>) -> Result<Version> {
        match text {
            None => Ok(Version::Any),
            Some(v) => v.parse::<u64>().map(Version::Exactly).map_err(|_| {
                Error::InvalidArgument(format!("model version {v:?} is not a version number"))
            }),
        }
    }

    /// True when a replica of `version` may answer this request.
    pub fn admits(self, version: u64) -> bool {
        match self {
            Version::Any => true,
            Version::Exactly(v) => v == version,
        }
    }

    fn path(self) -> String {
        match self {
            Version::Any => String::new(),
            Version::Exactly(v) => format!("/versions/{v}"),
        }
    }
}

/// Why a call to a replica did not give an answer to return.
pub enum Failure<T> {
    /// The replica could not take it (gone, drained, unreachable): try another.
    Retry(String),
    /// The answer (an error included) to return as it is.
    Final(T),
}

/// Where [`Router::dispatch`] sends a request.
pub enum Target {
    /// A ready replica of this worker, called in-process.
    Local(Arc<LocalReplica>),
    /// A replica of another worker, called through its worker's port.
    Remote(RouteEndpoint),
}

/// The router of one worker.
pub struct Router {
    worker_id: String,
    table: Arc<ServingTable>,
    routes: watch::Receiver<Vec<Route>>,
    in_flight: Mutex<HashMap<(String, u64), Arc<AtomicUsize>>>,
    /// Calls the other workers' inference HTTP ports, over HTTPS with TLS.
    client: HttpClient,
    /// `https` with TLS, `http` without (`--insecure`).
    scheme: &'static str,
    /// Token records callers are checked against; `None` without TLS.
    tokens: Option<Arc<TokenBook>>,
    /// The answers of this worker's replicas, for the feedback endpoint.
    feedback: Arc<Feedback>,
    /// When each local replica last answered successfully (ms since the
    /// epoch), by deployment and replica id, for the statistics'
    /// `last_inference`.
    last_inference: Mutex<HashMap<(String, u64), u64>>,
}

impl std::fmt::Debug for Router {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Router")
            .field("worker_id", &self.worker_id)
            .finish_non_exhaustive()
    }
}

/// Counts a request in flight to a replica while it lives.
struct InFlight(Arc<AtomicUsize>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl Router {
    /// A router; `secure` holds this worker's TLS identity, with which it calls
    /// the other workers, and the token records it checks callers against
    /// (`None` with `--insecure`).
    pub fn new(
        worker_id: String,
        table: Arc<ServingTable>,
        routes: watch::Receiver<Vec<Route>>,
        secure: Option<(&TlsMaterial, Arc<TokenBook>)>,
    ) -> Result<Router> {
        let client = https::http_client(
            secure.as_ref().map(|(tls, _)| *tls),
            https::ClientSettings {
                pool_max_idle_per_host: 256,
                ..https::ClientSettings::default()
            },
        )?;
        Ok(Router {
            feedback: Arc::new(Feedback::new(&worker_id)),
            worker_id,
            table,
            routes,
            in_flight: Mutex::new(HashMap::new()),
            last_inference: Mutex::new(HashMap::new()),
            client,
            scheme: https::scheme(secure.is_some()),
            tokens: secure.map(|(_, tokens)| tokens),
        })
    }

    /// The ready local replicas, for metrics.
    pub fn table(&self) -> &ServingTable {
        &self.table
    }

    /// The answers remembered here and the scores of labels not yet reported.
    pub fn feedback(&self) -> &Arc<Feedback> {
        &self.feedback
    }

    /// The route of `deployment`, or NotFound.
    pub fn route(&self, deployment: &str) -> Result<Route> {
        self.routes
            .borrow()
            .iter()
            .find(|r| r.deployment == deployment)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("model {deployment} is not deployed")))
    }

    /// The route of `deployment` once the caller may call it. Without a valid
    /// token a caller learns nothing about deployments that are not public: a
    /// name that is not deployed answers as a private one would (401), so names
    /// cannot be listed without credentials; NotFound only to a caller with one.
    pub async fn authorized_route(
        &self,
        deployment: &str,
        authorization: Option<&str>,
    ) -> Result<Route> {
        match self.route(deployment) {
            Ok(route) => {
                self.authorize(&route, authorization).await?;
                Ok(route)
            }
            Err(not_found) => {
                if let Some(tokens) = &self.tokens {
                    tokens
                        .verify_fresh(authorization, Permission::Infer, now_ms)
                        .await?;
                }
                Err(not_found)
            }
        }
    }

    /// Checks the caller (its `authorization` header or metadata) may call
    /// `route`'s model.
    pub async fn authorize(&self, route: &Route, authorization: Option<&str>) -> Result<()> {
        match &self.tokens {
            Some(tokens) if !route.public => tokens
                .verify_fresh(authorization, Permission::Infer, now_ms)
                .await
                .map(drop),
            _ => Ok(()),
        }
    }

    /// The local replica a forwarded request names, after checking its caller.
    pub async fn forwarded(
        &self,
        deployment: &str,
        replica: u64,
        authorization: Option<&str>,
    ) -> Result<Option<Arc<LocalReplica>>> {
        match self.authorized_route(deployment, authorization).await {
            Ok(_) | Err(Error::NotFound(_)) => Ok(self.table.replica(deployment, replica)),
            Err(e) => Err(e),
        }
    }

    /// Sends one request to a replica of `deployment` chosen by [`Router::choose`]
    /// and returns what `call` makes of it; a replica that fails with
    /// [`Failure::Retry`] is replaced by another once.
    pub async fn dispatch<T, F, Fut>(
        &self,
        deployment: &str,
        version: Version,
        authorization: Option<&str>,
        call: F,
    ) -> Result<T>
    where
        F: Fn(Target) -> Fut,
        Fut: std::future::Future<Output = std::result::Result<T, Failure<T>>>,
    {
        let route = self.authorized_route(deployment, authorization).await?;
        let mut tried: Option<RouteEndpoint> = None;
        let mut last = String::new();
        for _ in 0..2 {
            let Some(endpoint) = self.choose(&route, version, tried.as_ref()) else {
                break;
            };
            tried = Some(endpoint.clone());
            let _counted = {
                let counter = self.counter(deployment, endpoint.replica_id);
                counter.fetch_add(1, Ordering::Relaxed);
                InFlight(counter)
            };
            let target = if endpoint.worker_id == self.worker_id {
                match self.table.replica(deployment, endpoint.replica_id) {
                    Some(replica) => Target::Local(replica),
                    None => {
                        last = format!("replica {} has left this worker", endpoint.replica_id);
                        continue;
                    }
                }
            } else {
                Target::Remote(endpoint.clone())
            };
            match call(target).await {
                Ok(answer) | Err(Failure::Final(answer)) => return Ok(answer),
                Err(Failure::Retry(reason)) => {
                    tracing::debug!(deployment, replica = endpoint.replica_id, %reason, "retrying on another replica");
                    last = reason;
                }
            }
        }
        Err(if tried.is_none() {
            match version {
                Version::Exactly(v) if route.endpoints.iter().all(|e| e.version != v) => {
                    Error::NotFound(format!("version {v} of model {deployment} is not served"))
                }
                _ => Error::Unavailable(format!("model {deployment} has no ready replica yet")),
            }
        } else {
            Error::Unavailable(format!("no replica of {deployment} could answer: {last}"))
        })
    }

    fn counter(&self, deployment: &str, replica: u64) -> Arc<AtomicUsize> {
        let mut map = self.in_flight.lock().expect("in-flight lock");
        if map.len() > MAX_TRACKED {
            map.retain(|_, c| c.load(Ordering::Relaxed) > 0);
        }
        Arc::clone(
            map.entry((deployment.to_string(), replica))
                .or_insert_with(|| Arc::new(AtomicUsize::new(0))),
        )
    }

    /// Picks a replica of `route` for a request: canary or primary by the
    /// canary's share, then the less busy of two at random. A retry names the
    /// replica that `failed`: it goes to a replica on another worker when one
    /// exists, as a connection failure usually means that worker is gone.
    pub fn choose(
        &self,
        route: &Route,
        version: Version,
        failed: Option<&RouteEndpoint>,
    ) -> Option<RouteEndpoint> {
        let mut candidates: Vec<&RouteEndpoint> = route
            .endpoints
            .iter()
            .filter(|e| {
                version.admits(e.version) && failed.is_none_or(|f| f.replica_id != e.replica_id)
            })
            .collect();
        if let Some(failed) = failed {
            if candidates.iter().any(|e| e.worker_id != failed.worker_id) {
                candidates.retain(|e| e.worker_id != failed.worker_id);
            }
        }
        let mut rng = rand::thread_rng();
        let pool: Vec<&RouteEndpoint> = if version == Version::Any {
            // No canary share: canary replicas still draining take nothing.
            let to_canary =
                route.canary_percent > 0 && rng.gen_range(0..100) < route.canary_percent;
            let side: Vec<&RouteEndpoint> = candidates
                .iter()
                .copied()
                .filter(|e| e.canary == to_canary)
                .collect();
            if side.is_empty() {
                candidates
            } else {
                side
            }
        } else {
            candidates
        };
        match pool.len() {
            0 => None,
            1 => Some(pool[0].clone()),
            n => {
                let a = rng.gen_range(0..n);
                let mut b = rng.gen_range(0..n - 1);
                if b >= a {
                    b += 1;
                }
                let load = |e: &RouteEndpoint| {
                    self.counter(&route.deployment, e.replica_id)
                        .load(Ordering::Relaxed)
                };
                let pick = if load(pool[b]) < load(pool[a]) {
                    pool[b]
                } else {
                    pool[a]
                };
                Some(pick.clone())
            }
        }
    }

    /// Answers `POST /v2/models/{m}[/versions/{v}]/infer`.
    pub async fn infer(
        &self,
        deployment: &str,
        version: Version,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Response {
        match self.try_infer(deployment, version, headers, body).await {
            Ok(response) => response,
            Err(e) => error_response(&e),
        }
    }

    async fn try_infer(
        &self,
        deployment: &str,
        version: Version,
        headers: &HeaderMap,
        body: Bytes,
    ) -> Result<Response> {
        let deadline = forwarded_deadline(headers, Instant::now())?;
        let authorization = kiln_common::http::authorization(headers);
        // A request another router forwarded: serve it here, with that replica.
        if let Some(id) = headers.get(REPLICA_HEADER) {
            let id: u64 = id
                .to_str()
                .ok()
                .and_then(|v| v.parse().ok())
                .ok_or_else(|| Error::InvalidArgument(format!("bad {REPLICA_HEADER} header")))?;
            let Some(replica) = self.forwarded(deployment, id, authorization).await? else {
                let mut response = error_response(&Error::Unavailable(format!(
                    "replica {id} of {deployment} is not on this worker"
                )));
                response
                    .headers_mut()
                    .insert(MISSING_HEADER, HeaderValue::from_static("1"));
                return Ok(response);
            };
            let response = local_infer(&replica, &self.feedback, headers, body, deadline).await;
            return Ok(self.note_answer(&replica, response));
        }
        self.dispatch(deployment, version, authorization, |target| {
            let body = body.clone();
            async move {
                match target {
                    Target::Local(replica) => {
                        let response =
                            local_infer(&replica, &self.feedback, headers, body, deadline).await;
                        Ok(self.note_answer(&replica, response))
                    }
                    Target::Remote(endpoint) => {
                        // The caller's timeout counts from here, not from the
                        // next worker's receipt.
                        let asked = json_length(headers)
                            .and_then(|len| protocol::rest_timeout(&body, len))
                            .map_err(|e| Failure::Final(error_response(&e)))?;
                        let deadline =
                            asked.map_or(deadline, |t| sooner(deadline, Instant::now(), t));
                        self.forward(&endpoint, deployment, version, headers, body, deadline)
                            .await
                    }
                }
            }
        })
        .await
    }

    /// Forwards a request to a replica on another worker, through that worker's
    /// inference HTTP port.
    async fn forward(
        &self,
        endpoint: &RouteEndpoint,
        deployment: &str,
        version: Version,
        headers: &HeaderMap,
        body: Bytes,
        deadline: Instant,
    ) -> std::result::Result<Response, Failure<Response>> {
        let uri = format!(
            "{}://{}/v2/models/{deployment}{}/infer",
            self.scheme,
            endpoint.http_addr,
            version.path()
        );
        let remaining = deadline.saturating_duration_since(Instant::now());
        let mut request = hyper::Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(REPLICA_HEADER, endpoint.replica_id.to_string())
            .header(TIMEOUT_HEADER, remaining.as_micros().to_string());
        for name in [header::AUTHORIZATION.as_str(), JSON_LENGTH_HEADER] {
            if let Some(value) = headers.get(name) {
                request = request.header(name, value.clone());
            }
        }
        let request = request
            .body(Full::new(body))
            .map_err(|e| Failure::Retry(format!("build the forwarded request: {e}")))?;
        let answer = tokio::time::timeout(remaining, async {
            let response = self.client.request(request).await?;
            let (parts, body) = response.into_parts();
            let bytes = body.collect().await?.to_bytes();
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((parts, bytes))
        })
        .await;
        match answer {
            Err(_) => Err(Failure::Final(error_response(&Error::Timeout(format!(
                "replica {} on {} did not answer within the deadline",
                endpoint.replica_id, endpoint.http_addr
            ))))),
            Ok(Err(e)) => Err(Failure::Retry(format!(
                "replica {} on {}: {e}",
                endpoint.replica_id, endpoint.http_addr
            ))),
            Ok(Ok((parts, bytes))) => {
                if parts.headers.contains_key(MISSING_HEADER) {
                    return Err(Failure::Retry(format!(
                        "replica {} has left worker {}",
                        endpoint.replica_id, endpoint.worker_id
                    )));
                }
                let mut response = Response::new(Body::from(bytes));
                *response.status_mut() = parts.status;
                for name in [header::CONTENT_TYPE.as_str(), JSON_LENGTH_HEADER] {
                    if let Some(value) = parts.headers.get(name) {
                        response
                            .headers_mut()
                            .insert(header::HeaderName::from_static(name), value.clone());
                    }
                }
                Ok(response)
            }
        }
    }

    /// The versions of `route` that a request for `version` may reach (ascending,
    /// as text), and a ready replica of one of them on this worker when there is
    /// one: what both protocols' model metadata answers from. NotFound for a
    /// version that is not served, Unavailable while nothing is ready.
    pub fn served(
        &self,
        route: &Route,
        version: Version,
    ) -> Result<(Vec<String>, Option<Arc<LocalReplica>>)> {
        let mut versions: Vec<u64> = route
            .endpoints
            .iter()
            .map(|e| e.version)
            .filter(|v| version.admits(*v))
            .collect();
        versions.sort_unstable();
        versions.dedup();
        if versions.is_empty() {
            let deployment = &route.deployment;
            return Err(match version {
                Version::Exactly(v) => {
                    Error::NotFound(format!("version {v} of model {deployment} is not served"))
                }
                Version::Any => {
                    Error::Unavailable(format!("model {deployment} has no ready replica yet"))
                }
            });
        }
        let local = self
            .table
            .replicas(&route.deployment)
            .into_iter()
            .find(|r| version.admits(r.version));
        Ok((versions.iter().map(u64::to_string).collect(), local))
    }

    /// True while a replica of `deployment` that `version` admits is ready
    /// anywhere in the cluster; NotFound for a deployment that does not exist.
    pub fn is_ready(&self, deployment: &str, version: Version) -> Result<bool> {
        Ok(self
            .route(deployment)?
            .endpoints
            .iter()
            .any(|e| version.admits(e.version)))
    }

    /// Answers `GET /v2/models/{m}[/versions/{v}]` from a replica's signature.
    pub async fn metadata(
        &self,
        deployment: &str,
        version: Version,
        headers: &HeaderMap,
    ) -> Response {
        let result = async {
            let route = self
                .authorized_route(deployment, kiln_common::http::authorization(headers))
                .await?;
            let (names, local) = self.served(&route, version)?;
            match local {
                Some(replica) => Ok(axum::Json(protocol::model_metadata(
                    deployment,
                    &names,
                    "onnx",
                    replica.engine.signature(),
                ))
                .into_response()),
                None => {
                    let endpoint = self.choose(&route, version, None).ok_or_else(|| {
                        Error::Unavailable(format!("model {deployment} has no ready replica yet"))
                    })?;
                    self.forward_get(&endpoint, deployment, version, headers)
                        .await
                }
            }
        }
        .await;
        result.unwrap_or_else(|e| error_response(&e))
    }

    async fn forward_get(
        &self,
        endpoint: &RouteEndpoint,
        deployment: &str,
        version: Version,
        headers: &HeaderMap,
    ) -> Result<Response> {
        let uri = format!(
            "{}://{}/v2/models/{deployment}{}",
            self.scheme,
            endpoint.http_addr,
            version.path()
        );
        let mut request = hyper::Request::builder().method(Method::GET).uri(uri);
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, value.clone());
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| Error::Internal(format!("build a metadata request: {e}")))?;
        let (parts, bytes) = self
            .call_peer(request, METADATA_TIMEOUT, MAX_METADATA_BYTES)
            .await
            .map_err(|e| Error::Unavailable(format!("worker {}: {e}", endpoint.worker_id)))?;
        let mut out = Response::new(Body::from(bytes));
        *out.status_mut() = parts.status;
        out.headers_mut().insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        Ok(out)
    }

    /// Sends `request` to another worker and reads its answer (at most
    /// `max_bytes` of body) within `timeout`; the error says what failed.
    /// [`Router::call_peer`] for a JSON answer: anything but 200 is an error
    /// carrying the status and the body.
    async fn call_peer_json<T: serde::de::DeserializeOwned>(
        &self,
        request: hyper::Request<Full<Bytes>>,
        timeout: Duration,
        max_bytes: usize,
    ) -> std::result::Result<T, String> {
        let (parts, bytes) = self.call_peer(request, timeout, max_bytes).await?;
        if parts.status != StatusCode::OK {
            return Err(format!(
                "status {}: {}",
                parts.status,
                String::from_utf8_lossy(&bytes)
            ));
        }
        serde_json::from_slice(&bytes).map_err(|e| format!("parse the answer: {e}"))
    }

    async fn call_peer(
        &self,
        request: hyper::Request<Full<Bytes>>,
        timeout: Duration,
        max_bytes: usize,
    ) -> std::result::Result<(axum::http::response::Parts, Bytes), String> {
        let exchange = async {
            let response = self
                .client
                .request(request)
                .await
                .map_err(|e| e.to_string())?;
            let (parts, body) = response.into_parts();
            let bytes = Limited::new(body, max_bytes)
                .collect()
                .await
                .map_err(|e| format!("read the answer: {e}"))?
                .to_bytes();
            Ok((parts, bytes))
        };
        tokio::time::timeout(timeout, exchange)
            .await
            .map_err(|_| format!("did not answer within {timeout:?}"))?
    }

    /// Answers `POST /v2/models/{m}/feedback` (see `serving::feedback`): 200 with
    /// what was matched, unknown and rejected, or the error that kept the body
    /// from being read.
    pub async fn post_feedback(
        &self,
        deployment: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Response {
        match self.try_feedback(deployment, headers, body).await {
            Ok(answer) => axum::Json(answer).into_response(),
            Err(e) => error_response(&e),
        }
    }

    /// Labels what this worker remembers, then, unless the call was forwarded,
    /// asks each other worker that serves the deployment about what is still
    /// unknown, one after the other, so that no label is counted twice.
    async fn try_feedback(
        &self,
        deployment: &str,
        headers: &HeaderMap,
        body: &[u8],
    ) -> Result<FeedbackAnswer> {
        let route = self
            .authorized_route(deployment, kiln_common::http::authorization(headers))
            .await?;
        let items = feedback::parse_body(body)?;
        let (mut answer, mut unknown) = self.feedback.label(deployment, items);
        if headers.contains_key(FORWARDED_HEADER) {
            return Ok(answer);
        }
        let budget = Instant::now() + FORWARD_BUDGET;
        let mut asked: HashSet<&str> = HashSet::new();
        for endpoint in &route.endpoints {
            if unknown.is_empty() {
                break;
            }
            if endpoint.worker_id == self.worker_id || !asked.insert(endpoint.worker_id.as_str()) {
                continue;
            }
            let timeout = budget
                .saturating_duration_since(Instant::now())
                .min(FORWARD_TIMEOUT);
            if timeout.is_zero() {
                tracing::warn!(
                    deployment,
                    "feedback: no time left to ask the other workers"
                );
                break;
            }
            match self
                .forward_feedback(endpoint, deployment, headers, &unknown, timeout)
                .await
            {
                Ok(theirs) => {
                    unknown = feedback::still_unknown(unknown, &theirs);
                    answer.matched += theirs.matched;
                    answer.rejected.extend(theirs.rejected);
                }
                Err(reason) => {
                    tracing::warn!(deployment, worker = %endpoint.worker_id, %reason, "feedback not forwarded");
                }
            }
        }
        answer.unknown = unknown.into_iter().map(|item| item.id).collect();
        Ok(answer)
    }

    /// Asks another worker to label `items`, marked as forwarded.
    async fn forward_feedback(
        &self,
        endpoint: &RouteEndpoint,
        deployment: &str,
        headers: &HeaderMap,
        items: &[FeedbackItem],
        timeout: Duration,
    ) -> std::result::Result<FeedbackAnswer, String> {
        let body = serde_json::to_vec(&serde_json::json!({ "feedback": items }))
            .map_err(|e| format!("encode the items: {e}"))?;
        let uri = format!(
            "{}://{}/v2/models/{deployment}/feedback",
            self.scheme, endpoint.http_addr
        );
        let mut request = hyper::Request::builder()
            .method(Method::POST)
            .uri(uri)
            .header(FORWARDED_HEADER, "1")
            .header(header::CONTENT_TYPE, "application/json");
        if let Some(value) = headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, value.clone());
        }
        let request = request
            .body(Full::new(Bytes::from(body)))
            .map_err(|e| format!("build the request: {e}"))?;
        self.call_peer_json(request, timeout, MAX_FEEDBACK_BODY_BYTES)
            .await
    }

    /// Answers `GET /v2/models/{m}[/versions/{v}]/ready`: 200 while a replica of
    /// it is ready anywhere in the cluster.
    pub fn ready(&self, deployment: &str, version: Version) -> Response {
        let ready = self.is_ready(deployment, version);
        match ready {
            Ok(true) => (
                StatusCode::OK,
                axum::Json(serde_json::json!({"name": deployment, "ready": true})),
            )
                .into_response(),
            Ok(false) => (
                StatusCode::SERVICE_UNAVAILABLE,
                axum::Json(serde_json::json!({"name": deployment, "ready": false})),
            )
                .into_response(),
            Err(e) => error_response(&e),
        }
    }
}

impl Router {
    /// Notes that `replica` answered a request successfully now, for the
    /// statistics' `last_inference`.
    pub fn note_inference(&self, replica: &LocalReplica) {
        let mut last = self.last_inference.lock().expect("last-inference lock");
        if last.len() > MAX_TRACKED {
            let ready: HashSet<(String, u64)> = self
                .table
                .all()
                .iter()
                .map(|r| (r.deployment.clone(), r.id))
                .collect();
            last.retain(|key, _| ready.contains(key));
        }
        last.insert((replica.deployment.clone(), replica.id), now_ms());
    }

    /// Returns `response` after noting a successful one (see
    /// [`Router::note_inference`]).
    fn note_answer(&self, replica: &LocalReplica, response: Response) -> Response {
        if response.status() == StatusCode::OK {
            self.note_inference(replica);
        }
        response
    }

    /// The routes of the deployments the caller may see: every one without TLS
    /// or with a token that may call models; without a token, the public ones
    /// only (so that private names are not listed); a token that is given and
    /// fails is refused, saying why.
    pub async fn visible_routes(&self, authorization: Option<&str>) -> Result<Vec<Route>> {
        let routes = self.routes.borrow().clone();
        let Some(tokens) = &self.tokens else {
            return Ok(routes);
        };
        if authorization.is_none() {
            return Ok(routes.into_iter().filter(|r| r.public).collect());
        }
        tokens
            .verify_fresh(authorization, Permission::Infer, now_ms)
            .await?;
        Ok(routes)
    }

    /// Answers the repository index (`POST /v2/repository/index`, gRPC
    /// `RepositoryIndex`) from the routes the caller may see.
    pub async fn repository_index(
        &self,
        authorization: Option<&str>,
        ready_only: bool,
    ) -> Result<Vec<IndexEntry>> {
        let routes = self.visible_routes(authorization).await?;
        Ok(statistics::repository_index(&routes, ready_only))
    }

    /// The statistics of this worker's ready replicas of `deployments` that
    /// `version` admits, one entry per replica.
    fn local_statistics(&self, deployments: &HashSet<&str>, version: Version) -> Vec<ModelStats> {
        let last = self
            .last_inference
            .lock()
            .expect("last-inference lock")
            .clone();
        self.table
            .all()
            .iter()
            .filter(|r| deployments.contains(r.deployment.as_str()) && version.admits(r.version))
            .map(|r| {
                ModelStats::of_replica(
                    &r.deployment,
                    r.version,
                    &r.engine.stats(),
                    last.get(&(r.deployment.clone(), r.id))
                        .copied()
                        .unwrap_or(0),
                )
            })
            .collect()
    }

    /// Answers the statistics of `deployment` at `version` (every deployment
    /// the caller may see when `None`), summed over the replicas of the cluster:
    /// this worker's, and, unless `local_only` (another router asked), those of
    /// the other workers that serve them, asked at once within
    /// [`STATS_TIMEOUT`] each ([`MAX_STATS_PEERS`] at most). Workers that do
    /// not answer are named in the answer; every version that replicas serve is
    /// listed, with zero counts when none were had. The same authorization as
    /// model metadata: for one deployment, 401 unless it is public or the token
    /// may call models.
    pub async fn statistics(
        &self,
        deployment: Option<&str>,
        version: Version,
        authorization: Option<&str>,
        local_only: bool,
    ) -> Result<StatsAnswer> {
        let routes = match deployment {
            Some(name) => vec![self.authorized_route(name, authorization).await?],
            None => self.visible_routes(authorization).await?,
        };
        let names: HashSet<&str> = routes.iter().map(|r| r.deployment.as_str()).collect();
        let mut sum = StatsSum::default();
        let local = self.local_statistics(&names, version);
        if let (Some(name), Version::Exactly(v)) = (deployment, version) {
            let routed = routes
                .iter()
                .flat_map(|r| &r.endpoints)
                .any(|e| e.version == v);
            if !routed && local.is_empty() && !local_only {
                return Err(Error::NotFound(format!(
                    "version {v} of model {name} is not served"
                )));
            }
        }
        for stats in &local {
            sum.add(stats);
        }
        let mut unanswered = Vec::new();
        if !local_only {
            let mut peers = statistics::peers(&routes, &self.worker_id);
            for (worker, _) in peers.iter().skip(MAX_STATS_PEERS) {
                unanswered.push(Unanswered {
                    worker: worker.clone(),
                    error: format!("not asked: over {MAX_STATS_PEERS} workers"),
                });
            }
            peers.truncate(MAX_STATS_PEERS);
            let path = match deployment {
                Some(name) => format!("/v2/models/{name}{}/stats", version.path()),
                None => "/v2/models/stats".to_string(),
            };
            let asked = peers.iter().map(|(worker, addr)| {
                let path = &path;
                async move {
                    let answer = self.peer_statistics(addr, path, authorization).await;
                    (worker, answer)
                }
            });
            for (worker, answer) in futures_util::future::join_all(asked).await {
                match answer {
                    Ok(theirs) => {
                        for stats in theirs.model_stats.iter().filter(|s| {
                            names.contains(s.name.as_str())
                                && s.version.parse().is_ok_and(|v| version.admits(v))
                        }) {
                            sum.add(stats);
                        }
                    }
                    Err(error) => {
                        tracing::warn!(worker = %worker, %error, "statistics: a worker did not answer");
                        unanswered.push(Unanswered {
                            worker: worker.clone(),
                            error,
                        });
                    }
                }
            }
            for route in &routes {
                for endpoint in &route.endpoints {
                    if version.admits(endpoint.version) {
                        sum.ensure(&route.deployment, endpoint.version);
                    }
                }
            }
        }
        unanswered.sort_by(|a, b| a.worker.cmp(&b.worker));
        Ok(StatsAnswer {
            model_stats: sum.into_stats(),
            unanswered_workers: unanswered,
        })
    }

    /// Asks another worker for its own replicas' statistics at `path`.
    async fn peer_statistics(
        &self,
        http_addr: &str,
        path: &str,
        authorization: Option<&str>,
    ) -> std::result::Result<StatsAnswer, String> {
        let mut request = hyper::Request::builder()
            .method(Method::GET)
            .uri(format!("{}://{http_addr}{path}", self.scheme))
            .header(STATS_LOCAL_HEADER, "1");
        if let Some(value) = authorization {
            request = request.header(header::AUTHORIZATION, value);
        }
        let request = request
            .body(Full::new(Bytes::new()))
            .map_err(|e| format!("build the request: {e}"))?;
        self.call_peer_json(request, STATS_TIMEOUT, MAX_STATS_BYTES)
            .await
    }
}

/// The binary extension's JSON length header, when given.
fn json_length(headers: &HeaderMap) -> Result<Option<usize>> {
    let Some(value) = headers.get(JSON_LENGTH_HEADER) else {
        return Ok(None);
    };
    value
        .to_str()
        .ok()
        .and_then(|v| v.parse::<usize>().ok())
        .map(Some)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("the {JSON_LENGTH_HEADER} header is not a number"))
        })
}

/// A request's deadline: [`DEFAULT_DEADLINE`] from `now`, or sooner when another
/// router forwarded it with less time left ([`TIMEOUT_HEADER`]).
pub fn forwarded_deadline(headers: &HeaderMap, now: Instant) -> Result<Instant> {
    let default = now + DEFAULT_DEADLINE;
    let Some(value) = headers.get(TIMEOUT_HEADER) else {
        return Ok(default);
    };
    let us: u64 = value
        .to_str()
        .ok()
        .and_then(|v| v.parse().ok())
        .ok_or_else(|| Error::InvalidArgument(format!("bad {TIMEOUT_HEADER} header")))?;
    Ok(sooner(default, now, Duration::from_micros(us)))
}

/// `deadline`, or `now + wait` when that is sooner (a wait longer than
/// [`DEFAULT_DEADLINE`] never is, so no caller's number overflows the clock).
pub fn sooner(deadline: Instant, now: Instant, wait: Duration) -> Instant {
    deadline.min(now + wait.min(DEFAULT_DEADLINE))
}

/// Runs a request on a replica of this worker, remembers its answer for
/// feedback (under the caller's id or a new one) and encodes it.
pub async fn local_infer(
    replica: &LocalReplica,
    feedback: &Feedback,
    headers: &HeaderMap,
    body: Bytes,
    deadline: Instant,
) -> Response {
    let result = async {
        let json_len = json_length(headers)?;
        let mut request = protocol::parse_rest_request(&body, json_len)?;
        // The caller's `timeout` parameter, when it asks for less.
        let deadline = match protocol::timeout_parameter(&request.parameters)? {
            Some(timeout) => sooner(deadline, Instant::now(), timeout),
            None => deadline,
        };
        protocol::check_classification(&request.outputs, replica.engine.signature())?;
        let inputs = std::mem::take(&mut request.inputs);
        let wanted = (!request.outputs.is_empty())
            .then(|| request.outputs.iter().map(|o| o.name.clone()).collect());
        feedback.ensure_id(&mut request.id);
        let id = request.id.as_deref().unwrap_or_default();
        let outputs = feedback
            .infer(replica, id, inputs, wanted, deadline)
            .await?;
        let outputs = protocol::classify(outputs, &request.outputs)?;
        let encoded = protocol::encode_rest_response(
            &replica.deployment,
            &replica.version.to_string(),
            &request,
            &outputs,
        )?;
        let mut response = Response::new(Body::from(encoded.body));
        let headers = response.headers_mut();
        match encoded.json_len {
            Some(len) => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/octet-stream"),
                );
                headers.insert(JSON_LENGTH_HEADER, HeaderValue::from(len));
            }
            None => {
                headers.insert(
                    header::CONTENT_TYPE,
                    HeaderValue::from_static("application/json"),
                );
            }
        }
        Ok::<_, Error>(response)
    }
    .await;
    result.unwrap_or_else(|e| error_response(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_request_keeps_the_time_it_had_left() {
        let now = Instant::now();
        let mut headers = HeaderMap::new();
        assert_eq!(
            forwarded_deadline(&headers, now),
            Ok(now + DEFAULT_DEADLINE)
        );
        headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("2500"));
        assert_eq!(
            forwarded_deadline(&headers, now),
            Ok(now + Duration::from_micros(2500))
        );
        // Never more than the default, however large (no overflow).
        headers.insert(
            TIMEOUT_HEADER,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(
            forwarded_deadline(&headers, now),
            Ok(now + DEFAULT_DEADLINE)
        );
        headers.insert(TIMEOUT_HEADER, HeaderValue::from_static("soon"));
        assert!(matches!(
            forwarded_deadline(&headers, now),
            Err(Error::InvalidArgument(_))
        ));
    }

    fn endpoint(replica_id: u64, worker_id: &str) -> RouteEndpoint {
        RouteEndpoint {
            replica_id,
            worker_id: worker_id.into(),
            version: 1,
            ..RouteEndpoint::default()
        }
    }

    fn router() -> Router {
        let (_, routes) = watch::channel(Vec::new());
        Router::new("w0".into(), Arc::default(), routes, None).expect("router")
    }

    #[test]
    fn a_retry_goes_to_another_worker_when_there_is_one() {
        let router = router();
        let failed = endpoint(1, "dead");
        let route = Route {
            deployment: "d".into(),
            endpoints: vec![failed.clone(), endpoint(2, "dead"), endpoint(3, "alive")],
            ..Route::default()
        };
        for _ in 0..100 {
            let retry = router.choose(&route, Version::Any, Some(&failed));
            assert_eq!(
                retry.map(|e| e.replica_id),
                Some(3),
                "replica 2 shares the failed replica's worker"
            );
        }
        // With no other worker, another replica of the same one is still tried.
        let route = Route {
            endpoints: vec![failed.clone(), endpoint(2, "dead")],
            ..route
        };
        let retry = router.choose(&route, Version::Any, Some(&failed));
        assert_eq!(retry.map(|e| e.replica_id), Some(2));
    }
}
