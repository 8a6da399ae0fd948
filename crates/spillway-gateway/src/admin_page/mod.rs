//! The live page: `GET /admin/`, a page in the binary that shows the
//! admin API's overview as it moves — budgets as bars, cooldowns, learned
//! limits, queues, shares and batches — for an operator, or a newcomer
//! watching `spillway demo --load` spill over.
//!
//! Why it is built this way:
//!
//! - **In the binary, no build step.** The HTML, CSS and JavaScript are
//!   plain files beside this one, embedded with `include_str!`; no
//!   framework, no bundler, nothing fetched from a CDN. The page works
//!   wherever the gateway runs (air-gapped, from a container `FROM
//!   scratch`), and what it runs is what is in the repository.
//! - **Public page, private data.** The page and its assets hold no data,
//!   so they are served without the admin key; every number comes from
//!   `/admin/overview` and `/admin/events` (`overview`), behind
//!   `admin::require_admin` like the rest of the admin API. The key is
//!   typed into the page's form and kept in the tab's `sessionStorage`
//!   only, sent as `Authorization: Bearer` (never a cookie, so no request
//!   another site makes carries it; never in a URL, so no log has it).
//! - **A strict Content-Security-Policy** on the page and every asset
//!   ([`CSP`]): scripts, styles and connections from this origin only, no
//!   inline script or style (so the page has none: styles are classes, and
//!   sizes are set through the CSSOM, which CSP allows), no framing, no
//!   `<base>`. A key typed into the page can then only go where the
//!   page's own script sends it: here. Also `nosniff`, `no-referrer` and
//!   `no-store` (nothing of an admin session left in a cache).

use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http::{header, HeaderValue, StatusCode};

/// The page's policy: everything from this origin, nothing inline, no
/// framing. (`img-src data:` allows small generated images; the page's
/// only image is its icon, from this origin.)
pub const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'";

/// Where the page lives.
pub const PATH: &str = "/admin/";

/// One embedded file.
struct Asset {
    content_type: &'static str,
    body: &'static [u8],
}

const INDEX: Asset = Asset {
    content_type: "text/html; charset=utf-8",
    body: include_bytes!("index.html"),
};
const SCRIPT: Asset = Asset {
    content_type: "text/javascript; charset=utf-8",
    body: include_bytes!("page.js"),
};
const STYLE: Asset = Asset {
    content_type: "text/css; charset=utf-8",
    body: include_bytes!("page.css"),
};
const ICON: Asset = Asset {
    content_type: "image/svg+xml",
    body: include_bytes!("icon.svg"),
};

/// The headers every answer of the page carries.
fn secured(mut response: Response) -> Response {
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(CSP),
    );
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("no-referrer"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    // For browsers older than frame-ancestors.
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        "cross-origin-opener-policy",
        HeaderValue::from_static("same-origin"),
    );
    h.insert(
        "cross-origin-resource-policy",
        HeaderValue::from_static("same-origin"),
    );
    response
}

fn serve(asset: &'static Asset) -> Response {
    secured(
        (
            [(
                header::CONTENT_TYPE,
                HeaderValue::from_static(asset.content_type),
            )],
            asset.body,
        )
            .into_response(),
    )
}

/// `/admin` is the page too: sent on to `/admin/`, where its relative
/// asset paths resolve.
fn to_page() -> Response {
    secured(
        (
            StatusCode::PERMANENT_REDIRECT,
            [(header::LOCATION, HeaderValue::from_static(PATH))],
        )
            .into_response(),
    )
}

/// The page's routes, public (no admin key: they hold no data).
pub fn routes<S: Clone + Send + Sync + 'static>() -> Router<S> {
    Router::new()
        .route("/admin", get(|| async { to_page() }))
        .route(PATH, get(|| async { serve(&INDEX) }))
        .route("/admin/assets/page.js", get(|| async { serve(&SCRIPT) }))
        .route("/admin/assets/page.css", get(|| async { serve(&STYLE) }))
        .route("/admin/assets/icon.svg", get(|| async { serve(&ICON) }))
}
