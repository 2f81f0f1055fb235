//! Compute Engine's HTTP error responses: `{"error": {"code", "message",
//! "errors": [{"message", "domain", "reason"}]}}`.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::json;

/// An error answered the way Compute Engine answers it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GceError {
    /// HTTP status.
    pub status: StatusCode,
    /// The `reason` of the first error item, e.g. `notFound`.
    pub reason: &'static str,
    /// The message.
    pub message: String,
}

impl GceError {
    /// 404 `notFound` for a resource path.
    pub fn not_found(resource: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            reason: "notFound",
            message: format!("The resource '{resource}' was not found"),
        }
    }

    /// 409 `alreadyExists` for a resource path.
    pub fn already_exists(resource: &str) -> Self {
        Self {
            status: StatusCode::CONFLICT,
            reason: "alreadyExists",
            message: format!("The resource '{resource}' already exists"),
        }
    }

    /// 400 `invalid` with a message.
    pub fn invalid(message: impl Into<String>) -> Self {
        Self { status: StatusCode::BAD_REQUEST, reason: "invalid", message: message.into() }
    }

    /// 412 `conditionNotMet` (fingerprint mismatch).
    pub fn condition_not_met(message: impl Into<String>) -> Self {
        Self { status: StatusCode::PRECONDITION_FAILED, reason: "conditionNotMet", message: message.into() }
    }

    /// 429 `rateLimitExceeded`.
    pub fn rate_limited() -> Self {
        Self {
            status: StatusCode::TOO_MANY_REQUESTS,
            reason: "rateLimitExceeded",
            message: "Rate Limit Exceeded".to_string(),
        }
    }

    /// 503 `backendError`.
    pub fn unavailable() -> Self {
        Self { status: StatusCode::SERVICE_UNAVAILABLE, reason: "backendError", message: "Backend Error".to_string() }
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        json!({
            "error": {
                "code": self.status.as_u16(),
                "message": self.message,
                "errors": [{ "message": self.message, "domain": "global", "reason": self.reason }],
            }
        })
    }
}

impl IntoResponse for GceError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}
