//! Turns compute errors into what users see: a condition reason, a plain
//! sentence, and a retry class. Only zone, machine type, VM name and error
//! code reach status; Compute Engine's own message (which can name projects
//! and internal resources) goes to the logs only.

use super::error::{ComputeError, ErrorCode, RetryClass};

/// What the controller was doing when the error came.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Creating a VM.
    Create,
    /// Deleting a VM.
    Delete,
    /// Reading a VM or an operation.
    Read,
    /// Listing VMs.
    List,
    /// Relabelling a VM.
    Relabel,
}

impl Action {
    fn verb(self) -> &'static str {
        match self {
            Self::Create => "create",
            Self::Delete => "delete",
            Self::Read => "read",
            Self::List => "list",
            Self::Relabel => "relabel",
        }
    }
}

/// The facts a message may name.
#[derive(Clone, Copy, Debug, Default)]
pub struct ErrorContext<'a> {
    /// The VM's name.
    pub instance: Option<&'a str>,
    /// The zone of the call.
    pub zone: Option<&'a str>,
    /// The machine type being created.
    pub machine_type: Option<&'a str>,
    /// The zone that will be tried next, if any.
    pub next_zone: Option<&'a str>,
}

/// An error as shown in a condition or Event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PlainError {
    /// CamelCase reason for the condition.
    pub reason: &'static str,
    /// One plain sentence.
    pub message: String,
    /// How the controller retries.
    pub retry: RetryClass,
}

/// The condition reason for an error code.
pub fn reason(code: &ErrorCode) -> &'static str {
    match code {
        ErrorCode::ZoneResourcePoolExhausted => "ZoneExhausted",
        ErrorCode::QuotaExceeded => "QuotaExceeded",
        ErrorCode::RateLimitExceeded => "RateLimited",
        ErrorCode::AlreadyExists => "AlreadyExists",
        ErrorCode::NotFound => "NotFound",
        ErrorCode::ConditionNotMet => "Conflict",
        ErrorCode::ResourceNotReady => "ResourceNotReady",
        ErrorCode::Unavailable => "CloudUnavailable",
        ErrorCode::Timeout => "CloudTimeout",
        ErrorCode::Invalid => "InvalidRequest",
        ErrorCode::PermissionDenied => "PermissionDenied",
        ErrorCode::OperationVanished => "OperationLost",
        ErrorCode::OperationTimedOut => "OperationTimedOut",
        ErrorCode::Transport => "CloudUnreachable",
        ErrorCode::Other(_) => "CloudError",
    }
}

