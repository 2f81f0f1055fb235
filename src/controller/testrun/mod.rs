//! The TestRun controller: [`plan`] decides, [`apply`] carries it out.

pub mod apply;
pub mod plan;
pub mod policy;
pub mod rerun;
