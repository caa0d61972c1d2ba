//! Benchmark bodies for `moat-bench` (one module per benchmark) and the statistics they share.

pub mod auth;
pub mod inference;
pub mod segment;

/// The median of a non-empty sample.
pub fn median(mut xs: Vec<f64>) -> f64 {
    xs.sort_by(|a, b| a.total_cmp(b));
    xs[xs.len() / 2]
}
