//! Every error a client can get from Spillway, and its HTTP form.
//!
//! This is the only place errors become HTTP: handlers and the upstream
//! client return [`ApiError`], and [`IntoResponse`] renders it in Anthropic's
//! shape, `{"type":"error","error":{"type":..,"message":..}}`, with the
//! status the official SDKs map to the right exception. Errors the client
//! cannot fix by retrying carry `x-should-retry: false`, which the SDKs obey.
//!
//! Messages never include upstream credentials: upstream failures are
//! described by what failed, and the details go to the log.

use axum::response::{IntoResponse, Response};
use http::{HeaderValue, StatusCode};
use spillway_vertex::{ErrorKind, RequestError, UpstreamError};

use crate::answer::ForwardError;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    InvalidRequest(#[from] RequestError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthenticated(std::borrow::Cow<'static, str>),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("request body is larger than the {limit}-byte limit")]
    TooLarge { limit: usize },
    #[error("content-type must be application/json, not {0:?}")]
    UnsupportedMediaType(String),
    #[error("method not allowed: use POST")]
    MethodNotAllowed,
    #[error("request target is longer than the {limit}-byte limit")]
    UriTooLong { limit: usize },
    #[error("request headers too large: {0}")]
    HeadersTooLarge(String),
    /// The client was too slow sending its request (Spillway's limit).
    #[error("{0}")]
    RequestTimeout(String),
    /// Spillway cannot take this request now (connection limit, shutdown);
    /// another replica, or this one a little later, can.
    #[error("{message}")]
    Overloaded {
        message: String,
        retry_after: std::time::Duration,
    },
    /// The upstream answered with an error; already normalized.
    #[error("{}", .0.message)]
    Upstream(UpstreamError),
    /// The upstream could not be reached or did not answer in time.
    #[error("upstream {region} unavailable: {reason}")]
    UpstreamUnavailable { region: String, reason: String },
    #[error("upstream {region} did not answer in time")]
    UpstreamTimeout { region: String },
    /// No quota before the request's deadline (Spillway's own decision, or
    /// upstream's 429 with nowhere left to go).
    #[error("{message}")]
    RateLimited {
        message: String,
        retry_after: std::time::Duration,
    },
    /// Google credentials could not produce a token.
    #[error("upstream credentials are not usable; see the Spillway log")]
    Credentials,
    /// Something inside Spillway failed (details in the log).
    #[error("{0}")]
    Internal(String),
}

impl ApiError {
    pub fn kind_and_status(&self) -> (ErrorKind, StatusCode) {
        use ApiError::*;
        match self {
            InvalidRequest(_) | BadRequest(_) => {
                (ErrorKind::InvalidRequest, StatusCode::BAD_REQUEST)
            }
            Unauthenticated(_) => (ErrorKind::Authentication, StatusCode::UNAUTHORIZED),
            Forbidden(_) => (ErrorKind::Permission, StatusCode::FORBIDDEN),
            NotFound(_) => (ErrorKind::NotFound, StatusCode::NOT_FOUND),
            TooLarge { .. } => (ErrorKind::RequestTooLarge, StatusCode::PAYLOAD_TOO_LARGE),
            UnsupportedMediaType(_) => (
                ErrorKind::InvalidRequest,
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
            ),
            MethodNotAllowed => (ErrorKind::InvalidRequest, StatusCode::METHOD_NOT_ALLOWED),
            UriTooLong { .. } => (ErrorKind::InvalidRequest, StatusCode::URI_TOO_LONG),
            HeadersTooLarge(_) => (
                ErrorKind::InvalidRequest,
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ),
            RequestTimeout(_) => (ErrorKind::Timeout, StatusCode::REQUEST_TIMEOUT),
            Overloaded { .. } => (ErrorKind::Overloaded, StatusCode::SERVICE_UNAVAILABLE),
            Upstream(e) => (
                e.kind,
                StatusCode::from_u16(e.status).unwrap_or(StatusCode::BAD_GATEWAY),
            ),
            UpstreamUnavailable { .. } => (ErrorKind::Api, StatusCode::BAD_GATEWAY),
            UpstreamTimeout { .. } => (ErrorKind::Timeout, StatusCode::GATEWAY_TIMEOUT),
            RateLimited { .. } => (ErrorKind::RateLimit, StatusCode::TOO_MANY_REQUESTS),
            Credentials => (ErrorKind::Api, StatusCode::INTERNAL_SERVER_ERROR),
            Internal(_) => (ErrorKind::Api, StatusCode::INTERNAL_SERVER_ERROR),
        }
    }

    /// The HTTP status a forwarding error is answered with.
    pub fn status_of(error: &ForwardError) -> u16 {
        let status = match error {
            ForwardError::Invalid(_) => StatusCode::BAD_REQUEST,
            ForwardError::UnknownModel(_) => StatusCode::NOT_FOUND,
            ForwardError::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            ForwardError::Upstream(e) => return e.status,
            ForwardError::UpstreamUnavailable { .. } => StatusCode::BAD_GATEWAY,
            ForwardError::UpstreamTimeout { .. } => StatusCode::GATEWAY_TIMEOUT,
            ForwardError::Credentials => StatusCode::INTERNAL_SERVER_ERROR,
        };
        status.as_u16()
    }

    /// Whether retrying the same request could ever succeed.
    fn retryable(&self) -> bool {
        let (_, status) = self.kind_and_status();
        status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
            || status.is_server_error()
    }
}

impl From<ForwardError> for ApiError {
    fn from(e: ForwardError) -> Self {
        match e {
            ForwardError::Invalid(m) => ApiError::BadRequest(m),
            ForwardError::UnknownModel(m) => ApiError::NotFound(m),
            ForwardError::RateLimited {
                message,
                retry_after,
            } => ApiError::RateLimited {
                message,
                retry_after,
            },
            ForwardError::Upstream(e) => ApiError::Upstream(e),
            ForwardError::UpstreamUnavailable { region, reason } => {
                ApiError::UpstreamUnavailable { region, reason }
            }
            ForwardError::UpstreamTimeout { region } => ApiError::UpstreamTimeout { region },
            ForwardError::Credentials => ApiError::Credentials,
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let (kind, status) = self.kind_and_status();
        let body = spillway_vertex::error_body(kind, &self.to_string(), None);
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            http::header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        if !self.retryable() {
            headers.insert("x-should-retry", HeaderValue::from_static("false"));
        }
        if let ApiError::RateLimited { retry_after, .. }
        | ApiError::Overloaded { retry_after, .. } = &self
        {
            crate::ratelimit::add_retry_after(headers, *retry_after);
        }
        response
    }
}
