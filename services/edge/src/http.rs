//! HTTP plumbing shared by the login flow and the room API: typed JSON errors, the cross-site
//! request check, and return-path validation.

use actix_web::http::StatusCode;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde::Serialize;
use voicerooms_contract::{ApiError, ErrorCode};

/// An error answered as `{"error":{"code","message","login_url"?}}` with the code's status.
#[derive(Debug)]
pub struct HttpError {
    pub error: ApiError,
    /// For 401s: where to log in, with the return path.
    pub login_url: Option<String>,
    /// Protocol-level code that is not a room-manager code (e.g. `csrf`).
    pub code_override: Option<&'static str>,
    pub status_override: Option<StatusCode>,
}

impl HttpError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            error: ApiError::new(code, message),
            login_url: None,
            code_override: None,
            status_override: None,
        }
    }

    pub fn unauthorized(login_url: String) -> Self {
        Self {
            error: ApiError::new(ErrorCode::Unauthorized, "log in with Discord"),
            login_url: Some(login_url),
            code_override: None,
            status_override: None,
        }
    }

    /// A 401 that does not say where to log in gets `login_url` (every 401 does, docs/HTTP_API.md).
    pub fn with_login_url(mut self, login_url: impl FnOnce() -> String) -> Self {
        if self.error.code == ErrorCode::Unauthorized
            && self.status_override.is_none()
            && self.login_url.is_none()
        {
            self.login_url = Some(login_url());
        }
        self
    }

    pub fn forbidden(code: &'static str, message: &str) -> Self {
        Self {
            error: ApiError::new(ErrorCode::Validation, message),
            login_url: None,
            code_override: Some(code),
            status_override: Some(StatusCode::FORBIDDEN),
        }
    }
}

impl From<ApiError> for HttpError {
    fn from(error: ApiError) -> Self {
        Self {
            error,
            login_url: None,
            code_override: None,
            status_override: None,
        }
    }
}

impl std::fmt::Display for HttpError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.error)
    }
}

#[derive(Serialize)]
struct Body<'a> {
    error: Inner<'a>,
}

#[derive(Serialize)]
struct Inner<'a> {
    code: &'a str,
    message: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    login_url: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    retry_after_ms: Option<u64>,
}

impl ResponseError for HttpError {
    fn status_code(&self) -> StatusCode {
        self.status_override.unwrap_or_else(|| {
            StatusCode::from_u16(self.error.code.http_status())
                .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        })
    }

    fn error_response(&self) -> HttpResponse {
        HttpResponse::build(self.status_code()).json(Body {
            error: Inner {
                code: self.code_override.unwrap_or(self.error.code.as_str()),
                message: &self.error.message,
                login_url: self.login_url.as_deref(),
                retry_after_ms: self.error.retry_after_ms,
            },
        })
    }
}

/// Refuses state-changing requests from other sites: the `Origin` (or, without one,
/// `Sec-Fetch-Site`) must name one of ours. The session cookie is also `SameSite=Lax`.
pub fn check_origin(req: &HttpRequest, allowed: &[String]) -> Result<(), HttpError> {
    let headers = req.headers();
    if let Some(origin) = headers.get("origin") {
        // An Origin that is not visible ASCII (no browser sends one) is refused like a foreign
        // one, never treated as missing (which would let `Sec-Fetch-Site` decide).
        if let Ok(origin) = origin.to_str() {
            if allowed.iter().any(|a| a == origin) || same_host(req, origin) {
                return Ok(());
            }
        }
        return Err(HttpError::forbidden("csrf", "cross-site request refused"));
    }
    match headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        Some("same-origin") | Some("none") => Ok(()),
        _ => Err(HttpError::forbidden(
            "csrf",
            "state-changing requests need an Origin header from this site",
        )),
    }
}

fn same_host(req: &HttpRequest, origin: &str) -> bool {
    let info = req.connection_info();
    let host = info.host();
    origin
        .strip_prefix("http://")
        .or_else(|| origin.strip_prefix("https://"))
        .is_some_and(|rest| rest == host)
}

