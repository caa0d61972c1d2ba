//! moat: a security-first gateway for self-hosted AI inference, with kernel-enforced
//! segmentation. The binary (`src/main.rs`) is a thin CLI over this library; the integration
//! tests and benchmarks in `tests/` drive the same library.

pub mod admin;
pub mod app;
pub mod auth;
pub mod authz;
pub mod cgroup;
pub mod cli;
pub mod config;
pub mod control;
pub mod doctor;
pub mod error;
pub mod health;
pub mod identity_cli;
pub mod inference_host;
pub mod limits;
pub mod logging;
pub mod metrics;
pub mod openai;
pub mod privdrop;
pub mod proxy;
pub mod request_id;
pub mod route;
pub mod segment;
pub mod serve;
pub mod store;
pub mod supervisor;
pub mod worker;
