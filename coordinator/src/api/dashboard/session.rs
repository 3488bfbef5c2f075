//! Who may see the dashboard. With TLS (a secure cluster) every page needs a
//! token with the viewer role or more, kept in a Secure, HttpOnly cookie that
//! `/ui/login` sets after checking the token the same way as a bearer header
//! (`auth::authorize_bearer`, then `Api::admit`); without TLS the pages are open,
//! like the other HTTP endpoints.
//!
//! ```text
//!  browser ── GET /ui/jobs (no cookie) ──► 401 login form (next=/ui/jobs)
//!          ── POST /ui/login token, next ─► check ─► 303 next + Set-Cookie
//!             or GET /ui/login?token=..&next=..    └► 401/403 form with the error
//!          ── GET /ui/jobs (cookie) ─────► check ─► the page
//! ```
//!
//! A token is never written into a page, a log line or an audit record: checks
//! name the path without its query.

use std::fmt::Write as _;

use axum::extract::{Form, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use kiln_common::clock::now_ms;
use kiln_common::http::status_of;
use kiln_common::{Error, Result};

use super::html::{esc, page};
use super::respond;
use crate::api::grpc::Api;
use crate::auth::{self, Caller, Permission};

/// The cookie that holds the token.
pub const COOKIE: &str = "kiln_token";
/// How long a browser keeps the cookie.
pub const COOKIE_MAX_AGE_S: u64 = 12 * 3600;
/// Longest `next` path accepted.
const MAX_NEXT_BYTES: usize = 2048;
/// Where a login goes when it names nowhere (or somewhere not on the dashboard).
const HOME: &str = "/ui";

/// The token of the request's `kiln_token` cookie, if any.
fn cookie_token(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .find_map(|pair| pair.trim().strip_prefix(COOKIE)?.strip_prefix('='))
        .filter(|t| !t.is_empty())
}

/// Checks `token` for the viewer role; `path` (no query) is what a refusal names.
fn check(api: &Api, token: Option<&str>, path: &str) -> Result<Caller> {
    let header = token.map(|t| format!("Bearer {t}"));
    let caller = auth::authorize_bearer(header.as_deref(), &api.reader, Permission::Read, now_ms());
    api.admit(caller, header.as_deref(), Permission::Read, path)
}

/// Lets a page request through when its cookie holds a token that may read;
/// otherwise answers the login form (401, or 403 for a role that may not read).
pub async fn require_viewer(State(api): State<Api>, request: Request, next: Next) -> Response {
    if !api.tls_enabled {
        return next.run(request).await;
    }
    let path = request.uri().path().to_string();
    let token = cookie_token(request.headers());
    match check(&api, token, &path) {
        Ok(_) => next.run(request).await,
        Err(e) => {
            let back = without_token(&path, request.uri().query());
            let message = token.map(|_| e.to_string());
            let mut response = login_page(status_of(&e), message.as_deref(), &back);
            if token.is_some() {
                // A cookie that no longer works is dropped.
                response
                    .headers_mut()
                    .insert(header::SET_COOKIE, clear_cookie());
            }
            response
        }
    }
}

/// `path?query` with every `token` parameter left out.
fn without_token(path: &str, query: Option<&str>) -> String {
    let kept: Vec<&str> = query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty() && *p != "token" && !p.starts_with("token="))
        .collect();
    if kept.is_empty() {
        path.to_string()
    } else {
        format!("{path}?{}", kept.join("&"))
    }
}

/// `next` when it is a dashboard path of this server, else the overview.
fn local_next(next: Option<&str>) -> String {
    let ok = |n: &str| {
        (n == HOME || n.starts_with("/ui/") || n.starts_with("/ui?"))
            && !n.starts_with("/ui/login")
            && n.len() <= MAX_NEXT_BYTES
            && n.bytes().all(|b| b.is_ascii_graphic() && b != b'\\')
    };
    match next {
        Some(n) if ok(n) => n.to_string(),
        _ => HOME.to_string(),
    }
}

/// The first value of `key` in decoded form or query pairs.
fn value<'a>(pairs: &'a [(String, String)], key: &str) -> Option<&'a str> {
    pairs
        .iter()
        .find(|(k, _)| k == key)
        .map(|(_, v)| v.as_str())
}

/// `GET /ui/login`: the form, or with `?token=...&next=...` a login (the link
/// `kiln demo` prints).
pub async fn login_get(
    State(api): State<Api>,
    Query(pairs): Query<Vec<(String, String)>>,
) -> Response {
    let next = local_next(value(&pairs, "next"));
    match value(&pairs, "token") {
        Some(token) => login(&api, token, &next),
        None if api.tls_enabled => login_page(StatusCode::OK, None, &next),
        None => see_other(&next),
    }
}

/// `POST /ui/login` with the urlencoded fields `token` and `next`.
pub async fn login_post(
    State(api): State<Api>,
    form: Option<Form<Vec<(String, String)>>>,
) -> Response {
    let pairs = form.map(|Form(p)| p).unwrap_or_default();
    let next = local_next(value(&pairs, "next"));
    login(&api, value(&pairs, "token").unwrap_or(""), &next)
}

/// `GET /ui/logout`: forgets the cookie.
pub async fn logout() -> Response {
    let mut response = see_other("/ui/login");
    response
        .headers_mut()
        .insert(header::SET_COOKIE, clear_cookie());
    response
}

