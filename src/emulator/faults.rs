//! Fault injection: rules that make chosen calls fail the way Compute Engine
//! fails, per zone and per kind of call, a fixed number of times or with a
//! probability drawn from a seeded generator, so a test is repeatable.

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{RngExt as _, SeedableRng as _};
use serde::{Deserialize, Serialize};

/// The emulated calls a fault can target.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Call {
    /// `instances.insert`
    Insert,
    /// `instances.delete`
    Delete,
    /// `instances.get`
    Get,
    /// `instances.list`
    List,
    /// `instances.aggregatedList`
    AggregatedList,
    /// `instances.setLabels`
    SetLabels,
    /// `zoneOperations.get`
    OperationGet,
    /// `zoneOperations.wait`
    OperationWait,
}

impl Call {
    /// The Compute Engine method name, e.g. `instances.insert`.
    pub fn method(self) -> &'static str {
        match self {
            Self::Insert => "instances.insert",
            Self::Delete => "instances.delete",
            Self::Get => "instances.get",
            Self::List => "instances.list",
            Self::AggregatedList => "instances.aggregatedList",
            Self::SetLabels => "instances.setLabels",
            Self::OperationGet => "zoneOperations.get",
            Self::OperationWait => "zoneOperations.wait",
        }
    }

    /// Whether the call starts an operation.
    pub fn is_mutation(self) -> bool {
        matches!(self, Self::Insert | Self::Delete | Self::SetLabels)
    }
}

impl FromStr for Call {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "unknown call {s:?} (insert, delete, get, list, aggregatedList, setLabels, operationGet, operationWait)"
            )
        })
    }
}

/// What happens to a call a rule hits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum FaultKind {
    /// The operation fails with `ZONE_RESOURCE_POOL_EXHAUSTED`.
    Capacity,
    /// The operation fails with `QUOTA_EXCEEDED`.
    Quota,
    /// The call is answered with HTTP 429 `rateLimitExceeded`.
    RateLimit,
    /// The call is answered with HTTP 503 `backendError`.
    Unavailable,
    /// The operation (or, for reads, the answer) takes `delayMs` longer.
    Slow,
    /// The operation fails with `INTERNAL_ERROR` and has no effect.
    Fail,
    /// The operation stays RUNNING forever and has no effect.
    Hang,
    /// The operation is forgotten right after it is returned and has no
    /// effect: reading it gives 404.
    Vanish,
    /// The call is carried out, but its answer is lost: the caller gets
    /// HTTP 503 `backendError` as if nothing happened (a connection dropped
    /// after Compute Engine took the call). Repeating the call with the same
    /// `requestId` returns the operation the first call started.
    LostAnswer,
    /// The zone cannot be reached: calls in it are answered with HTTP 503,
    /// and an aggregated list leaves it out with an `UNREACHABLE` warning
    /// for its scope, as Compute Engine does. Needs `zone`.
    Unreachable,
    /// The insert succeeds, and a Spot VM it makes is preempted `delayMs`
    /// after it booted: `instance/preempted` turns TRUE in its metadata
    /// and after the preemption notice it is stopped or deleted. Standard
    /// VMs are never preempted. Insert only.
    Preempt,
}

impl FromStr for FaultKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        serde_json::from_value(serde_json::Value::String(s.to_string())).map_err(|_| {
            format!(
                "unknown fault kind {s:?} (capacity, quota, rateLimit, unavailable, slow, fail, hang, vanish, lostAnswer, unreachable, preempt)"
            )
        })
    }
}

/// One fault rule.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct FaultRule {
    /// Id given by the emulator.
    #[serde(default)]
    pub id: u64,
    /// The call to hit; every call when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub call: Option<Call>,
    /// The zone to hit; every zone when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub zone: Option<String>,
    /// What happens.
    pub kind: FaultKind,
    /// How many more calls to hit; without limit when unset.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub count: Option<u32>,
    /// Chance of hitting a matching call, from 0 to 1.
    #[serde(default = "one")]
    pub probability: f64,
    /// Extra delay for `slow`, in milliseconds.
    #[serde(default)]
    pub delay_ms: u64,
    /// Calls hit so far.
    #[serde(default)]
    pub hits: u64,
}

