//! What follows a failed attempt, as a pure function of the spec, the
//! shard and why the attempt ended: `spec.failurePolicy`'s first matching
//! rule, or the default; `maxAttempts`, `maxPreemptions` and the bound on
//! uncounted attempts; and whether the next VM is a Spot VM.

use crate::api::policy::FailurePolicyAction;
use crate::api::testrun::{AttemptOutcome, ShardStatus, TestRunPhase, TestRunSpec};

/// Most attempts of one shard that may go uncounted (preemptions
/// included): a shard is never retried forever.
pub const MAX_UNCOUNTED_ATTEMPTS: i32 = 10;

/// What happens after an attempt failed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Next {
    /// A new attempt; `counted`: the ended one counts toward `maxAttempts`.
    Retry {
        /// Whether the ended attempt counts toward `maxAttempts`.
        counted: bool,
    },
    /// The shard ends in this phase.
    EndShard(TestRunPhase),
    /// The shard would be retried, but `maxAttempts` is used up: it ends
    /// in this phase.
    OutOfAttempts(TestRunPhase),
    /// The shard ends in this phase and every other shard is stopped.
    EndRun(TestRunPhase),
}

/// Why it was decided, for messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Because {
    /// `failurePolicy.rules[i]` matched.
    Rule(usize),
    /// No rule matched: the default for the outcome.
    Default,
}

/// The phase a shard ends in after an attempt that ended this way.
pub fn end_phase(outcome: AttemptOutcome) -> TestRunPhase {
    match outcome {
        AttemptOutcome::TestFailed => TestRunPhase::Failed,
        AttemptOutcome::TimedOut => TestRunPhase::TimedOut,
        _ => TestRunPhase::Error,
    }
}

/// The action without a matching rule: a failing test or a timeout ends
/// the shard, a preemption does not count, anything else is retried.
pub fn default_action(outcome: AttemptOutcome) -> FailurePolicyAction {
    match outcome {
        AttemptOutcome::TestFailed | AttemptOutcome::TimedOut => FailurePolicyAction::FailShard,
        AttemptOutcome::Preempted => FailurePolicyAction::Ignore,
        _ => FailurePolicyAction::RetryShard,
    }
}

/// Decides what follows the shard's ended attempt. `shard` is as it stands
/// with the ended attempt recorded (`preemptions` already counts a
/// preemption), before any next attempt starts.
pub fn decide(
    spec: &TestRunSpec,
    shard: &ShardStatus,
    outcome: AttemptOutcome,
    exit_code: Option<i32>,
) -> (Next, Because) {
    let rule = spec.failure_policy.as_ref().and_then(|p| p.matching_rule(outcome, exit_code));
    let because = rule.map_or(Because::Default, |(i, _)| Because::Rule(i));
    let action = rule.map_or_else(|| default_action(outcome), |(_, action)| action);
    let ignorable = shard.uncounted_attempts < MAX_UNCOUNTED_ATTEMPTS
        && (outcome != AttemptOutcome::Preempted || shard.preemptions <= spec.max_preemptions);
    let retry = || {
        if shard.counted_attempts() < spec.max_attempts {
            Next::Retry { counted: true }
        } else {
            Next::OutOfAttempts(end_phase(outcome))
        }
    };
    let next = match action {
        FailurePolicyAction::Ignore if ignorable => Next::Retry { counted: false },
        FailurePolicyAction::Ignore | FailurePolicyAction::RetryShard => retry(),
        FailurePolicyAction::FailShard => Next::EndShard(end_phase(outcome)),
        FailurePolicyAction::FailRun => Next::EndRun(end_phase(outcome)),
    };
    (next, because)
}

