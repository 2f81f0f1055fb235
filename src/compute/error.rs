//! Errors from the compute back end, keeping what Compute Engine said: its
//! error code, the HTTP status, and how a caller should retry.

use std::fmt;

/// A Compute Engine error code, as found in `error.errors[].reason` of an
/// HTTP error or `error.errors[].code` of a failed operation.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum ErrorCode {
    /// `ZONE_RESOURCE_POOL_EXHAUSTED` (and its `_WITH_DETAILS` form): the zone
    /// has no capacity for the machine type right now.
    ZoneResourcePoolExhausted,
    /// `QUOTA_EXCEEDED` / `quotaExceeded`: a project or region quota is used up.
    QuotaExceeded,
    /// `RATE_LIMIT_EXCEEDED` / `rateLimitExceeded` / HTTP 429: too many API calls.
    RateLimitExceeded,
    /// `alreadyExists` / `RESOURCE_ALREADY_EXISTS`: the name is taken.
    AlreadyExists,
    /// `notFound` / `RESOURCE_NOT_FOUND`: no such resource.
    NotFound,
    /// `conditionNotMet`: a fingerprint did not match (optimistic concurrency).
    ConditionNotMet,
    /// `resourceNotReady` / `RESOURCE_NOT_READY`: the resource is busy with
    /// another operation.
    ResourceNotReady,
    /// `backendError` / HTTP 500, 502, 503, 504: Compute Engine had a problem.
    Unavailable,
    /// The call or operation took too long.
    Timeout,
    /// `invalid` / `badRequest` / HTTP 400: the request is malformed.
    Invalid,
    /// `forbidden` / HTTP 401 or 403 other than quota and rate limits:
    /// credentials or IAM permissions are missing.
    PermissionDenied,
    /// The operation the controller tracks no longer exists.
    OperationVanished,
    /// The operation had not ended by the controller's deadline
    /// (`--operation-timeout`), and its VM showed it had no effect.
    OperationTimedOut,
    /// The request never reached Compute Engine or got no readable answer.
    Transport,
    /// Any other code, kept as written.
    Other(String),
}

impl ErrorCode {
    /// Reads a code as Compute Engine writes it (either style).
    pub fn parse(code: &str) -> Self {
        match code {
            "ZONE_RESOURCE_POOL_EXHAUSTED" | "ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS" => {
                Self::ZoneResourcePoolExhausted
            }
            "QUOTA_EXCEEDED" | "quotaExceeded" => Self::QuotaExceeded,
            "RATE_LIMIT_EXCEEDED" | "rateLimitExceeded" | "userRateLimitExceeded" => Self::RateLimitExceeded,
            "alreadyExists" | "RESOURCE_ALREADY_EXISTS" => Self::AlreadyExists,
            "notFound" | "RESOURCE_NOT_FOUND" => Self::NotFound,
            "conditionNotMet" | "CONDITION_NOT_MET" => Self::ConditionNotMet,
            "resourceNotReady" | "RESOURCE_NOT_READY" => Self::ResourceNotReady,
            "backendError" | "internalError" | "INTERNAL_ERROR" | "UNAVAILABLE" => Self::Unavailable,
            "TIMEOUT" | "DEADLINE_EXCEEDED" => Self::Timeout,
            "OPERATION_VANISHED" => Self::OperationVanished,
            "OPERATION_TIMED_OUT" => Self::OperationTimedOut,
            "TRANSPORT" => Self::Transport,
            "invalid" | "badRequest" | "INVALID_ARGUMENT" | "invalidParameter" | "required" => Self::Invalid,
            "forbidden" | "PERMISSION_DENIED" | "accessNotConfigured" | "authError" | "UNAUTHENTICATED" => {
                Self::PermissionDenied
            }
            other => Self::Other(other.to_string()),
        }
    }

    /// The code from an HTTP status alone, when the body names none.
    pub fn from_http_status(status: u16) -> Self {
        match status {
            400 => Self::Invalid,
            401 | 403 => Self::PermissionDenied,
            404 => Self::NotFound,
            409 => Self::AlreadyExists,
            412 => Self::ConditionNotMet,
            429 => Self::RateLimitExceeded,
            408 | 504 => Self::Timeout,
            500..=599 => Self::Unavailable,
            other => Self::Other(format!("HTTP_{other}")),
        }
    }