/// Checks `token`; on success sets the cookie and sends the browser to `next`.
fn login(api: &Api, token: &str, next: &str) -> Response {
    if !api.tls_enabled {
        return see_other(next);
    }
    let token = token.trim();
    // Tokens are `kt.NAME.HEX`: nothing else may reach a header.
    let cookie_safe = token
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    let checked = if token.is_empty() {
        Err(Error::Unauthenticated("enter a token".into()))
    } else if !cookie_safe {
        Err(Error::Unauthenticated("malformed token".into()))
    } else {
        check(api, Some(token), "/ui/login")
    };
    match checked {
        Ok(_) => {
            let cookie = format!(
                "{COOKIE}={token}; Secure; HttpOnly; SameSite=Strict; Path=/ui; Max-Age={COOKIE_MAX_AGE_S}"
            );
            let mut response = see_other(next);
            match HeaderValue::from_str(&cookie) {
                Ok(value) => {
                    response.headers_mut().insert(header::SET_COOKIE, value);
                    response
                }
                Err(_) => login_page(StatusCode::UNAUTHORIZED, Some("malformed token"), next),
            }
        }
        Err(e) => login_page(status_of(&e), Some(&e.to_string()), next),
    }
}

/// A cookie that replaces the token with nothing and expires at once.
fn clear_cookie() -> HeaderValue {
    HeaderValue::from_static("kiln_token=; Secure; HttpOnly; SameSite=Strict; Path=/ui; Max-Age=0")
}

/// 303 See Other to a local path (checked by [`local_next`]).
fn see_other(to: &str) -> Response {
    let location = HeaderValue::from_str(to).unwrap_or(HeaderValue::from_static(HOME));
    (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
}

/// The login form, with `error` above it when a token was refused.
fn login_page(status: StatusCode, error: Option<&str>, next: &str) -> Response {
    let html = page("Sign in", "/ui/login", &login_body(error, next), "");
    let mut response = respond(status, html);
    if status == StatusCode::UNAUTHORIZED {
        response
            .headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
    }
    response
}

/// The login page's body: the error, if any, and the form that posts a token.
fn login_body(error: Option<&str>, next: &str) -> String {
    let mut body = String::new();
    if let Some(error) = error {
        let _ = write!(body, "<p class=\"bad\" id=\"error\">{}</p>", esc(error));
    }
    let _ = write!(
        body,
        "<p>This cluster needs a token with the viewer role or more. Make one with \
         <code>kiln token create --name NAME --role viewer</code>.</p>\
         <form class=\"login\" method=\"post\" action=\"/ui/login\">\
         <label>Token <input type=\"password\" name=\"token\" autocomplete=\"off\" required></label> \
         <input type=\"hidden\" name=\"next\" value=\"{}\">\
         <button type=\"submit\">Sign in</button></form>",
        esc(next)
    );
    body
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut headers = HeaderMap::new();
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_tokenx=2"),
        );
        assert_eq!(cookie_token(&headers), None);
        headers.append(
            header::COOKIE,
            HeaderValue::from_static("b=2; kiln_token=kt.me.abc ; c=3"),
        );
        assert_eq!(cookie_token(&headers), Some("kt.me.abc"));
        let mut empty = HeaderMap::new();
        empty.append(header::COOKIE, HeaderValue::from_static("kiln_token="));
        assert_eq!(cookie_token(&empty), None);
    }

    #[test]
    fn a_login_goes_only_to_dashboard_paths() {
        assert_eq!(local_next(Some("/ui/jobs/3")), "/ui/jobs/3");
        assert_eq!(local_next(Some("/ui?x=1")), "/ui?x=1");
        assert_eq!(
            local_next(Some("/ui/runs/compare?ids=a,b")),
            "/ui/runs/compare?ids=a,b"
        );
        for bad in [
            "https://evil.example/ui",
            "//evil.example/ui",
            "/uix",
            "/api/v1/status",
            "/ui/\\evil",
            "/ui/a b",
            "/ui/login?token=x",
        ] {
            assert_eq!(local_next(Some(bad)), "/ui", "{bad}");
        }
        assert_eq!(local_next(None), "/ui");
    }

    #[test]
    fn a_token_in_the_query_is_not_carried_to_next() {
        assert_eq!(without_token("/ui/jobs", None), "/ui/jobs");
        assert_eq!(
            without_token("/ui/runs/compare", Some("ids=a&token=kt.x.y&metric=m")),
            "/ui/runs/compare?ids=a&metric=m"
        );
        assert_eq!(without_token("/ui", Some("token=kt.x.y")), "/ui");
    }

    #[test]
    fn the_login_page_escapes_what_it_shows() {
        let body = login_body(Some("<bad>"), "/ui/x?a=\"1\"");
        assert!(body.contains("<p class=\"bad\" id=\"error\">&lt;bad&gt;</p>"));
        assert!(body.contains("value=\"/ui/x?a=&quot;1&quot;\""));
        assert!(body.contains("<form class=\"login\" method=\"post\" action=\"/ui/login\">"));
        let response = login_page(StatusCode::UNAUTHORIZED, None, "/ui");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
        assert_eq!(
            response.headers().get(header::WWW_AUTHENTICATE),
            Some(&HeaderValue::from_static("Bearer"))
        );
    }
}
