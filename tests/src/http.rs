//! [`http_get`] and [`http_request`]: one HTTP/1.1 request over a fresh loopback
//! connection, with a bearer token and a JSON body when given; enough to drive
//! kiln's HTTP endpoints without an HTTP client.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Longest time one request may take.
const HTTP_TIMEOUT: Duration = Duration::from_secs(10);

/// Sends `GET path` to `addr` (`host:port`); returns the status code and the body.
pub async fn http_get(addr: &str, path: &str, token: Option<&str>) -> (u16, String) {
    http_request(addr, "GET", path, token, None).await
}

/// Sends `method path` with an optional JSON body and bearer token; returns the
/// status code and the body.
pub async fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<&str>,
) -> (u16, String) {
    let exchange = async {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let auth = token.map_or_else(String::new, |t| format!("Authorization: Bearer {t}\r\n"));
        let content = body.map_or_else(String::new, |b| {
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                b.len()
            )
        });
        let request = format!(
            "{method} {path} HTTP/1.1\r\nHost: {addr}\r\n{auth}{content}Connection: close\r\n\r\n{}",
            body.unwrap_or_default()
        );
        stream.write_all(request.as_bytes()).await.expect("send");
        let mut response = String::new();
        stream.read_to_string(&mut response).await.expect("read");
        response
    };
    let response = tokio::time::timeout(HTTP_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| panic!("{method} {addr}{path} took over {HTTP_TIMEOUT:?}"));
    let status = response
        .split(' ')
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {response:?}"));
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, body)| body.to_string())
        .unwrap_or_default();
    (status, body)
}
