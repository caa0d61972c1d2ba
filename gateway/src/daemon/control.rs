//! The supervisor ↔ worker channel: newline-delimited JSON over an inherited Unix socket.
//!
//! The supervisor sends the config as text plus what its load read from outside the text
//! ([`Captured`]: addresses, environment, files — the worker may have no DNS under egress
//! lockdown, no environment, and no right to read the files); the worker answers once it
//! serves the config, or says why it cannot.

use serde::{Deserialize, Serialize};

use crate::{config::Captured, metrics::KernelCounters};

/// Environment variables that carry the inherited descriptors to the worker.
pub const ENV_LISTEN_FD: &str = "MOAT_LISTEN_FD";
pub const ENV_CONTROL_FD: &str = "MOAT_CONTROL_FD";
/// The admin plane's listener, when `admin.listen` is set.
pub const ENV_ADMIN_FD: &str = "MOAT_ADMIN_FD";
pub const ENV_SUPERVISOR_PID: &str = "MOAT_SUPERVISOR_PID";
/// The worker's end of the audit socket: it sends its audit events there, one datagram
/// each, and the supervisor writes them (the worker cannot write the log itself).
pub const ENV_AUDIT_FD: &str = "MOAT_AUDIT_FD";

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToWorker {
    /// Serve this config (the first message, and every reload).
    Config {
        path: String,
        text: String,
        captured: Captured,
    },
    /// A fresh snapshot of the kernel's counters (no answer expected).
    Counters(KernelCounters),
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromWorker {
    /// The config is in force.
    Applied,
    /// The config was refused; the previous one stays.
    Refused { error: String },
}

/// One message as a line.
pub fn encode<T: Serialize>(msg: &T) -> String {
    let mut line = serde_json::to_string(msg).expect("control messages serialize");
    line.push('\n');
    line
}
