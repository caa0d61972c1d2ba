//! The gateway host's connect hooks against the ways to open a flow that are not a plain
//! `connect()` (root required; never skipped): TCP Fast Open (`sendto(MSG_FASTOPEN)`, which
//! connects without `connect()`) and connected UDP (`connect()` then `send()` with no address,
//! which no sendmsg hook sees).
//!
//! Each test attaches its own programs under its own pin root and protects only ports of
//! listeners it opened itself.

use std::net::SocketAddr;

use moat::segment::Enforcer;
use moat_tests::kernel::{
    self, EPERM, TestCgroup, TestPins, policy_for, require_root, try_from, unique,
};

/// A dual-stack listener (a TFO client's data then has somewhere to go).
fn listener() -> u16 {
    kernel::listener("[::]:0").port()
}

fn addr(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

/// TCP Fast Open and connected UDP to a pool host: `EPERM` for a process outside the gateway
/// cgroup, through for the gateway; the gateway's egress lockdown refuses both to anything
/// else. Controls: the same calls to an unprotected port go through for the outsider, and
/// before the hooks are attached everything goes through.
#[test]
fn fast_open_and_connected_udp_meet_the_connect_hooks() {
    require_root();
    let protected = listener();
    let open = listener();
    let base = TestCgroup::new(unique("moat-test"));
    let gateway = base.child("gateway");
    let outsider = base.child("outsider");
    let pins = TestPins::new();
    let targets = [
        addr(&format!("127.0.0.1:{protected}")),
        addr(&format!("[::1]:{protected}")),
    ];
    let unprotected = [
        addr(&format!("127.0.0.1:{open}")),
        addr(&format!("[::1]:{open}")),
    ];
    let (out, gw) = (Some(outsider.path()), Some(gateway.path()));
    let actions = ["tfo", "udpc"];

    // Control: with no hooks, both kinds of call go through from anywhere (so a refusal below
    // is the hooks' doing, and `tfo` really completes here).
    for action in actions {
        assert_eq!(try_from(out, action, &targets), [0, 0], "{action} unhooked");
    }

    let toml = format!("[pools.gpu]\nhosts = [\"127.0.0.1:{protected}\", \"[::1]:{protected}\"]\n");
    let _enforcer = Enforcer::install_or_adopt(&pins.pins, &policy_for(&toml, &gateway)).unwrap();
    for action in actions {
        assert_eq!(
            try_from(out, action, &targets),
            [EPERM, EPERM],
            "{action} from outside the gateway cgroup"
        );
        assert_eq!(
            try_from(out, action, &unprotected),
            [0, 0],
            "{action} from outside to an unprotected port"
        );
        assert_eq!(
            try_from(gw, action, &targets),
            [0, 0],
            "{action} from the gateway cgroup"
        );
        assert_eq!(
            try_from(gw, action, &unprotected),
            [EPERM, EPERM],
            "{action} from the gateway to what its egress lockdown does not allow"
        );
    }
}
