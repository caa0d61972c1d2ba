//! The attack surface, component by component, with the controls and the tests that cover
//! them (the same table as docs/threat-model.md, which explains each in full).

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Component {
    pub component: &'static str,
    pub exposed_to: &'static str,
    pub controls: &'static [&'static str],
    pub tests: &'static [&'static str],
}

pub const SURFACE: &[Component] = &[
    Component {
        component: "data plane (worker, `server.listen`)",
        exposed_to: "clients on the network: HTTP/1.1 and HTTP/2, OpenAI-shaped JSON",
        controls: &[
            "bearer required on every inference route (API key, access token)",
            "body size cap before parsing; strict request schemas; per-model limits",
            "authorization per model/provider; quotas per key and tenant",
            "worker: unprivileged service user, no capabilities, seccomp deny-list, non-dumpable",
        ],
        tests: &[
            "tests/dataplane.rs",
            "tests/dataplane_hardening.rs",
            "tests/authz.rs",
            "tests/auth_hardening.rs",
            "tests/privsep.rs",
        ],
    },
    Component {
        component: "admin plane (worker, `admin.listen`)",
        exposed_to: "loopback only (validated): operators' tools",
        controls: &[
            "a permission per route (`admin:*`, `audit:read`); tenant-scoped",
            "grants bounded by the caller's own permissions; global permissions only from the root CLI",
            "every change recorded in the audit log with its actor",
        ],
        tests: &[
            "tests/admin_grants.rs",
            "tests/identity.rs",
            "tests/audit.rs",
        ],
    },
    Component {
        component: "supervisor (root)",
        exposed_to: "no network port; the worker over a Unix socket pair; SIGHUP",
        controls: &[
            "control messages are typed JSON; a refused config changes nothing",
            "the worker's audit events are marked as the worker's; the supervisor assigns sequence and HMAC",
            "restart with back-off; reload applies kernel and worker together or not at all",
        ],
        tests: &[
            "tests/daemon.rs",
            "tests/reload.rs",
            "tests/startup.rs",
            "tests/audit.rs",
        ],
    },
    Component {
        component: "worker (service user)",
        exposed_to: "everything the data and admin planes receive",
        controls: &[
            "no write access to the audit log, the audit key or the kernel pins",
            "no capabilities, RLIMIT_CORE 0, PR_SET_DUMPABLE 0, seccomp, cgroup of its own",
            "egress limited by the kernel to the configured destinations",
        ],
        tests: &["tests/privsep.rs", "tests/hooks.rs", "tests/audit.rs"],
    },
    Component {
        component: "kernel programs (cgroup connect/sendmsg hooks, inference guard)",
        exposed_to: "every process's connect()/sendmsg(); packets to the model ports",
        controls: &[
            "protected set derived from the config; only the gateway cgroup may reach it",
            "pinned under root-only bpffs paths; deny events rate-limited into the log and audit log",
        ],
        tests: &[
            "tests/segment.rs",
            "tests/hooks.rs",
            "tests/inference.rs",
            "tests/deny_log.rs",
        ],
    },
    Component {
        component: "store and secrets (data directory)",
        exposed_to: "local users of the host",
        controls: &[
            "0700 directory, 0600 files, never through a link; owner checked",
            "API keys and refresh tokens stored as HMAC-SHA256 under a pepper kept outside the database",
            "passwords as Argon2id; signing keys rotated",
        ],
        tests: &[
            "tests/identity.rs",
            "tests/auth_hardening.rs",
            "tests/audit.rs",
        ],
    },
    Component {
        component: "inference hosts (pools)",
        exposed_to: "the gateway only (kernel-enforced), other hosts per the guard",
        controls: &[
            "inference guard drops packets to model ports from other sources",
            "TLS / mutual TLS to the hosts; credentials injected by the gateway, never from clients",
        ],
        tests: &[
            "tests/inference.rs",
            "tests/three_hosts.rs",
            "tests/mtls.rs",
            "tests/dataplane_tls.rs",
        ],
    },
];
