//! `[segmentation]`: the destination rules (`egress_allow`, `extra_protected`, host names
//! resolved through the load's sources), the gateway cgroup and pin folder, and the
//! inference-host guard (`[segmentation.inference]`).

use std::path::Path;

use super::Invalid;
use crate::config::{
    DestinationRule, GuardAttach, InferenceGuard, InferenceGuardConfig, SegmentationConfig,
    capture::Reader, parse_destination, parse_source_prefix,
};

/// The checked parts of `[segmentation]`.
pub(in crate::config) struct Segmentation {
    pub egress_allow: Vec<DestinationRule>,
    pub extra_protected: Vec<DestinationRule>,
    pub inference: Option<InferenceGuard>,
}

pub(in crate::config) fn segmentation(
    seg: &SegmentationConfig,
    reader: &Reader<'_>,
) -> Result<Segmentation, Invalid> {
    let egress_allow = rules(&seg.egress_allow, "segmentation.egress_allow", reader)?;
    let extra_protected = rules(&seg.extra_protected, "segmentation.extra_protected", reader)?;
    cgroup_path(&seg.gateway_cgroup).map_err(|r| Invalid::new("segmentation.gateway_cgroup", r))?;
    if !seg.pin_root.is_absolute() {
        return Err(Invalid::new(
            "segmentation.pin_root",
            "must be an absolute path on a bpffs",
        ));
    }
    let inference = seg.inference.as_ref().map(guard).transpose()?;
    Ok(Segmentation {
        egress_allow,
        extra_protected,
        inference,
    })
}

/// A list of destination rules; host names resolve through `reader`.
fn rules(list: &[String], key: &str, reader: &Reader<'_>) -> Result<Vec<DestinationRule>, Invalid> {
    let mut out = Vec::new();
    for (i, entry) in list.iter().enumerate() {
        let parsed = parse_destination(entry, &mut |e: &str| reader.host(e));
        out.extend(parsed.map_err(|r| Invalid::new(format!("{key}[{i}]"), r))?);
    }
    Ok(out)
}

/// The cgroup path must stay below the cgroup2 mount: relative, no `..`, not empty.
fn cgroup_path(p: &Path) -> Result<(), String> {
    use std::path::Component;
    if p.as_os_str().is_empty() {
        return Err("must not be empty".into());
    }
    for c in p.components() {
        match c {
            Component::Normal(_) => {}
            _ => {
                return Err("must be a relative path below the cgroup2 mount, without `..`".into());
            }
        }
    }
    Ok(())
}

