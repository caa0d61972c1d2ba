//! Kernel segmentation (gateway host): loads, pins, adopts and feeds moat's eBPF programs.