fn one() -> f64 {
    1.0
}

impl FaultRule {
    /// Checks a rule given by a user.
    pub fn validate(&self) -> Result<(), String> {
        if !(0.0..=1.0).contains(&self.probability) {
            return Err(format!("probability {} is not between 0 and 1", self.probability));
        }
        if self.kind == FaultKind::Unreachable && self.zone.is_none() {
            return Err("an unreachable fault needs zone".into());
        }
        if self.kind == FaultKind::Slow && self.delay_ms == 0 {
            return Err("a slow fault needs delayMs".into());
        }
        if self.kind == FaultKind::Preempt && self.call.is_some_and(|c| c != Call::Insert) {
            return Err("a preempt fault applies only to insert".into());
        }
        let operation_kinds =
            [FaultKind::Capacity, FaultKind::Quota, FaultKind::Fail, FaultKind::Hang, FaultKind::Vanish];
        if let Some(call) = self.call
            && operation_kinds.contains(&self.kind)
            && !call.is_mutation()
        {
            return Err(format!("fault {:?} applies only to insert, delete and setLabels", self.kind));
        }
        Ok(())
    }
}

/// Parses `call=insert,zone=us-central1-a,kind=capacity,count=2,probability=0.5,delayMs=300`.
impl FromStr for FaultRule {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let mut rule = FaultRule {
            id: 0,
            call: None,
            zone: None,
            kind: FaultKind::Fail,
            count: None,
            probability: 1.0,
            delay_ms: 0,
            hits: 0,
        };
        let mut kind = None;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (key, value) = part.split_once('=').ok_or_else(|| format!("{part:?} is not key=value"))?;
            match key {
                "call" => rule.call = Some(value.parse()?),
                "zone" => rule.zone = Some(value.to_string()),
                "kind" => kind = Some(value.parse()?),
                "count" => rule.count = Some(value.parse().map_err(|_| format!("count {value:?} is not a number"))?),
                "probability" => {
                    rule.probability = value.parse().map_err(|_| format!("probability {value:?} is not a number"))?
                }
                "delayMs" | "delay_ms" => {
                    rule.delay_ms = value.parse().map_err(|_| format!("delayMs {value:?} is not a number"))?
                }
                other => return Err(format!("unknown key {other:?} (call, zone, kind, count, probability, delayMs)")),
            }
        }
        rule.kind = kind.ok_or("a fault needs kind=...")?;
        rule.validate()?;
        Ok(rule)
    }
}

impl fmt::Display for FaultRule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", serde_json::to_string(self).map_err(|_| fmt::Error)?)
    }
}

/// What the emulator must do with one call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Verdict {
    /// Answer with this HTTP error instead of serving the call.
    pub http_error: Option<FaultKind>,
    /// Let the operation end this way instead of succeeding.
    pub operation: Option<FaultKind>,
    /// Carry the call out, then answer HTTP 503 instead of the operation.
    pub lose_answer: bool,
    /// Extra delay.
    pub delay: Duration,
    /// Preempt the Spot VM this insert makes this long after it is RUNNING.
    pub preempt_after: Option<Duration>,
}

/// The active rules and the seeded generator.
pub struct Faults {
    rules: Vec<FaultRule>,
    rng: StdRng,
    next_id: u64,
}

impl Faults {
    /// No rules, with a seed for probabilities.
    pub fn new(seed: u64) -> Self {
        Self { rules: Vec::new(), rng: StdRng::seed_from_u64(seed), next_id: 1 }
    }

    /// Adds a rule and returns its id.
    pub fn add(&mut self, mut rule: FaultRule) -> u64 {
        rule.id = self.next_id;
        rule.hits = 0;
        self.next_id += 1;
        self.rules.push(rule);
        self.next_id - 1
    }

    /// Replaces every rule and restarts the generator.
    pub fn replace(&mut self, rules: Vec<FaultRule>, seed: u64) {
        self.rules.clear();
        self.rng = StdRng::seed_from_u64(seed);
        for rule in rules {
            self.add(rule);
        }
    }

