//! The processes of `moat serve` (see docs/operations.md, Processes): the root supervisor that
//! holds eBPF, cgroups and listeners; the unprivileged worker that serves HTTP; the privilege
//! drop between them and the control channel that joins them; and the inference-host guard
//! daemon that runs when a host has no pools of its own.

pub mod control;
pub mod inference_host;
pub mod listen;
pub mod privdrop;
pub mod seccomp;
pub mod send_timeout;
pub mod serve;
pub mod supervisor;
pub mod worker;