/// A safe local return path: starts with one `/`, no scheme or host, no control characters.
pub fn safe_return_path(path: Option<&str>) -> String {
    match path {
        Some(p)
            if p.starts_with('/')
                && !p.starts_with("//")
                && !p.starts_with("/\\")
                && p.len() <= 512
                && !p.chars().any(|c| c.is_control() || c == '\\') =>
        {
            p.to_owned()
        }
        _ => "/".to_owned(),
    }
}

/// `/auth/login?return_to=<path>`.
pub fn login_url(return_to: &str) -> String {
    format!(
        "/auth/login?return_to={}",
        urlencoding::encode(&safe_return_path(Some(return_to)))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_are_returned_to() {
        assert_eq!(safe_return_path(Some("/rooms/1?x=2")), "/rooms/1?x=2");
        for hostile in [
            "https://evil.example/",
            "//evil.example/",
            "/\\evil.example",
            "javascript:alert(1)",
            "",
            "/a\nb",
        ] {
            assert_eq!(safe_return_path(Some(hostile)), "/", "{hostile:?}");
        }
        assert_eq!(safe_return_path(None), "/");
        assert_eq!(login_url("/rooms/1"), "/auth/login?return_to=%2Frooms%2F1");
    }

    mod properties {
        use super::super::*;
        use actix_web::test::TestRequest;
        use proptest::prelude::*;

        fn any_text() -> impl Strategy<Value = String> {
            proptest::collection::vec(
                prop_oneof![
                    proptest::char::range(' ', '~'),
                    Just('/'),
                    Just('\\'),
                    Just('é'),
                    Just('\u{1D4D0}'),
                    Just('\n'),
                    any::<char>()
                ],
                0..600,
            )
            .prop_map(|c| c.into_iter().collect())
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(256))]

            #[test]
            fn return_paths_are_always_local(path in any_text()) {
                let safe = safe_return_path(Some(&path));
                prop_assert!(safe.starts_with('/'));
                prop_assert!(!safe.starts_with("//") && !safe.starts_with("/\\"));
                prop_assert!(!safe.chars().any(|c| c.is_control() || c == '\\'));
                prop_assert!(safe.len() <= 512);
                prop_assert!(safe == path || safe == "/");
                let url = login_url(&path);
                prop_assert!(url.starts_with("/auth/login?return_to=%2F"));
                prop_assert!(url.bytes().all(|b| b.is_ascii_graphic()), "{}", url);
            }

            #[test]
            fn only_our_origins_pass(
                origin in prop_oneof![
                    any_text(),
                    Just("null".to_owned()),
                    Just("http://edge.example:8080".to_owned()),
                    Just("https://edge.example:8080".to_owned()),
                    Just("https://rooms.example.com".to_owned()),
                    Just("http://edge.example:8081".to_owned()),
                    Just("http://edge.example:8080.evil".to_owned()),
                ],
                fetch_site in proptest::option::of(prop_oneof![
                    Just("same-origin"), Just("same-site"), Just("cross-site"), Just("none")
                ]),
                send_origin in any::<bool>(),
            ) {
                let allowed = vec!["https://rooms.example.com".to_owned()];
                let mut req = TestRequest::default().insert_header(("host", "edge.example:8080"));
                let header_ok = actix_web::http::header::HeaderValue::from_str(&origin).is_ok();
                if send_origin && header_ok {
                    req = req.insert_header(("origin", origin.as_str()));
                }
                if let Some(site) = fetch_site {
                    req = req.insert_header(("sec-fetch-site", site));
                }
                let verdict = check_origin(&req.to_http_request(), &allowed).is_ok();
                let expected = if send_origin && header_ok {
                    origin == "http://edge.example:8080"
                        || origin == "https://edge.example:8080"
                        || origin == "https://rooms.example.com"
                } else {
                    matches!(fetch_site, Some("same-origin") | Some("none"))
                };
                prop_assert_eq!(verdict, expected, "origin {:?} site {:?}", origin, fetch_site);
            }
        }
    }
}