    /// Removes a rule; false when there is none with that id.
    pub fn remove(&mut self, id: u64) -> bool {
        let before = self.rules.len();
        self.rules.retain(|r| r.id != id);
        self.rules.len() != before
    }

    /// The rules with their remaining counts and hits.
    pub fn rules(&self) -> &[FaultRule] {
        &self.rules
    }

    /// Decides what happens to one call. Each matching rule with a count
    /// left draws once; every rule that hits uses one of its count.
    pub fn judge(&mut self, call: Call, zone: Option<&str>) -> Verdict {
        let mut verdict = Verdict::default();
        for rule in &mut self.rules {
            let call_matches = rule.call.is_none_or(|c| c == call);
            let zone_matches = rule.zone.as_deref().is_none_or(|z| Some(z) == zone);
            if !call_matches || !zone_matches || rule.count == Some(0) {
                continue;
            }
            let applicable = match rule.kind {
                FaultKind::RateLimit | FaultKind::Unavailable | FaultKind::Slow | FaultKind::Unreachable => true,
                FaultKind::Preempt => call == Call::Insert,
                _ => call.is_mutation(),
            };
            if !applicable || (rule.probability < 1.0 && !self.rng.random_bool(rule.probability)) {
                continue;
            }
            let used = match rule.kind {
                FaultKind::RateLimit | FaultKind::Unavailable if verdict.http_error.is_none() => {
                    verdict.http_error = Some(rule.kind);
                    true
                }
                FaultKind::Unreachable if verdict.http_error.is_none() => {
                    verdict.http_error = Some(FaultKind::Unavailable);
                    true
                }
                FaultKind::Slow => {
                    verdict.delay += Duration::from_millis(rule.delay_ms);
                    true
                }
                FaultKind::Preempt if verdict.preempt_after.is_none() => {
                    verdict.preempt_after = Some(Duration::from_millis(rule.delay_ms));
                    true
                }
                FaultKind::LostAnswer if !verdict.lose_answer => {
                    verdict.lose_answer = true;
                    true
                }
                FaultKind::Capacity | FaultKind::Quota | FaultKind::Fail | FaultKind::Hang | FaultKind::Vanish
                    if verdict.operation.is_none() =>
                {
                    verdict.operation = Some(rule.kind);
                    true
                }
                _ => false,
            };
            if used {
                rule.hits += 1;
                if let Some(count) = rule.count.as_mut() {
                    *count -= 1;
                }
            }
        }
        verdict
    }

