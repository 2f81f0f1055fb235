//! `spec.failurePolicy`: what happens when an attempt of a shard fails, in
//! the shape of a Job's `podFailurePolicy`: ordered rules, the first that
//! matches decides.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use super::testrun::AttemptOutcome;

/// Most rules a policy may have (as a Job's `podFailurePolicy`).
pub const MAX_RULES: usize = 20;
/// Most exit codes one rule may list.
pub const MAX_EXIT_CODES: usize = 255;

/// What happens when an attempt of a shard fails. The rules are checked in
/// order and the first that matches the attempt decides; an attempt no rule
/// matches gets the default: a failing test ends its shard (`FailShard`), a
/// preemption is retried without counting (`Ignore`, up to
/// `maxPreemptions`), a timeout ends the shard, and any other
/// infrastructure failure is retried while `maxAttempts` allows
/// (`RetryShard`).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicy {
    /// The rules, checked in order; at most 20.
    #[schemars(length(max = 20))]
    pub rules: Vec<FailurePolicyRule>,
}

/// One rule: which failed attempts it matches (exactly one of `onExitCodes`
/// and `onReasons`) and what then happens.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct FailurePolicyRule {
    /// What happens to a matching attempt's shard:
    /// - `RetryShard`: a new attempt on a new VM, counted toward
    ///   `maxAttempts` (when they are used up the shard ends: `Failed` for a
    ///   failing test, `Error` otherwise);
    /// - `Ignore`: a new attempt that does not count toward `maxAttempts`
    ///   (a preemption is ignored at most `maxPreemptions` times, any other
    ///   failure at most 10 times per shard; later ones count);
    /// - `FailShard`: the shard ends now (`Failed` for a failing test,
    ///   `TimedOut` for a timeout, `Error` otherwise);
    /// - `FailRun`: the shard ends as with `FailShard` and every other shard
    ///   is stopped at once (`Cancelled`) and its VM deleted.
    pub action: FailurePolicyAction,

    /// Matches a test that exited with one of (`In`) or none of (`NotIn`)
    /// these exit codes. Exit code 0 is a success and never matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_exit_codes: Option<OnExitCodes>,

    /// Matches an attempt that ended for one of these infrastructure
    /// reasons.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 7), extend("x-kubernetes-list-type" = "set"))]
    pub on_reasons: Vec<FailureReason>,
}

/// What a failure policy rule does; see `rules[].action`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
pub enum FailurePolicyAction {
    /// A new attempt, counted toward `maxAttempts`.
    RetryShard,
    /// A new attempt, not counted toward `maxAttempts`.
    Ignore,
    /// The shard ends now.
    FailShard,
    /// The shard ends now and every other shard is stopped.
    FailRun,
}

/// Exit codes a rule matches.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct OnExitCodes {
    /// `In`: the exit code is one of `values`; `NotIn`: it is none of them.
    pub operator: ExitCodeOperator,
    /// Exit codes from 0 to 255 in ascending order, each once; `In` may not
    /// list 0. A command killed by a signal exits with 128 + the signal.
    #[schemars(length(min = 1, max = 255), inner(range(min = 0, max = 255)), extend("x-kubernetes-list-type" = "set"))]
    pub values: Vec<i32>,
}

/// How `onExitCodes.values` is read.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub enum ExitCodeOperator {
    /// The exit code is one of the values.
    In,
    /// The exit code is none of the values.
    NotIn,
}

/// An infrastructure reason an attempt ended; the names of `history[].outcome`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
pub enum FailureReason {
    /// Compute Engine reclaimed the Spot VM.
    Preempted,
    /// The agent went silent for longer than `heartbeatTimeout`.
    LeaseLost,
    /// The VM disappeared.
    VmLost,
    /// No zone had capacity.
    CapacityExhausted,
    /// The agent did not register in time.
    RegistrationTimeout,
    /// The attempt ran longer than `timeout`.
    TimedOut,
    /// Compute Engine refused to create the VM.
    CreateFailed,
}