/// Checks `[segmentation.inference]`; errors carry the dotted key and the reason.
fn guard(g: &InferenceGuardConfig) -> Result<InferenceGuard, Invalid> {
    const KEY: &str = "segmentation.inference";
    let e = |k: &str, r: String| Invalid::new(format!("{KEY}.{k}"), r);
    if g.model_ports.is_empty() {
        return Err(e(
            "model_ports",
            "list at least one port (a guard without ports guards nothing)".into(),
        ));
    }
    let mut ports = Vec::new();
    for (i, &p) in g.model_ports.iter().enumerate() {
        if p == 0 {
            return Err(e(
                &format!("model_ports[{i}]"),
                "port 0 is not a port".into(),
            ));
        }
        if ports.contains(&p) {
            return Err(e(
                &format!("model_ports[{i}]"),
                format!("port {p} is listed twice"),
            ));
        }
        ports.push(p);
    }
    // One entry of the kernel's port map is the "guards something" marker.
    let max_ports = moat_common::guard::MAX_PORTS as usize - 1;
    if ports.len() > max_ports {
        return Err(e("model_ports", format!("at most {max_ports} ports")));
    }
    let mut allowed = Vec::new();
    for (i, entry) in g.allowed_gateways.iter().enumerate() {
        let net =
            parse_source_prefix(entry).map_err(|r| e(&format!("allowed_gateways[{i}]"), r))?;
        if !allowed.contains(&net) {
            allowed.push(net);
        }
    }
    if ports.len() * allowed.len() > moat_common::guard::MAX_SOURCES as usize {
        return Err(e(
            "allowed_gateways",
            format!(
                "ports × prefixes must stay within {}",
                moat_common::guard::MAX_SOURCES
            ),
        ));
    }
    let needs_interfaces = matches!(g.attach, GuardAttach::Tc | GuardAttach::Both);
    if needs_interfaces && g.interfaces.is_empty() {
        return Err(e(
            "interfaces",
            "attach = \"tc\" or \"both\" needs at least one interface".into(),
        ));
    }
    if !needs_interfaces && !g.interfaces.is_empty() {
        return Err(e(
            "interfaces",
            "interfaces are only used with attach = \"tc\" or \"both\"".into(),
        ));
    }
    let mut interfaces: Vec<String> = Vec::new();
    for (i, name) in g.interfaces.iter().enumerate() {
        // IFNAMSIZ is 16 with the NUL; a name is also a file name under the pin directory.
        if name.is_empty()
            || name.len() > 15
            || name.contains(['/', ' ', ':'])
            || name == "."
            || name == ".."
        {
            return Err(e(
                &format!("interfaces[{i}]"),
                format!("`{name}` is not an interface name"),
            ));
        }
        if interfaces.contains(name) {
            return Err(e(
                &format!("interfaces[{i}]"),
                format!("`{name}` is listed twice"),
            ));
        }
        interfaces.push(name.clone());
    }
    Ok(InferenceGuard {
        model_ports: ports,
        allowed,
        attach: g.attach,
        interfaces,
    })
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::tests::load;

    #[test]
    fn cgroup_path_must_stay_below_the_mount() {
        let e = load("[segmentation]\ngateway_cgroup = \"../escape\"\n").unwrap_err();
        assert_eq!(e.key, "segmentation.gateway_cgroup");
        let e = load("[segmentation]\ngateway_cgroup = \"/abs\"\n").unwrap_err();
        assert_eq!(e.key, "segmentation.gateway_cgroup");
    }

    #[test]
    fn destination_rules_name_their_entry() {
        let c = load("[segmentation]\negress_allow = [\"10.0.0.0/8:443\"]\n").unwrap();
        assert_eq!(c.egress_allow.len(), 1);
        let e = load("[segmentation]\nextra_protected = [\"10.0.0.1:1\", \"x\"]\n").unwrap_err();
        assert_eq!(e.key, "segmentation.extra_protected[1]");
        let e = load("[segmentation]\npin_root = \"pins\"\n").unwrap_err();
        assert_eq!(e.key, "segmentation.pin_root");
    }

    #[test]
    fn inference_guard_parses_and_defaults() {
        let c = load(
            "[segmentation.inference]\nmodel_ports = [8000, 8001]\n\
             allowed_gateways = [\"10.0.0.1\", \"10.9.0.0/16\", \"fd00::/64\", \"::ffff:10.1.1.1\"]\n",
        )
        .unwrap();
        let g = c.inference.as_ref().unwrap();
        assert_eq!(g.model_ports, [8000, 8001]);
        assert_eq!(g.attach, GuardAttach::CgroupSkb);
        let allowed: Vec<String> = g.allowed.iter().map(|n| n.to_string()).collect();
        assert_eq!(
            allowed,
            ["10.0.0.1/32", "10.9.0.0/16", "fd00::/64", "10.1.1.1/32"]
        );
        assert!(
            !c.runs_gateway(),
            "an inference host without pools runs the guard only"
        );
        assert_eq!(c.server().user, "moat");
        let both = load(
            "[pools.a]\nhosts = [\"127.0.0.1:1\"]\n[segmentation.inference]\nmodel_ports = [1]\n",
        )
        .unwrap();
        assert!(both.runs_gateway() && both.inference.is_some());
        assert!(load("").unwrap().runs_gateway());
    }

    #[test]
    fn inference_guard_errors_name_the_key() {
        let cases = [
            ("model_ports = []\n", "segmentation.inference.model_ports"),
            (
                "model_ports = [0]\n",
                "segmentation.inference.model_ports[0]",
            ),
            (
                "model_ports = [1, 1]\n",
                "segmentation.inference.model_ports[1]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"gw.example\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"10.0.0.0/33\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nallowed_gateways = [\"::ffff:0.0.0.0/80\"]\n",
                "segmentation.inference.allowed_gateways[0]",
            ),
            (
                "model_ports = [1]\nattach = \"tc\"\n",
                "segmentation.inference.interfaces",
            ),
            (
                "model_ports = [1]\ninterfaces = [\"eth0\"]\n",
                "segmentation.inference.interfaces",
            ),
            (
                "model_ports = [1]\nattach = \"tc\"\ninterfaces = [\"../x\"]\n",
                "segmentation.inference.interfaces[0]",
            ),
            (
                "model_ports = [1]\nattach = \"xdp\"\n",
                "segmentation.inference.attach",
            ),
            (
                "model_ports = [1]\nbogus = 1\n",
                "segmentation.inference.bogus",
            ),
            (
                "model_ports = [70000]\n",
                "segmentation.inference.model_ports[0]",
            ),
        ];
        for (body, key) in cases {
            let e = load(&format!("[segmentation.inference]\n{body}")).unwrap_err();
            assert_eq!(e.key, key, "{body}: {e}");
            assert_eq!(e.file, Path::new("/etc/moat/test.toml"));
            assert!(!e.reason.is_empty());
        }
    }
}
