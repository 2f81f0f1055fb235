//! `spec.rerunOf`, as a pure function: a rerun is planned as the run it
//! stands for, its spec completed from what the original started with
//! (command, environment, working directory, VM shape or preset, shards),
//! with only the original's shards that did not succeed.

use std::borrow::Cow;

use crate::api::testrun::{RunLink, StartedWith, TestRun, TestRunPhase, TestRunSpec};

/// Where a rerun stands before it starts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rerun {
    /// Not a rerun, or one that started (its status has what it needs).
    Nothing,
    /// The original finished: rerun these of its shards.
    Ready {
        /// The original.
        original: RunLink,
        /// The shard numbers that did not succeed in it.
        shards: Vec<i32>,
    },
    /// The rerun cannot start yet.
    Waiting {
        /// A CamelCase reason for the `Ready` condition.
        reason: &'static str,
        /// Why, for people.
        message: String,
        /// Someone must act (the original does not exist): kstatus Stalled.
        stalled: bool,
    },
}

/// The run as it is planned, and where its rerun stands. `original` is the
/// TestRun `spec.rerunOf` names, if it exists.
pub fn effective<'a>(run: &'a TestRun, original: Option<&TestRun>) -> (Cow<'a, TestRun>, Rerun) {
    // A started rerun goes on with what it started with, also once
    // `spec.rerunOf` is removed.
    let is_rerun = run.spec.rerun_of.is_some() || run.status.as_ref().is_some_and(|s| s.rerun_of.is_some());
    if let Some(started) = run.started().filter(|_| is_rerun) {
        return (Cow::Owned(completed(run, started)), Rerun::Nothing);
    }
    let Some(rerun_of) = &run.spec.rerun_of else { return (Cow::Borrowed(run), Rerun::Nothing) };
    let name = &rerun_of.name;
    let waiting = |reason, message: String, stalled| (Cow::Borrowed(run), Rerun::Waiting { reason, message, stalled });
    if run.metadata.name.as_deref() == Some(name.as_str()) {
        return waiting("InvalidRerun", "spec.rerunOf names this run itself".into(), true);
    }
    let Some(original) = original else {
        return waiting("RerunOfNotFound", format!("TestRun {name} does not exist in this namespace"), true);
    };
    let reruns_this =
        original.spec.rerun_of.as_ref().is_some_and(|r| Some(r.name.as_str()) == run.metadata.name.as_deref());
    if reruns_this && original.started().is_none() {
        return waiting("InvalidRerun", format!("TestRun {name} reruns this run: neither can start"), true);
    }
    let status = original.status.clone().unwrap_or_default();
    let Some(phase) = status.phase.filter(|p| p.is_finished()) else {
        let now = status.phase.map_or_else(|| "not started".to_string(), |p| format!("{p:?}"));
        return waiting("WaitingForOriginal", format!("waits for TestRun {name} to finish (it is {now})"), false);
    };
    let Some(started) = status.started.as_ref() else {
        return waiting(
            "InvalidRerun",
            format!("TestRun {name} ended {phase:?} without starting: nothing to rerun"),
            true,
        );
    };
    let shards = status.shards.iter().filter(|s| s.phase != TestRunPhase::Succeeded).map(|s| s.index).collect();
    let link = RunLink { name: name.clone(), uid: original.metadata.uid.clone().unwrap_or_default() };
    (Cow::Owned(completed(run, started)), Rerun::Ready { original: link, shards })
}

/// The run with its spec completed from `started` where it sets nothing.
fn completed(run: &TestRun, started: &StartedWith) -> TestRun {
    let mut run = run.clone();
    fill(&mut run.spec, started);
    run
}

