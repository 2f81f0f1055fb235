//! The custom resources this controller serves: [`TestRun`], [`PrebuildPreset`] and [`VmClass`]
//! (API group `testrun.dev`, version `v1alpha1`), the types they share, and the
//! cross-field checks the OpenAPI schema cannot express.
//!
//! Doc comments on these types become the CRD's descriptions, which is what
//! `kubectl explain testrun.spec` prints: write them for users.

pub mod common;
pub mod duration;
pub mod policy;
pub mod prebuild;
pub mod testrun;
pub mod validation;
pub mod vmclass;

pub use common::{Condition, ConditionStatus, EnvVar, OperationKind, OperationState, TrackedOperation, VmSpec};
pub use duration::DurationString;
pub use prebuild::{PrebuildPreset, PrebuildPresetSpec, PrebuildPresetStatus};
pub use testrun::{TestRun, TestRunPhase, TestRunSpec, TestRunStatus};
pub use vmclass::{VmClass, VmClassSpec};

/// The API group of every resource this controller serves.
pub const GROUP: &str = "testrun.dev";
/// The API version of every resource this controller serves.
pub const VERSION: &str = "v1alpha1";
/// Finalizer put on TestRuns and PrebuildPresets until their VMs are verified gone.
pub const FINALIZER: &str = "testrun.dev/cleanup";