impl FailureReason {
    /// The attempt outcome of the same name.
    pub fn outcome(self) -> AttemptOutcome {
        match self {
            Self::Preempted => AttemptOutcome::Preempted,
            Self::LeaseLost => AttemptOutcome::LeaseLost,
            Self::VmLost => AttemptOutcome::VmLost,
            Self::CapacityExhausted => AttemptOutcome::CapacityExhausted,
            Self::RegistrationTimeout => AttemptOutcome::RegistrationTimeout,
            Self::TimedOut => AttemptOutcome::TimedOut,
            Self::CreateFailed => AttemptOutcome::CreateFailed,
        }
    }
}

impl OnExitCodes {
    /// Whether a failed test's exit code matches.
    pub fn matches(&self, code: i32) -> bool {
        code != 0
            && match self.operator {
                ExitCodeOperator::In => self.values.contains(&code),
                ExitCodeOperator::NotIn => !self.values.contains(&code),
            }
    }
}

impl FailurePolicyRule {
    /// Whether the rule matches an attempt that ended with `outcome` (and
    /// `exit_code`, for a failing test).
    pub fn matches(&self, outcome: AttemptOutcome, exit_code: Option<i32>) -> bool {
        match (&self.on_exit_codes, outcome, exit_code) {
            (Some(codes), AttemptOutcome::TestFailed, Some(code)) => codes.matches(code),
            (Some(_), _, _) => false,
            (None, _, _) => self.on_reasons.iter().any(|r| r.outcome() == outcome),
        }
    }
}

impl FailurePolicy {
    /// The first rule that matches, if any does: its index and its action.
    pub fn matching_rule(
        &self,
        outcome: AttemptOutcome,
        exit_code: Option<i32>,
    ) -> Option<(usize, FailurePolicyAction)> {
        self.rules.iter().enumerate().find(|(_, r)| r.matches(outcome, exit_code)).map(|(i, r)| (i, r.action))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn codes(operator: ExitCodeOperator, values: &[i32]) -> FailurePolicyRule {
        FailurePolicyRule {
            action: FailurePolicyAction::RetryShard,
            on_exit_codes: Some(OnExitCodes { operator, values: values.to_vec() }),
            on_reasons: Vec::new(),
        }
    }

    #[test]
    fn exit_code_rules_match_failed_tests_only_and_never_exit_code_zero() {
        let not_in = codes(ExitCodeOperator::NotIn, &[1]);
        assert!(not_in.matches(AttemptOutcome::TestFailed, Some(2)));
        assert!(!not_in.matches(AttemptOutcome::TestFailed, Some(1)));
        assert!(!not_in.matches(AttemptOutcome::Succeeded, Some(0)));
        assert!(!not_in.matches(AttemptOutcome::LeaseLost, None));
        let is = codes(ExitCodeOperator::In, &[75]);
        assert!(is.matches(AttemptOutcome::TestFailed, Some(75)));
        assert!(!is.matches(AttemptOutcome::TestFailed, Some(74)));
    }

    #[test]
    fn the_first_matching_rule_decides() {
        let policy = FailurePolicy {
            rules: vec![
                FailurePolicyRule {
                    action: FailurePolicyAction::FailRun,
                    on_exit_codes: None,
                    on_reasons: vec![FailureReason::VmLost],
                },
                FailurePolicyRule {
                    action: FailurePolicyAction::Ignore,
                    on_exit_codes: None,
                    on_reasons: vec![FailureReason::VmLost, FailureReason::LeaseLost],
                },
            ],
        };
        assert_eq!(policy.matching_rule(AttemptOutcome::VmLost, None), Some((0, FailurePolicyAction::FailRun)));
        assert_eq!(policy.matching_rule(AttemptOutcome::LeaseLost, None), Some((1, FailurePolicyAction::Ignore)));
        assert_eq!(policy.matching_rule(AttemptOutcome::Preempted, None), None);
    }
}
