//! The agent: the program on every VM that runs the test command, and the
//! API the controller serves for it.
//!
//! - [`protocol`]: the JSON bodies and metadata keys both sides share.
//! - [`tokens`]: HMAC tokens that prove which VM and which lease is calling.
//! - [`book`]: what the API has heard and the controller has not written yet.
//! - [`api`]: the server side (register, heartbeat, result).
//! - [`binary`]: the agent executable, served to VMs.
//! - [`startup`]: the startup script that fetches and starts it.
//! - [`endpoint`]: the EndpointSlice that sends VMs to the leader.
//! - [`runner`]: the VM side.

pub mod api;
pub mod binary;
pub mod book;
pub mod endpoint;
pub mod protocol;
pub mod runner;
pub mod startup;
pub mod tokens;
