//! HTTP API errors: each maps to one status and a JSON `{"error": "…"}` body.

use super::{json, Body};
use http::{Response, StatusCode};

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ApiError {
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Timeout(String),
    #[error("{0}")]
    TooLarge(String),
    /// The request conflicts with an earlier one (an idempotency key
    /// reused with another body).
    #[error("{0}")]
    Conflict(String),
    /// Over a per-app quota; `Retry-After` carries the seconds.
    #[error("{0}")]
    TooManyRequests(String, u64),
    /// Try again later; the `Retry-After` header carries the seconds.
    #[error("{0}")]
    Unavailable(String, u64),
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden(_) => StatusCode::FORBIDDEN,
            ApiError::NotFound(_) => StatusCode::NOT_FOUND,
            ApiError::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            ApiError::TooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Conflict(_) => StatusCode::CONFLICT,
            ApiError::TooManyRequests(..) => StatusCode::TOO_MANY_REQUESTS,
            ApiError::Unavailable(..) => StatusCode::SERVICE_UNAVAILABLE,
        }
    }

    pub fn into_response(self) -> Response<Body> {
        let mut resp = json(
            self.status(),
            &serde_json::json!({ "error": self.to_string() }),
        );
        if let ApiError::Unavailable(_, secs) | ApiError::TooManyRequests(_, secs) = self {
            resp.headers_mut()
                .insert(http::header::RETRY_AFTER, secs.into());
        }
        resp
    }
}

/// A `Retry-After` in whole seconds, spread over `1..=max` so that refused
/// clients do not come back as one herd.
pub fn jittered_retry_after(max: u64) -> u64 {
    rand::random_range(1..=max.max(1))
}