/// Whether the shard's next VM is a Spot VM: with `vm.spot`, until it was
/// preempted `maxPreemptions` times (at least once) and `vm.spotFallback`
/// is set.
pub fn next_is_spot(spec: &TestRunSpec, spot: bool, spot_fallback: bool, shard: &ShardStatus) -> bool {
    let fallen_back = spot_fallback && shard.preemptions > 0 && shard.preemptions >= spec.max_preemptions;
    spot && !fallen_back
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::policy::{ExitCodeOperator, FailurePolicy, FailurePolicyRule, FailureReason, OnExitCodes};

    fn spec(rules: Vec<FailurePolicyRule>) -> TestRunSpec {
        let mut spec: TestRunSpec = serde_json::from_value(serde_json::json!({"command": ["true"]})).expect("a spec");
        spec.failure_policy = (!rules.is_empty()).then_some(FailurePolicy { rules });
        spec
    }

    fn shard(attempt: i32, preemptions: i32, uncounted: i32) -> ShardStatus {
        serde_json::from_value(serde_json::json!({
            "index": 0, "attempt": attempt, "phase": "Running",
            "preemptions": preemptions, "uncountedAttempts": uncounted,
        }))
        .expect("a shard")
    }

    fn exit_rule(action: FailurePolicyAction, operator: ExitCodeOperator, values: &[i32]) -> FailurePolicyRule {
        FailurePolicyRule {
            action,
            on_exit_codes: Some(OnExitCodes { operator, values: values.to_vec() }),
            on_reasons: Vec::new(),
        }
    }

    fn reason_rule(action: FailurePolicyAction, reasons: &[FailureReason]) -> FailurePolicyRule {
        FailurePolicyRule { action, on_exit_codes: None, on_reasons: reasons.to_vec() }
    }

    #[test]
    fn without_a_policy_a_failing_test_ends_its_shard_and_infrastructure_uses_attempts() {
        let s = spec(vec![]);
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::TestFailed, Some(1)),
            (Next::EndShard(TestRunPhase::Failed), Because::Default)
        );
        assert_eq!(decide(&s, &shard(1, 0, 0), AttemptOutcome::LeaseLost, None).0, Next::Retry { counted: true });
        assert_eq!(
            decide(&s, &shard(3, 0, 0), AttemptOutcome::LeaseLost, None).0,
            Next::OutOfAttempts(TestRunPhase::Error)
        );
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::TimedOut, None).0,
            Next::EndShard(TestRunPhase::TimedOut)
        );
    }

    #[test]
    fn a_retry_shard_rule_retries_a_matching_exit_code_while_attempts_remain() {
        let s = spec(vec![exit_rule(FailurePolicyAction::RetryShard, ExitCodeOperator::In, &[75])]);
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::TestFailed, Some(75)),
            (Next::Retry { counted: true }, Because::Rule(0))
        );
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::TestFailed, Some(1)).0,
            Next::EndShard(TestRunPhase::Failed)
        );
        assert_eq!(
            decide(&s, &shard(3, 0, 0), AttemptOutcome::TestFailed, Some(75)).0,
            Next::OutOfAttempts(TestRunPhase::Failed),
            "the third of three attempts was the last"
        );
    }

    #[test]
    fn ignore_does_not_count_but_is_bounded() {
        let s = spec(vec![reason_rule(FailurePolicyAction::Ignore, &[FailureReason::VmLost])]);
        assert_eq!(decide(&s, &shard(3, 0, 0), AttemptOutcome::VmLost, None).0, Next::Retry { counted: false });
        let bound = shard(3 + MAX_UNCOUNTED_ATTEMPTS, 0, MAX_UNCOUNTED_ATTEMPTS);
        assert_eq!(decide(&s, &bound, AttemptOutcome::VmLost, None).0, Next::OutOfAttempts(TestRunPhase::Error));
    }

    #[test]
    fn fail_shard_and_fail_run_end_at_once_whatever_attempts_remain() {
        let s = spec(vec![
            exit_rule(FailurePolicyAction::FailRun, ExitCodeOperator::NotIn, &[1, 2]),
            reason_rule(FailurePolicyAction::FailShard, &[FailureReason::LeaseLost]),
        ]);
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::TestFailed, Some(3)),
            (Next::EndRun(TestRunPhase::Failed), Because::Rule(0))
        );
        assert_eq!(
            decide(&s, &shard(1, 0, 0), AttemptOutcome::LeaseLost, None),
            (Next::EndShard(TestRunPhase::Error), Because::Rule(1))
        );
    }

    #[test]
    fn preemptions_are_free_up_to_max_preemptions_then_fall_back_or_count() {
        let s = spec(vec![]);
        for n in 1..=3 {
            assert_eq!(
                decide(&s, &shard(n, n, n - 1), AttemptOutcome::Preempted, None).0,
                Next::Retry { counted: false }
            );
        }
        assert_eq!(decide(&s, &shard(4, 4, 3), AttemptOutcome::Preempted, None).0, Next::Retry { counted: true });
        assert!(next_is_spot(&s, true, true, &shard(1, 2, 2)));
        assert!(!next_is_spot(&s, true, true, &shard(1, 3, 3)), "falls back after the third");
        assert!(next_is_spot(&s, true, false, &shard(1, 3, 3)), "stays on Spot without spotFallback");
        let mut none_free = spec(vec![]);
        none_free.max_preemptions = 0;
        assert!(next_is_spot(&none_free, true, true, &shard(0, 0, 0)), "the first VM is a Spot VM");
        assert_eq!(
            decide(&none_free, &shard(1, 1, 0), AttemptOutcome::Preempted, None).0,
            Next::Retry { counted: true }
        );
        assert!(!next_is_spot(&none_free, true, true, &shard(1, 1, 0)));
    }
}
