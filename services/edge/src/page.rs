//! The players' page and the JavaScript client, embedded in the binary (no files to deploy,
//! no build step): `/`, `/rooms/{room}` and `/invite/{token}` answer the same page, which routes
//! in the browser; `/static/*` and `/js/voicerooms.js` are its assets.
//!
//! The page holds no secret: the session cookie is HttpOnly and authenticates the API and the
//! WebSocket by itself. Responses carry a strict Content-Security-Policy (scripts from this
//! origin only) and `Referrer-Policy: no-referrer`, so an invite token in the address never
//! leaks to another site (e.g. the avatar CDN).

use actix_web::{web, HttpResponse};

const INDEX_HTML: &str = include_str!("../static/index.html");
const APP_JS: &str = include_str!("../static/app.js");
const STYLE_CSS: &str = include_str!("../static/style.css");
const CLIENT_JS: &str = include_str!("../static/js/voicerooms.js");

/// Scripts, styles and connections from this origin only; avatars also from Discord's CDN.
const CSP: &str = "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; \
    img-src 'self' https://cdn.discordapp.com data:; connect-src 'self'; frame-ancestors 'none'; \
    base-uri 'none'; form-action 'self'";

/// Registers the page routes.
pub fn routes(cfg: &mut web::ServiceConfig) {
    cfg.route("/", web::get().to(index))
        .route("/rooms/{room}", web::get().to(index))
        .route("/invite/{token}", web::get().to(index))
        .route("/static/app.js", web::get().to(app_js))
        .route("/static/style.css", web::get().to(style_css))
        .route("/js/voicerooms.js", web::get().to(client_js));
}

fn asset(content_type: &str, body: &'static str) -> HttpResponse {
    HttpResponse::Ok()
        .content_type(content_type)
        // Embedded assets change with the binary: revalidate instead of caching stale code.
        .insert_header(("Cache-Control", "no-cache"))
        .insert_header(("X-Content-Type-Options", "nosniff"))
        .insert_header(("Referrer-Policy", "no-referrer"))
        .body(body)
}

async fn index() -> HttpResponse {
    let mut res = asset("text/html; charset=utf-8", INDEX_HTML);
    let headers = res.headers_mut();
    headers.insert(
        actix_web::http::header::CONTENT_SECURITY_POLICY,
        actix_web::http::header::HeaderValue::from_static(CSP),
    );
    headers.insert(
        actix_web::http::header::X_FRAME_OPTIONS,
        actix_web::http::header::HeaderValue::from_static("DENY"),
    );
    res
}

async fn app_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", APP_JS)
}

async fn style_css() -> HttpResponse {
    asset("text/css; charset=utf-8", STYLE_CSS)
}

async fn client_js() -> HttpResponse {
    asset("text/javascript; charset=utf-8", CLIENT_JS)
}