    /// The zones an aggregated list cannot see now: every `unreachable`
    /// rule that hits (each hit uses one of its count).
    pub fn unreachable_zones(&mut self) -> std::collections::BTreeSet<String> {
        let mut zones = std::collections::BTreeSet::new();
        for rule in &mut self.rules {
            let Some(zone) = rule.zone.clone() else { continue };
            if rule.kind != FaultKind::Unreachable
                || rule.count == Some(0)
                || !rule.call.is_none_or(|c| c == Call::AggregatedList)
                || (rule.probability < 1.0 && !self.rng.random_bool(rule.probability))
            {
                continue;
            }
            rule.hits += 1;
            if let Some(count) = rule.count.as_mut() {
                *count -= 1;
            }
            zones.insert(zone);
        }
        zones
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_flag_syntax() {
        let rule: FaultRule = "call=insert,zone=us-central1-a,kind=capacity,count=2".parse().expect("valid");
        assert_eq!(rule.call, Some(Call::Insert));
        assert_eq!(rule.zone.as_deref(), Some("us-central1-a"));
        assert_eq!(rule.kind, FaultKind::Capacity);
        assert_eq!(rule.count, Some(2));
        let slow: FaultRule = "kind=slow,delayMs=250,probability=0.5".parse().expect("valid");
        assert_eq!((slow.delay_ms, slow.probability, slow.call), (250, 0.5, None));
    }

    #[test]
    fn rejects_bad_rules_with_a_reason() {
        for (text, words) in [
            ("call=insert", "needs kind"),
            ("kind=boom", "unknown fault kind"),
            ("kind=capacity,call=get", "only to insert"),
            ("kind=slow", "needs delayMs"),
            ("kind=unreachable", "needs zone"),
            ("kind=fail,probability=2", "between 0 and 1"),
            ("kind=fail,colour=red", "unknown key"),
            ("kind=fail,call=teleport", "unknown call"),
        ] {
            let err = text.parse::<FaultRule>().expect_err(text);
            assert!(err.contains(words), "{text}: {err}");
        }
    }

    #[test]
    fn counted_rules_stop_after_their_count() {
        let mut faults = Faults::new(1);
        faults.add("call=insert,zone=us-central1-a,kind=capacity,count=2".parse().expect("valid"));
        let hit = |f: &mut Faults, zone| f.judge(Call::Insert, Some(zone)).operation;
        assert_eq!(hit(&mut faults, "us-central1-b"), None, "other zones are untouched");
        assert_eq!(faults.judge(Call::Delete, Some("us-central1-a")).operation, None, "other calls are untouched");
        assert_eq!(hit(&mut faults, "us-central1-a"), Some(FaultKind::Capacity));
        assert_eq!(hit(&mut faults, "us-central1-a"), Some(FaultKind::Capacity));
        assert_eq!(hit(&mut faults, "us-central1-a"), None);
        assert_eq!(faults.rules()[0].hits, 2);
        assert_eq!(faults.rules()[0].count, Some(0));
    }

    #[test]
    fn probabilities_are_repeatable_for_a_seed() {
        let run = |seed| {
            let mut faults = Faults::new(seed);
            faults.add("kind=unavailable,probability=0.3".parse().expect("valid"));
            (0..200).map(|_| faults.judge(Call::Get, None).http_error.is_some()).collect::<Vec<_>>()
        };
        assert_eq!(run(7), run(7));
        assert_ne!(run(7), run(8));
        let hits = run(7).iter().filter(|h| **h).count();
        assert!((30..=90).contains(&hits), "about 30% of 200 calls, got {hits}");
    }

    #[test]
    fn http_and_operation_faults_combine_with_delay() {
        let mut faults = Faults::new(0);
        faults.add("call=delete,kind=slow,delayMs=100".parse().expect("valid"));
        faults.add("call=delete,kind=hang,count=1".parse().expect("valid"));
        let v = faults.judge(Call::Delete, Some("z"));
        assert_eq!(v.delay, Duration::from_millis(100));
        assert_eq!(v.operation, Some(FaultKind::Hang));
        assert_eq!(v.http_error, None);
        let v = faults.judge(Call::Delete, Some("z"));
        assert_eq!(v.operation, None);
        assert!(faults.remove(1));
        assert!(!faults.remove(1));
        assert_eq!(faults.judge(Call::Delete, Some("z")), Verdict::default());
    }

    #[test]
    fn an_unreachable_zone_fails_its_calls_and_hides_from_aggregated_lists() {
        let mut faults = Faults::new(0);
        faults.add("zone=us-central1-a,kind=unreachable,count=2".parse().expect("valid"));
        assert_eq!(faults.judge(Call::Get, Some("us-central1-b")).http_error, None);
        assert_eq!(faults.judge(Call::Insert, Some("us-central1-a")).http_error, Some(FaultKind::Unavailable));
        assert_eq!(faults.judge(Call::AggregatedList, None).http_error, None, "a list of all zones answers");
        assert_eq!(faults.unreachable_zones(), std::collections::BTreeSet::from(["us-central1-a".to_string()]));
        assert!(faults.unreachable_zones().is_empty(), "the count is used up");
    }

    #[test]
    fn a_preempt_rule_applies_to_inserts_only_and_carries_its_delay() {
        let rule: FaultRule = "call=insert,kind=preempt,delayMs=250".parse().expect("a rule");
        assert_eq!((rule.kind, rule.delay_ms), (FaultKind::Preempt, 250));
        assert!("call=delete,kind=preempt".parse::<FaultRule>().is_err());
        let mut faults = Faults::new(0);
        faults.add("kind=preempt,delayMs=100".parse().expect("a rule"));
        assert_eq!(faults.judge(Call::Insert, None).preempt_after, Some(Duration::from_millis(100)));
        let delete = faults.judge(Call::Delete, None);
        assert_eq!((delete.preempt_after, delete.operation), (None, None), "a delete is never touched");
    }
}