/// Maps an error to its reason, sentence and retry class.
pub fn explain(error: &ComputeError, action: Action, cx: ErrorContext<'_>) -> PlainError {
    let code = error.code();
    let retry = code.retry_class();
    let zone = cx.zone.unwrap_or("the zone");
    let machine = cx.machine_type.unwrap_or("this machine type");
    let vm = cx.instance.map(|i| format!("VM {i}")).unwrap_or_else(|| "the VM".to_string());
    let next = match cx.next_zone {
        Some(next) => format!("trying {next}"),
        None => "no other zone to try, retrying later".to_string(),
    };
    let message = match &code {
        ErrorCode::ZoneResourcePoolExhausted => format!("zone {zone} has no capacity for {machine}; {next}"),
        ErrorCode::QuotaExceeded => format!("the quota for {machine} in {zone} is used up; {next}"),
        ErrorCode::RateLimitExceeded => {
            "Compute Engine is rate limiting the controller's calls; retrying with backoff".to_string()
        }
        ErrorCode::AlreadyExists => format!("{vm} already exists in {zone}"),
        ErrorCode::NotFound => format!("{vm} was not found in {zone}"),
        ErrorCode::ConditionNotMet => format!("{vm} changed while the controller updated it; retrying"),
        ErrorCode::ResourceNotReady => format!("{vm} is busy with another operation; retrying"),
        ErrorCode::Unavailable => "Compute Engine is temporarily unavailable; retrying".to_string(),
        ErrorCode::Timeout => "the call to Compute Engine timed out; retrying".to_string(),
        ErrorCode::Invalid => format!(
            "Compute Engine refused to {} {vm}: the request is invalid; check spec.vm (zones, machineType, image)",
            action.verb()
        ),
        ErrorCode::PermissionDenied => format!(
            "the controller is not allowed to {} VMs; grant its service account roles/compute.instanceAdmin.v1",
            action.verb()
        ),
        ErrorCode::OperationVanished => {
            format!("Compute Engine lost track of the operation on {vm}; checking the VM and retrying")
        }
        ErrorCode::OperationTimedOut => format!(
            "the operation on {vm} did not finish within --operation-timeout and the VM shows it had no effect; making the call again"
        ),
        ErrorCode::Transport => "Compute Engine could not be reached; retrying".to_string(),
        ErrorCode::Other(code) => format!("Compute Engine failed to {} {vm} with error code {code}", action.verb()),
    };
    PlainError { reason: reason(&code), message, retry }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: ErrorCode, status: u16) -> ComputeError {
        ComputeError::Api {
            call: "instances.insert",
            code,
            status,
            message: "Secret details about projects/acme-prod-4711/zones/x".into(),
        }
    }

    fn op(code: &str) -> ComputeError {
        ComputeError::OperationFailed {
            operation: "operation-123".into(),
            code: ErrorCode::parse(code),
            message: "internal resource pool pool-9f in project acme-prod-4711".into(),
        }
    }

    fn cx<'a>(next: Option<&'a str>) -> ErrorContext<'a> {
        ErrorContext {
            instance: Some("tr-1234-s0-a1"),
            zone: Some("us-central1-a"),
            machine_type: Some("e2-standard-4"),
            next_zone: next,
        }
    }

    #[test]
    fn capacity_names_zone_machine_and_next_zone() {
        let e = explain(&op("ZONE_RESOURCE_POOL_EXHAUSTED"), Action::Create, cx(Some("us-central1-b")));
        assert_eq!(e.reason, "ZoneExhausted");
        assert_eq!(e.message, "zone us-central1-a has no capacity for e2-standard-4; trying us-central1-b");
        assert_eq!(e.retry, RetryClass::TryAnotherZone);
        let e = explain(&op("ZONE_RESOURCE_POOL_EXHAUSTED"), Action::Create, cx(None));
        assert!(e.message.ends_with("no other zone to try, retrying later"), "{}", e.message);
    }

    #[test]
    fn quota() {
        let e = explain(&op("QUOTA_EXCEEDED"), Action::Create, cx(Some("us-central1-b")));
        assert_eq!(e.reason, "QuotaExceeded");
        assert_eq!(e.message, "the quota for e2-standard-4 in us-central1-a is used up; trying us-central1-b");
        assert_eq!(e.retry, RetryClass::TryAnotherZone);
    }

    #[test]
    fn every_known_code_has_a_reason_and_class() {
        let cases = [
            (api(ErrorCode::RateLimitExceeded, 429), "RateLimited", RetryClass::RetryLater),
            (api(ErrorCode::AlreadyExists, 409), "AlreadyExists", RetryClass::Permanent),
            (api(ErrorCode::NotFound, 404), "NotFound", RetryClass::Permanent),
            (api(ErrorCode::ConditionNotMet, 412), "Conflict", RetryClass::RetrySoon),
            (api(ErrorCode::ResourceNotReady, 400), "ResourceNotReady", RetryClass::RetrySoon),
            (api(ErrorCode::Unavailable, 503), "CloudUnavailable", RetryClass::RetrySoon),
            (api(ErrorCode::Timeout, 504), "CloudTimeout", RetryClass::RetrySoon),
            (api(ErrorCode::Invalid, 400), "InvalidRequest", RetryClass::Permanent),
            (api(ErrorCode::PermissionDenied, 403), "PermissionDenied", RetryClass::Permanent),
            (api(ErrorCode::OperationVanished, 404), "OperationLost", RetryClass::RetrySoon),
            (
                ComputeError::Transport { call: "instances.get", message: "connection refused".into() },
                "CloudUnreachable",
                RetryClass::RetrySoon,
            ),
        ];
        for (error, reason, retry) in cases {
            let e = explain(&error, Action::Create, cx(None));
            assert_eq!((e.reason, e.retry), (reason, retry), "{error}");
            assert!(!e.message.is_empty());
        }
    }

    #[test]
    fn unknown_codes_show_only_the_code() {
        let e = explain(&op("SOMETHING_ODD"), Action::Delete, cx(None));
        assert_eq!(e.reason, "CloudError");
        assert_eq!(e.message, "Compute Engine failed to delete VM tr-1234-s0-a1 with error code SOMETHING_ODD");
        assert_eq!(e.retry, RetryClass::Permanent);
    }

    #[test]
    fn messages_never_carry_compute_engine_text() {
        let errors = [
            op("ZONE_RESOURCE_POOL_EXHAUSTED"),
            op("X"),
            api(ErrorCode::Invalid, 400),
            api(ErrorCode::Other("Y".into()), 418),
        ];
        for error in errors {
            for action in [Action::Create, Action::Delete, Action::Read, Action::List, Action::Relabel] {
                let e = explain(&error, action, cx(Some("us-central1-b")));
                assert!(!e.message.contains("acme-prod"), "{}", e.message);
                assert!(!e.message.contains("projects/"), "{}", e.message);
                assert!(!e.message.contains("pool-9f"), "{}", e.message);
            }
        }
    }

    #[test]
    fn permission_names_the_role() {
        let e = explain(&api(ErrorCode::PermissionDenied, 403), Action::Delete, cx(None));
        assert!(
            e.message.contains("delete VMs") && e.message.contains("roles/compute.instanceAdmin.v1"),
            "{}",
            e.message
        );
    }
}
