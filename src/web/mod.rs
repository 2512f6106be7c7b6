//! `web`: the web console, a single page served by `revive serve` on the
//! API port. It is a frontend like any API client: a small vanilla-JS page
//! (ES modules, hand-written CSS, no build step, no CDN) embedded in the
//! binary, that fetches everything through `/api/v1/...` with the API token
//! the operator types in. This module knows nothing of the layers below:
//! it serves bytes and security headers.
//!
//! # Security
//! - The page and its assets hold no data and are served without a token.
//!   The token lives in the tab's `sessionStorage` and travels only in the
//!   `Authorization` header of `fetch` calls: never in a URL or a cookie,
//!   so there is no cross-site request to forge.
//! - Every string from the API is put in the page as text (`textContent`,
//!   text nodes); the scripts never parse markup (a test checks for the
//!   usual sinks). [`CONTENT_SECURITY_POLICY`] forbids inline script and
//!   style, `eval`, other origins, framing and form submission, so even a
//!   slip would not run injected script.

use axum::extract::Request;
use axum::http::{header, HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

/// The console's files: URL path, content type, bytes.
const ASSETS: &[(&str, &str, &str)] = &[
    (
        "/",
        "text/html; charset=utf-8",
        include_str!("assets/index.html"),
    ),
    (
        "/console.css",
        "text/css; charset=utf-8",
        include_str!("assets/console.css"),
    ),
    (
        "/favicon.svg",
        "image/svg+xml",
        include_str!("assets/favicon.svg"),
    ),
    (
        "/js/app.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/app.js"),
    ),
    (
        "/js/api.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/api.js"),
    ),
    (
        "/js/dom.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/dom.js"),
    ),
    (
        "/js/overview.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/overview.js"),
    ),
    (
        "/js/recover.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/recover.js"),
    ),
    (
        "/js/sessions.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/sessions.js"),
    ),
    (
        "/js/metrics.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/metrics.js"),
    ),
    (
        "/js/chart.js",
        "text/javascript; charset=utf-8",
        include_str!("assets/js/chart.js"),
    ),
];

/// What the page may load and do: its own scripts, styles and API, nothing
/// inline, no `eval`, no other origin, no frames, no form submission (the
/// login form is handled by script, so the token never lands in a URL).
pub const CONTENT_SECURITY_POLICY: &str = "default-src 'none'; script-src 'self'; \
     style-src 'self'; img-src 'self'; connect-src 'self'; base-uri 'none'; \
     form-action 'none'; frame-ancestors 'none'";

/// The console's routes: public, stateless.
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    let mut router = Router::new();
    for (path, content_type, body) in ASSETS {
        router = router.route(
            path,
            get(move || async move {
                (
                    [
                        (header::CONTENT_TYPE, *content_type),
                        // Revalidate every time: a new binary serves new
                        // scripts, and they are a few KiB.
                        (header::CACHE_CONTROL, "no-cache"),
                    ],
                    *body,
                )
                    .into_response()
            }),
        );
    }
    router
}

/// Adds the security headers to every answer of the API port (the console's
/// files and the API's JSON alike), unless the handler set them.
pub async fn security_headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let headers = response.headers_mut();
    for (name, value) in [
        (header::CONTENT_SECURITY_POLICY, CONTENT_SECURITY_POLICY),
        (header::X_CONTENT_TYPE_OPTIONS, "nosniff"),
        (header::X_FRAME_OPTIONS, "DENY"),
        (header::REFERRER_POLICY, "no-referrer"),
        (
            HeaderName::from_static("cross-origin-opener-policy"),
            "same-origin",
        ),
        (header::CACHE_CONTROL, "no-store"),
    ] {
        headers
            .entry(name)
            .or_insert(HeaderValue::from_static(value));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The scripts never turn strings into markup or code: every API string
    /// reaches the page as text. (The CSP would block injected script too;
    /// this keeps the first line of defence.)
    #[test]
    fn scripts_use_no_markup_or_code_sinks() {
        for (path, _, body) in ASSETS.iter().filter(|(p, _, _)| p.ends_with(".js")) {
            for sink in [
                "innerHTML",
                "outerHTML",
                "insertAdjacentHTML",
                "document.write",
                "eval(",
                "new Function",
                "setAttribute('style'",
                "setAttribute(\"style\"",
                "javascript:",
            ] {
                assert!(!body.contains(sink), "{path} uses {sink}");
            }
        }
    }

    /// Every module the page imports is served.
    #[test]
    fn every_imported_module_is_served() {
        for (path, _, body) in ASSETS {
            for line in body
                .lines()
                .filter(|l| l.trim_start().starts_with("import "))
            {
                let Some(from) = line.split('\'').nth(1) else {
                    continue;
                };
                let target = format!("/js/{}", from.trim_start_matches("./"));
                assert!(
                    ASSETS.iter().any(|(p, _, _)| *p == target),
                    "{path} imports {from}, which is not served"
                );
            }
        }
        let index = ASSETS[0].2;
        for link in ["/console.css", "/js/app.js", "/favicon.svg"] {
            assert!(index.contains(link), "index.html does not load {link}");
        }
        assert!(
            !index.contains("<script>") && !index.contains(" style="),
            "index.html must hold no inline script or style"
        );
    }
}