fn fill(spec: &mut TestRunSpec, started: &StartedWith) {
    if spec.command.is_empty() {
        spec.command = started.command.clone();
    }
    if spec.env.is_empty() {
        spec.env = started.env.clone();
    }
    if spec.working_dir.is_none() {
        spec.working_dir = started.working_dir.clone();
    }
    if spec.vm.is_none() && spec.preset_ref.is_none() {
        spec.preset_ref = started.preset_ref.clone();
        if !started.vm_from_preset {
            spec.vm = Some(started.vm.clone());
        }
    }
    spec.shards = started.shards;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::testrun::TestRunStatus;

    fn testrun(name: &str, spec: serde_json::Value) -> TestRun {
        let mut run = TestRun::new(name, serde_json::from_value(spec).expect("spec"));
        run.metadata.uid = Some(format!("uid-{name}"));
        run
    }

    fn finished_original(phases: &[TestRunPhase]) -> TestRun {
        let mut original = testrun(
            "orig",
            serde_json::json!({"command": ["make", "test"], "shards": 5, "env": [{"name": "A", "value": "1"}],
                "vm": {"zones": ["us-central1-a"], "machineType": "e2-small", "image": "img"}}),
        );
        let shards = phases
            .iter()
            .enumerate()
            .map(|(i, phase)| {
                serde_json::from_value(serde_json::json!({"index": i, "attempt": 1, "phase": phase})).expect("shard")
            })
            .collect();
        let started = StartedWith::from_spec(&original.spec, original.spec.vm.clone().expect("vm"));
        original.status = Some(TestRunStatus {
            phase: Some(TestRunPhase::Failed),
            shards,
            started: Some(started),
            ..TestRunStatus::default()
        });
        original
    }

    #[test]
    fn a_rerun_takes_the_shards_that_did_not_succeed_and_the_originals_shape() {
        use TestRunPhase::*;
        let original = finished_original(&[Succeeded, Failed, Succeeded, Cancelled, Succeeded]);
        let rerun = testrun("again", serde_json::json!({"rerunOf": {"name": "orig"}, "maxAttempts": 1}));
        let (run, state) = effective(&rerun, Some(&original));
        assert_eq!(
            state,
            Rerun::Ready { original: RunLink { name: "orig".into(), uid: "uid-orig".into() }, shards: vec![1, 3] }
        );
        assert_eq!(run.spec.command, ["make", "test"]);
        assert_eq!(run.spec.shards, 5, "TESTRUN_SHARDS as in the original");
        assert_eq!(run.spec.env.len(), 1);
        assert_eq!(run.spec.vm, original.spec.vm);
        assert_eq!(run.spec.max_attempts, 1, "its own attempts");
        assert_eq!(crate::api::validation::validate_testrun(&run.spec), Ok(()));
    }

    #[test]
    fn what_the_rerun_sets_overrides_the_original() {
        let original = finished_original(&[TestRunPhase::Failed]);
        let rerun = testrun("again", serde_json::json!({"rerunOf": {"name": "orig"}, "command": ["make", "retest"]}));
        let (run, _) = effective(&rerun, Some(&original));
        assert_eq!(run.spec.command, ["make", "retest"]);
    }

    #[test]
    fn a_rerun_waits_for_its_original_to_exist_and_finish() {
        let rerun = testrun("again", serde_json::json!({"rerunOf": {"name": "orig"}}));
        assert!(matches!(effective(&rerun, None).1, Rerun::Waiting { reason: "RerunOfNotFound", stalled: true, .. }));
        let mut running = finished_original(&[TestRunPhase::Running]);
        running.status.as_mut().expect("status").phase = Some(TestRunPhase::Running);
        let (_, state) = effective(&rerun, Some(&running));
        assert!(matches!(state, Rerun::Waiting { reason: "WaitingForOriginal", stalled: false, .. }), "{state:?}");
        let itself = testrun("orig", serde_json::json!({"rerunOf": {"name": "orig"}}));
        assert!(matches!(effective(&itself, None).1, Rerun::Waiting { reason: "InvalidRerun", .. }));
        let other = testrun("orig", serde_json::json!({"rerunOf": {"name": "again"}}));
        let (_, state) = effective(&rerun, Some(&other));
        assert!(matches!(state, Rerun::Waiting { reason: "InvalidRerun", stalled: true, .. }), "{state:?}");
    }

    #[test]
    fn a_started_rerun_is_completed_from_what_it_started_with() {
        let original = finished_original(&[TestRunPhase::Failed]);
        let mut rerun = testrun("again", serde_json::json!({"rerunOf": {"name": "orig"}}));
        let started = original.status.as_ref().and_then(|s| s.started.clone());
        rerun.status = Some(TestRunStatus { started, ..TestRunStatus::default() });
        let (run, state) = effective(&rerun, None);
        assert_eq!(state, Rerun::Nothing, "the original may be gone");
        assert_eq!(run.spec.command, ["make", "test"]);
        // spec.rerunOf removed after the start: still what it started with.
        rerun.spec.rerun_of = None;
        rerun.status.as_mut().expect("status").rerun_of = Some(RunLink { name: "orig".into(), uid: "u".into() });
        assert_eq!(effective(&rerun, None).0.spec.command, ["make", "test"]);
        let not_a_rerun = testrun("plain", serde_json::json!({"command": ["true"]}));
        assert!(matches!(effective(&not_a_rerun, None).0, Cow::Borrowed(_)));
    }
}
