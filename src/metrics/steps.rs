//! How long each step of a shard's fresh VM takes: created → insert accepted
//! → VM running → agent registered → command started → result accepted →
//! VM gone, as `shard_step_duration_seconds{step}`.
//!
//! Steps are marked by whoever sees them (the TestRun controller, the
//! operation tracker, the agent API), keyed by instance name, and observed
//! as the time since the step before. A step seen out of order (an agent
//! registering before its insert's operation was read as done) is skipped;
//! the next step counts from the last one seen. Pool VMs are not followed:
//! the pool metrics cover them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use prometheus_client::encoding::{EncodeLabelSet, EncodeLabelValue};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};

/// At most this many VMs are followed at once; beyond it the oldest is
/// dropped (a VM whose deletion this process never saw).
const MAX_FOLLOWED: usize = 20_000;

/// A step of a shard's VM, in the order they happen.
#[derive(Clone, Copy, Debug, Hash, PartialEq, Eq, PartialOrd, Ord)]
pub enum Step {
    /// The controller asked for the VM (its insert intent was written).
    Created,
    /// Compute Engine accepted the insert call.
    InsertAccepted,
    /// The insert's operation finished: the VM runs.
    VmRunning,
    /// The VM's agent registered for the shard.
    AgentRegistered,
    /// The command started (the result's duration back from its report).
    CommandStarted,
    /// The result was accepted.
    ResultAccepted,
    /// The VM's delete finished.
    VmGone,
}

/// The `step` label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StepLabels {
    /// The step that ended: `insert_accepted`, `vm_running`, …
    pub step: Step,
}

impl EncodeLabelValue for Step {
    fn encode(&self, encoder: &mut prometheus_client::encoding::LabelValueEncoder) -> Result<(), std::fmt::Error> {
        use std::fmt::Write as _;
        encoder.write_str(self.name())
    }
}

impl Step {
    /// The label value.
    pub fn name(self) -> &'static str {
        match self {
            Step::Created => "created",
            Step::InsertAccepted => "insert_accepted",
            Step::VmRunning => "vm_running",
            Step::AgentRegistered => "agent_registered",
            Step::CommandStarted => "command_started",
            Step::ResultAccepted => "result_accepted",
            Step::VmGone => "vm_gone",
        }
    }
}

type StepFamily = Family<StepLabels, Histogram, fn() -> Histogram>;

fn step_histogram() -> Histogram {
    // 50 ms to about 7 hours.
    Histogram::new(exponential_buckets(0.05, 2.0, 20))
}

#[derive(Clone, Copy, Debug)]
struct Mark {
    step: Step,
    at: Instant,
}

/// The VMs being followed and the histogram of their steps.
pub struct ShardSteps {
    followed: Mutex<HashMap<String, Mark>>,
    /// The histogram, registered as `shard_step_duration_seconds`.
    pub durations: StepFamily,
}

impl Default for ShardSteps {
    fn default() -> Self {
        Self { followed: Mutex::new(HashMap::new()), durations: Family::new_with_constructor(step_histogram) }
    }
}

impl ShardSteps {
    /// Marks a step of a VM now.
    pub fn mark(&self, instance: &str, step: Step) {
        self.mark_at(instance, step, Instant::now());
    }

    /// Marks a step of a VM at `at`: starts following it on `Created` (once),
    /// observes the time since its last step on a later one, and stops
    /// following it on `VmGone`.
    pub fn mark_at(&self, instance: &str, step: Step, at: Instant) {
        let mut followed = self.followed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if step == Step::Created {
            if !followed.contains_key(instance) {
                if followed.len() >= MAX_FOLLOWED
                    && let Some(oldest) = followed.iter().min_by_key(|(_, m)| m.at).map(|(k, _)| k.clone())
                {
                    followed.remove(&oldest);
                }
                followed.insert(instance.to_string(), Mark { step, at });
            }
            return;
        }
        let Some(last) = followed.get_mut(instance) else { return };
        if step <= last.step {
            return;
        }
        let took = at.checked_duration_since(last.at).unwrap_or(Duration::ZERO);
        self.durations.get_or_create(&StepLabels { step }).observe(took.as_secs_f64());
        *last = Mark { step, at: at.max(last.at) };
        if step == Step::VmGone {
            followed.remove(instance);
        }
    }

    /// Marks an accepted result: the command started its duration before
    /// now.
    pub fn result_accepted(&self, instance: &str, command: Duration) {
        let now = Instant::now();
        self.mark_at(instance, Step::CommandStarted, now.checked_sub(command).unwrap_or(now));
        self.mark_at(instance, Step::ResultAccepted, now);
    }

    #[cfg(test)]
    fn is_followed(&self, instance: &str) -> bool {
        self.followed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).contains_key(instance)
    }

    /// How many VMs are followed.
    pub fn followed(&self) -> usize {
        self.followed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn count(steps: &ShardSteps, step: Step) -> u64 {
        let text = {
            let mut registry = prometheus_client::registry::Registry::default();
            registry.register("s", "s", steps.durations.clone());
            let mut text = String::new();
            prometheus_client::encoding::text::encode(&mut text, &registry).expect("encode");
            text
        };
        let prefix = format!("s_count{{step=\"{}\"}} ", step.name());
        text.lines().find_map(|l| l.strip_prefix(&prefix)).map_or(0, |n| n.parse().expect("a count"))
    }

    #[test]
    fn each_step_is_observed_once_from_the_step_before_and_the_vm_is_forgotten_when_gone() {
        let steps = ShardSteps::default();
        let t0 = Instant::now();
        steps.mark_at("vm", Step::Created, t0);
        steps.mark_at("vm", Step::Created, t0 + Duration::from_secs(5));
        steps.mark_at("vm", Step::InsertAccepted, t0 + Duration::from_secs(1));
        steps.mark_at("vm", Step::InsertAccepted, t0 + Duration::from_secs(2));
        steps.mark("vm", Step::AgentRegistered);
        // Read as done only after the agent registered: skipped.
        steps.mark("vm", Step::VmRunning);
        steps.result_accepted("vm", Duration::from_millis(10));
        steps.mark("vm", Step::VmGone);
        for (step, n) in [
            (Step::InsertAccepted, 1),
            (Step::VmRunning, 0),
            (Step::AgentRegistered, 1),
            (Step::CommandStarted, 1),
            (Step::ResultAccepted, 1),
            (Step::VmGone, 1),
        ] {
            assert_eq!(count(&steps, step), n, "{step:?}");
        }
        assert_eq!(steps.followed(), 0);
        // A VM never created here (a pool VM, or one from before a restart) is not followed.
        steps.mark("pool-vm", Step::AgentRegistered);
        steps.mark("pool-vm", Step::VmGone);
        assert_eq!(count(&steps, Step::VmGone), 1);
        assert_eq!(steps.followed(), 0);
    }

    #[test]
    fn the_number_of_followed_vms_is_bounded() {
        let steps = ShardSteps::default();
        let t0 = Instant::now();
        for i in 0..MAX_FOLLOWED + 3 {
            steps.mark_at(&format!("vm-{i}"), Step::Created, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(steps.followed(), MAX_FOLLOWED);
        assert!(!steps.is_followed("vm-0") && steps.is_followed(&format!("vm-{}", MAX_FOLLOWED + 2)));
    }
}
