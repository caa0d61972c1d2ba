//! moat: a security-first gateway for self-hosted AI inference, with kernel-enforced
//! segmentation. The binary (`src/main.rs`) is a thin CLI over this library; the integration
//! tests and benchmarks in `tests/` drive the same library.

pub mod admin;
pub mod audit;
pub mod auth;
pub mod cgroup;
pub mod cli;
pub mod clock;
pub mod config;
pub mod daemon;
pub mod dataplane;
pub mod error;
pub mod guardrails;
pub mod logging;
pub mod metrics;
pub mod permissions;
pub mod policy_grammar;
pub mod secret_files;
pub mod segment;
pub mod store;
pub mod tls;
