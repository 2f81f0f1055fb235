//! testrun-controller: runs CI test jobs on ephemeral Compute Engine VMs and
//! keeps warm pools of prebuilt VMs, driven by the `TestRun` and
//! `PrebuildPreset` custom resources.
//!
//! Modules, one concern each:
//! - [`api`]: the custom resources and their cross-field checks.
//! - [`crd`]: the CustomResourceDefinitions generated from [`api`].

pub mod agent;
pub mod api;
pub mod compute;
pub mod controller;
pub mod crd;
pub mod emulator;
pub mod metrics;
pub mod telemetry;
