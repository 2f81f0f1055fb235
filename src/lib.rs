//! testrun-controller: runs CI test jobs on ephemeral Compute Engine VMs and
//! keeps warm pools of prebuilt VMs, driven by the `TestRun` and
//! `PrebuildPreset` custom resources.
//!
//! Modules, one concern each:
//! - [`api`]: the custom resources and their cross-field checks.
//! - [`crd`]: the CustomResourceDefinitions generated from [`api`].
//! - [`controller`]: the reconcilers (pure planners and thin executors).
//! - [`inventory`]: the one view of the installation's VMs.
//! - [`tracker`]: follows every cloud operation and wakes its owner.
//! - [`compute`] and [`emulator`]: the cloud, and a local stand-in for it.
//! - [`agent`]: the agent on each VM and the API it reports to.
//! - [`leader`]: leader election between replicas.
//! - [`shutdown`]: the process's one stop request.

pub mod agent;
pub mod api;
pub mod compute;
pub mod controller;
pub mod crd;
pub mod emulator;
pub mod inventory;
pub mod leader;
pub mod metrics;
pub mod shutdown;
pub mod telemetry;
pub mod tracker;