    /// The code as Compute Engine writes it in operation errors.
    pub fn as_str(&self) -> &str {
        match self {
            Self::ZoneResourcePoolExhausted => "ZONE_RESOURCE_POOL_EXHAUSTED",
            Self::QuotaExceeded => "QUOTA_EXCEEDED",
            Self::RateLimitExceeded => "RATE_LIMIT_EXCEEDED",
            Self::AlreadyExists => "RESOURCE_ALREADY_EXISTS",
            Self::NotFound => "RESOURCE_NOT_FOUND",
            Self::ConditionNotMet => "CONDITION_NOT_MET",
            Self::ResourceNotReady => "RESOURCE_NOT_READY",
            Self::Unavailable => "UNAVAILABLE",
            Self::Timeout => "TIMEOUT",
            Self::Invalid => "INVALID_ARGUMENT",
            Self::PermissionDenied => "PERMISSION_DENIED",
            Self::OperationVanished => "OPERATION_VANISHED",
            Self::OperationTimedOut => "OPERATION_TIMED_OUT",
            Self::Transport => "TRANSPORT",
            Self::Other(code) => code,
        }
    }

    /// How a caller should retry after this code.
    pub fn retry_class(&self) -> RetryClass {
        match self {
            Self::ZoneResourcePoolExhausted | Self::QuotaExceeded => RetryClass::TryAnotherZone,
            Self::RateLimitExceeded => RetryClass::RetryLater,
            Self::Unavailable
            | Self::Timeout
            | Self::Transport
            | Self::ResourceNotReady
            | Self::ConditionNotMet
            | Self::OperationVanished
            | Self::OperationTimedOut => RetryClass::RetrySoon,
            Self::AlreadyExists | Self::NotFound | Self::Invalid | Self::PermissionDenied | Self::Other(_) => {
                RetryClass::Permanent
            }
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a caller should do after an error.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum RetryClass {
    /// A passing problem: retry the same call after a short backoff.
    RetrySoon,
    /// Rate limited: retry the same call after a longer backoff.
    RetryLater,
    /// The zone has no capacity or quota: try the next zone.
    TryAnotherZone,
    /// Retrying the same call will not help.
    Permanent,
}

/// An error from the compute back end.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ComputeError {
    /// Compute Engine answered the call with an HTTP error.
    #[error("compute API call {call} failed with HTTP {status} ({code}): {message}")]
    Api {
        /// The call, e.g. `instances.insert`.
        call: &'static str,
        /// The error code.
        code: ErrorCode,
        /// The HTTP status.
        status: u16,
        /// Compute Engine's message, for logs only.
        message: String,
    },
    /// An operation finished with an error.
    #[error("compute operation {operation} failed ({code}): {message}")]
    OperationFailed {
        /// The operation's name.
        operation: String,
        /// The first error code of the operation.
        code: ErrorCode,
        /// Compute Engine's message, for logs only.
        message: String,
    },
    /// The call did not reach Compute Engine, or its answer could not be read.
    #[error("compute API call {call} did not complete: {message}")]
    Transport {
        /// The call, e.g. `instances.get`.
        call: &'static str,
        /// What went wrong, for logs only.
        message: String,
    },
}

impl ComputeError {
    /// The Compute Engine error code.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Api { code, .. } | Self::OperationFailed { code, .. } => code.clone(),
            Self::Transport { .. } => ErrorCode::Transport,
        }
    }

    /// The HTTP status, when Compute Engine answered with one.
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Self::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// How a caller should retry.
    pub fn retry_class(&self) -> RetryClass {
        self.code().retry_class()
    }

    /// Whether the error says the resource does not exist.
    pub fn is_not_found(&self) -> bool {
        self.code() == ErrorCode::NotFound
    }

