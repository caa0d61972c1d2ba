//! Kernel counters as Prometheus metrics (the gateway's own are in [`gateway`]).
//!
//! The per-CPU counters live in maps pinned by root, which the unprivileged worker cannot
//! open; the supervisor reads them every [`PUSH_EVERY`] and sends a [`KernelCounters`]
//! snapshot down the control channel, and the worker renders the latest one on the admin
//! plane's `/metrics`.

pub mod gateway;

use std::{fmt::Write as _, time::Duration};

use serde::{Deserialize, Serialize};

/// How often the supervisor sends a fresh snapshot.
pub const PUSH_EVERY: Duration = Duration::from_secs(2);

/// Allowed and refused counts of one kernel hook.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HookCount {
    pub hook: String,
    pub allowed: u64,
    pub denied: u64,
}

/// One snapshot of every kernel counter this host has.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct KernelCounters {
    /// Gateway side: connect/sendmsg hooks (absent when segmentation is off).
    pub gateway: Vec<HookCount>,
    pub gateway_events_lost: u64,
    /// Inference guard: packets to the model ports (absent without `[segmentation.inference]`).
    pub inference: Vec<HookCount>,
    pub inference_events_lost: u64,
    /// Gateway side, as the kernel reports it at the supervisor's last check: every hook's
    /// link and whether it is attached (absent when segmentation is off).
    #[serde(default)]
    pub gateway_links: Vec<LinkAttached>,
    /// The supervisor's audit writer: records written, and dropped.
    #[serde(default)]
    pub audit_written: u64,
    #[serde(default)]
    pub audit_dropped: u64,
}

/// One hook's link, as the kernel reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LinkAttached {
    pub hook: String,
    pub attached: bool,
}

impl KernelCounters {
    /// The gateway hooks the kernel reports as not attached at the last check.
    pub fn gateway_not_attached(&self) -> Vec<&str> {
        self.gateway_links
            .iter()
            .filter(|l| !l.attached)
            .map(|l| l.hook.as_str())
            .collect()
    }
}

impl KernelCounters {
    /// Prometheus text exposition format.
    pub fn render(&self) -> String {
        let mut out = String::new();
        family(
            &mut out,
            "moat_kernel_connect_total",
            "Connections and unconnected sends judged by the gateway host's hooks.",
            &self.gateway,
            ("allowed", "denied"),
        );
        lost(
            &mut out,
            "moat_kernel_deny_events_lost_total",
            self.gateway_events_lost,
        );
        family(
            &mut out,
            "moat_kernel_ingress_packets_total",
            "Packets to the model ports judged by the inference host's guard.",
            &self.inference,
            ("allowed", "dropped"),
        );
        lost(
            &mut out,
            "moat_kernel_ingress_deny_events_lost_total",
            self.inference_events_lost,
        );
        if !self.gateway_links.is_empty() {
            let name = "moat_kernel_link_attached";
            let _ = writeln!(
                out,
                "# HELP {name} 1 when the kernel reports the hook's link attached (checked every few seconds).\n# TYPE {name} gauge"
            );
            for l in &self.gateway_links {
                let _ = writeln!(
                    out,
                    "{name}{{hook=\"{}\"}} {}",
                    l.hook,
                    u8::from(l.attached)
                );
            }
        }
        out
    }
}

fn family(out: &mut String, name: &str, help: &str, hooks: &[HookCount], verdicts: (&str, &str)) {
    if hooks.is_empty() {
        return;
    }
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    for h in hooks {
        let _ = writeln!(
            out,
            "{name}{{hook=\"{}\",verdict=\"{}\"}} {}",
            h.hook, verdicts.0, h.allowed
        );
        let _ = writeln!(
            out,
            "{name}{{hook=\"{}\",verdict=\"{}\"}} {}",
            h.hook, verdicts.1, h.denied
        );
    }
}

fn lost(out: &mut String, name: &str, value: u64) {
    let _ = writeln!(
        out,
        "# HELP {name} Deny events the ring buffer had no room for.\n# TYPE {name} counter\n{name} {value}"
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_prometheus_text() {
        let c = KernelCounters {
            gateway: vec![HookCount {
                hook: "connect4".into(),
                allowed: 7,
                denied: 2,
            }],
            gateway_events_lost: 1,
            gateway_links: vec![LinkAttached {
                hook: "connect4".into(),
                attached: false,
            }],
            ..Default::default()
        };
        let text = c.render();
        assert!(text.contains("# TYPE moat_kernel_link_attached gauge"));
        assert!(text.contains("moat_kernel_link_attached{hook=\"connect4\"} 0"));
        assert!(text.contains("# TYPE moat_kernel_connect_total counter"));
        assert!(
            text.contains("moat_kernel_connect_total{hook=\"connect4\",verdict=\"allowed\"} 7")
        );
        assert!(text.contains("moat_kernel_connect_total{hook=\"connect4\",verdict=\"denied\"} 2"));
        assert!(text.contains("moat_kernel_deny_events_lost_total 1"));
        assert!(
            !text.contains("ingress_packets"),
            "no guard, no guard family"
        );
    }
}
