//! Drift alert webhooks: the leader POSTs each alert that opens or resolves, as
//! JSON, to the `drift_webhook` of every deployment that served the version.
//!
//! Delivery is retried, not guaranteed: each POST is retried with doubling pauses
//! (0.5 s up to 8 s, [`ATTEMPTS`] tries over about 45 s, [`ATTEMPT_TIMEOUT`]
//! each) until the receiver answers 2xx, then given up with a warning; a 4xx
//! other than 408 and 429 is final. At most
//! [`MAX_IN_FLIGHT`] deliveries run at once; beyond that an alert's POST is
//! dropped with a warning (the alert itself is in the replicated state and in
//! `kiln drift status` either way). A delivery in progress when the leader
//! changes is lost: the new leader does not resend alerts it did not open.
//!
//! Receivers are plain `http://` URLs (a relay on the cluster's network, as
//! Alertmanager receivers usually are); `https://` is refused at deploy time with
//! that reason rather than sent in clear.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use kiln_common::{Error, Result};
use kiln_proto::v1::DriftAlert;
use serde_json::json;
use tokio::sync::Semaphore;

/// Tries per delivery.
pub const ATTEMPTS: u32 = 6;
/// Longest one POST may take.
pub const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);
/// Deliveries in progress at once.
pub const MAX_IN_FLIGHT: usize = 64;
/// Longest URL accepted.
const MAX_URL_BYTES: usize = 2048;

/// Checks a webhook URL given at deploy time; empty means none.
pub fn checked_url(url: &str) -> Result<String> {
    if url.is_empty() {
        return Ok(String::new());
    }
    let bad = |why: &str| Error::InvalidArgument(format!("drift webhook {url:?}: {why}"));
    if url.len() > MAX_URL_BYTES {
        return Err(bad("longer than 2048 bytes"));
    }
    if url.starts_with("https://") {
        return Err(bad(
            "https receivers are not supported yet; give an http:// receiver on the cluster's network",
        ));
    }
    let uri: hyper::Uri = url.parse().map_err(|e| bad(&format!("not a URL: {e}")))?;
    if uri.scheme_str() != Some("http") || uri.host().is_none() {
        return Err(bad("must be an http://HOST[:PORT]/PATH URL"));
    }
    Ok(url.to_string())
}

/// The JSON body of an alert's notification.
pub fn payload(alert: &DriftAlert, deployment: &str) -> serde_json::Value {
    json!({
        "status": if alert.resolved_at_ms == 0 { "firing" } else { "resolved" },
        "deployment": deployment,
        "alert": {
            "id": alert.id,
            "kind": alert.kind,
            "model": alert.model,
            "version": alert.version,
            "opened_at_ms": alert.opened_at_ms,
            "resolved_at_ms": (alert.resolved_at_ms != 0).then_some(alert.resolved_at_ms),
            "columns": alert.columns,
            "drifted_share": alert.drifted_share,
            "windows": alert.windows,
            "resolution": (!alert.resolution.is_empty()).then_some(alert.resolution.clone()),
        },
    })
}

/// Sends alerts to webhooks; cheap to clone.
#[derive(Clone)]
pub struct Notifier {
    client: Client<HttpConnector, Full<Bytes>>,
    slots: Arc<Semaphore>,
}

impl std::fmt::Debug for Notifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Notifier").finish_non_exhaustive()
    }
}

impl Default for Notifier {
    fn default() -> Self {
        let mut connector = HttpConnector::new();
        connector.set_connect_timeout(Some(Duration::from_secs(2)));
        Notifier {
            client: Client::builder(hyper_util::rt::TokioExecutor::new())
                .pool_idle_timeout(Duration::from_secs(30))
                .build(connector),
            slots: Arc::new(Semaphore::new(MAX_IN_FLIGHT)),
        }
    }
}

impl Notifier {
    /// Delivers `body` to `url` in the background (see the module docs).
    pub fn send(&self, url: String, body: serde_json::Value) {
        let Ok(slot) = Arc::clone(&self.slots).try_acquire_owned() else {
            tracing::warn!(%url, "too many webhook deliveries in progress; alert not sent");
            return;
        };
        let client = self.client.clone();
        tokio::spawn(async move {
            let _slot = slot;
            let body = Bytes::from(body.to_string());
            let mut pause = Duration::from_millis(500);
            for attempt in 1..=ATTEMPTS {
                match post(&client, &url, body.clone()).await {
                    Ok(()) => {
                        tracing::info!(%url, attempt, "drift alert delivered");
                        return;
                    }
                    Err((e, retry)) => {
                        tracing::warn!(%url, attempt, error = %e, "drift alert webhook failed");
                        if !retry {
                            return;
                        }
                    }
                }
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(8));
            }
        });
    }
}

/// One POST; the error says whether another try may help.
async fn post(
    client: &Client<HttpConnector, Full<Bytes>>,
    url: &str,
    body: Bytes,
) -> std::result::Result<(), (String, bool)> {
    let request = hyper::Request::post(url)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::USER_AGENT, "kiln-drift-webhook")
        .body(Full::new(body))
        .map_err(|e| (format!("build the request: {e}"), false))?;
    let response = tokio::time::timeout(ATTEMPT_TIMEOUT, client.request(request))
        .await
        .map_err(|_| (format!("no answer in {ATTEMPT_TIMEOUT:?}"), true))?
        .map_err(|e| (format!("{e}"), true))?;
    let status = response.status();
    if status.is_success() {
        return Ok(());
    }
    let retry = status.is_server_error()
        || status == hyper::StatusCode::REQUEST_TIMEOUT
        || status == hyper::StatusCode::TOO_MANY_REQUESTS;
    Err((format!("answered {status}"), retry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_http_urls_with_a_host_are_taken() {
        assert_eq!(checked_url("").expect("none"), "");
        assert_eq!(
            checked_url("http://10.0.0.7:9093/hooks/kiln").expect("http"),
            "http://10.0.0.7:9093/hooks/kiln"
        );
        for (url, why) in [
            ("https://hooks.example.com/x", "https receivers"),
            ("ftp://host/x", "http://HOST"),
            ("http:///nohost", "URL"),
            ("not a url", "URL"),
        ] {
            let err = checked_url(url).expect_err(url).to_string();
            assert!(err.contains(why), "{url}: {err}");
        }
    }

    #[test]
    fn the_payload_says_firing_or_resolved() {
        let mut alert = DriftAlert {
            id: 4,
            model: "iris".into(),
            version: 2,
            kind: "dataset_drift".into(),
            opened_at_ms: 1000,
            columns: vec!["f0".into()],
            ..DriftAlert::default()
        };
        let firing = payload(&alert, "iris-prod");
        assert_eq!(firing["status"], "firing");
        assert_eq!(firing["deployment"], "iris-prod");
        assert_eq!(firing["alert"]["columns"], json!(["f0"]));
        assert!(firing["alert"]["resolved_at_ms"].is_null());
        alert.resolved_at_ms = 5000;
        assert_eq!(payload(&alert, "iris-prod")["status"], "resolved");
    }
}
