//! Helpers for moat's integration and end-to-end tests, benchmarks and tools.

pub mod moatd;