    /// Whether the call may have been carried out although it failed: it got
    /// no answer (no connection, or no answer in time), or HTTP 5xx.
    /// Repeating it with the same request id is safe (Compute Engine carries
    /// a request id out at most once) and returns the operation, if the
    /// first call started one.
    pub fn answer_lost(&self) -> bool {
        match self {
            Self::Transport { .. } => true,
            Self::Api { status, code, .. } => *status >= 500 || *status == 408 || *code == ErrorCode::Timeout,
            Self::OperationFailed { .. } => false,
        }
    }

    /// Whether the error says the resource exists already.
    pub fn is_already_exists(&self) -> bool {
        self.code() == ErrorCode::AlreadyExists
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_spellings_of_known_codes_parse_to_one_variant() {
        let pairs = [
            ("ZONE_RESOURCE_POOL_EXHAUSTED", ErrorCode::ZoneResourcePoolExhausted),
            ("ZONE_RESOURCE_POOL_EXHAUSTED_WITH_DETAILS", ErrorCode::ZoneResourcePoolExhausted),
            ("QUOTA_EXCEEDED", ErrorCode::QuotaExceeded),
            ("quotaExceeded", ErrorCode::QuotaExceeded),
            ("rateLimitExceeded", ErrorCode::RateLimitExceeded),
            ("RATE_LIMIT_EXCEEDED", ErrorCode::RateLimitExceeded),
            ("alreadyExists", ErrorCode::AlreadyExists),
            ("notFound", ErrorCode::NotFound),
            ("conditionNotMet", ErrorCode::ConditionNotMet),
            ("backendError", ErrorCode::Unavailable),
            ("resourceNotReady", ErrorCode::ResourceNotReady),
        ];
        for (text, code) in pairs {
            assert_eq!(ErrorCode::parse(text), code, "{text}");
        }
        assert_eq!(ErrorCode::parse("SOMETHING_NEW"), ErrorCode::Other("SOMETHING_NEW".into()));
    }

    #[test]
    fn codes_round_trip_through_their_operation_spelling() {
        for code in [
            ErrorCode::ZoneResourcePoolExhausted,
            ErrorCode::QuotaExceeded,
            ErrorCode::RateLimitExceeded,
            ErrorCode::AlreadyExists,
            ErrorCode::NotFound,
            ErrorCode::ConditionNotMet,
            ErrorCode::ResourceNotReady,
            ErrorCode::Unavailable,
            ErrorCode::Timeout,
            ErrorCode::Invalid,
            ErrorCode::PermissionDenied,
            ErrorCode::OperationVanished,
            ErrorCode::OperationTimedOut,
            ErrorCode::Transport,
        ] {
            // Stored errors are read back by their code: a vanished or timed
            // out operation must stay retryable after a round trip.
            assert_eq!(ErrorCode::parse(code.as_str()), code);
        }
    }

    #[test]
    fn retry_classes() {
        assert_eq!(ErrorCode::ZoneResourcePoolExhausted.retry_class(), RetryClass::TryAnotherZone);
        assert_eq!(ErrorCode::QuotaExceeded.retry_class(), RetryClass::TryAnotherZone);
        assert_eq!(ErrorCode::RateLimitExceeded.retry_class(), RetryClass::RetryLater);
        assert_eq!(ErrorCode::Unavailable.retry_class(), RetryClass::RetrySoon);
        assert_eq!(ErrorCode::OperationVanished.retry_class(), RetryClass::RetrySoon);
        assert_eq!(ErrorCode::OperationTimedOut.retry_class(), RetryClass::RetrySoon);
        assert_eq!(ErrorCode::Invalid.retry_class(), RetryClass::Permanent);
        assert_eq!(ErrorCode::Other("X".into()).retry_class(), RetryClass::Permanent);
    }

    #[test]
    fn http_statuses_without_a_reason() {
        assert_eq!(ErrorCode::from_http_status(429), ErrorCode::RateLimitExceeded);
        assert_eq!(ErrorCode::from_http_status(503), ErrorCode::Unavailable);
        assert_eq!(ErrorCode::from_http_status(404), ErrorCode::NotFound);
        assert_eq!(ErrorCode::from_http_status(412), ErrorCode::ConditionNotMet);
        assert_eq!(ErrorCode::from_http_status(418), ErrorCode::Other("HTTP_418".into()));
    }
}
