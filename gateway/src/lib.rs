//! moat: a security-first gateway for self-hosted AI inference, with kernel-enforced
//! segmentation. The binary (`src/main.rs`) is a thin CLI over this library; the integration
//! tests and benchmarks in `tests/` drive the same library.

pub mod app;
pub mod auth;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod error;
pub mod health;
pub mod identity_cli;
pub mod logging;
pub mod openai;
pub mod proxy;
pub mod request_id;
pub mod route;
pub mod segment;
pub mod serve;
pub mod store;
