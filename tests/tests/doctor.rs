//! `moat doctor` as root on this machine: every fact it reports is checked against the
//! machine itself, the hook checks really attach (and leave nothing behind), and what is
//! attached now comes from the pins.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Output},
};

use moat::{cgroup, config::Config, segment::inference::Guard};
use moat_tests::{
    bin,
    kernel::{TestPins, require_root},
    netns::PortReservation,
};
use serde_json::Value;

fn doctor(cfg: &Path, json: bool) -> (Output, u32) {
    let mut cmd = Command::new(bin("moat"));
    cmd.arg("doctor").arg("-c").arg(cfg);
    if json {
        cmd.arg("--json");
    }
    let child = cmd
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("run moat doctor");
    let pid = child.id();
    (child.wait_with_output().unwrap(), pid)
}

/// The versions Cargo.lock pins for the given crates.
fn locked_versions(names: &[&str]) -> BTreeMap<String, String> {
    let lock = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../Cargo.lock"))
        .unwrap();
    let mut out = BTreeMap::new();
    for block in lock.split("[[package]]").skip(1) {
        let field = |k: &str| {
            block
                .lines()
                .find_map(|l| l.strip_prefix(&format!("{k} = \"")))
                .map(|v| v.trim_end_matches('"').to_owned())
        };
        if let (Some(n), Some(v)) = (field("name"), field("version"))
            && names.contains(&n.as_str())
        {
            out.insert(n, v);
        }
    }
    out
}

#[test]
fn doctor_reports_the_facts_of_this_machine() {
    require_root();
    let model = PortReservation::new();
    let pins = TestPins::new();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("moat.toml");
    let guard_toml = format!(
        "[segmentation.inference]\nmodel_ports = [{}]\nallowed_gateways = []\n",
        model.port
    );
    std::fs::write(
        &cfg,
        format!(
            "[server]\ndata_dir = \"data\"\nuser = \"moat-test-no-such-user\"\n\
             [segmentation]\npin_root = \"{}\"\n{guard_toml}",
            pins.root.display()
        ),
    )
    .unwrap();
    // Something attached for doctor to find: the guard on a port this test reserved.
    let config = Config::load(&cfg).unwrap();
    let _guard = Guard::install_or_adopt(&pins.pins, config.inference.as_ref().unwrap()).unwrap();

    let (out, pid) = doctor(&cfg, true);
    assert!(
        out.status.success(),
        "doctor failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();

    assert_eq!(r["moat_version"], env!("CARGO_PKG_VERSION"));
    let deps = locked_versions(&["aya", "axum", "tokio"]);
    assert_eq!(deps.len(), 3, "{deps:?}");
    for (name, version) in &deps {
        assert_eq!(r["dependencies"][name], version.as_str(), "{name}");
    }
    assert!(r["ebpf_object_bytes"].as_u64().unwrap() > 0);
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
    assert_eq!(r["kernel"], release.trim());
    assert_eq!(
        r["btf"]["present"],
        Path::new("/sys/kernel/btf/vmlinux").exists()
    );
    assert_eq!(
        r["cgroup2_mount"],
        cgroup::cgroup2_mount().unwrap().display().to_string()
    );
    assert!(
        r["bpffs_mounts"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m == "/sys/fs/bpf"),
        "{}",
        r["bpffs_mounts"]
    );
    assert_eq!(r["running_as_root"], true);
    assert_eq!(r["config"]["path"], cfg.display().to_string());
    assert_eq!(r["config"]["valid"], true);
    assert_eq!(
        PathBuf::from(r["config"]["data_dir"].as_str().unwrap()),
        dir.path().join("data")
    );
    assert_eq!(r["service_user"]["name"], "moat-test-no-such-user");
    assert_eq!(r["service_user"]["exists"], false);
    let seg = &r["segmentation"];
    assert_eq!(seg["mode"], "enforce");
    assert_eq!(seg["off"], false);
    assert_eq!(
        seg["gateway"], false,
        "an inference host runs no gateway side"
    );
    assert!(
        seg["inference_guard"]
            .as_str()
            .unwrap()
            .contains("cgroup_skb")
    );
    assert_eq!(seg["pin_root"], pins.root.display().to_string());

    let hooks: BTreeMap<String, &Value> = r["hooks"]
        .as_array()
        .unwrap()
        .iter()
        .map(|h| (h["program"].as_str().unwrap().to_owned(), h))
        .collect();
    assert_eq!(
        hooks.keys().map(String::as_str).collect::<Vec<_>>(),
        [
            "bpffs_pin",
            "cgroup_egress",
            "connect4",
            "connect6",
            "guard_cgroup_skb",
            "guard_tc",
            "sendmsg4",
            "sendmsg6"
        ]
    );
    for (name, h) in &hooks {
        assert_eq!(h["can_attach"], true, "{name}: {}", h["error"]);
    }
    assert_eq!(hooks["guard_cgroup_skb"]["required"], true);
    assert_eq!(hooks["guard_tc"]["required"], false);
    assert_eq!(hooks["connect4"]["required"], false);
    assert_eq!(hooks["cgroup_egress"]["required"], false);

    let attached = &r["attached"];
    assert_eq!(attached["installed"], false, "no gateway side pinned");
    assert_eq!(attached["inference"]["installed"], true);
    assert_eq!(
        attached["inference"]["links"][0]["attachment"],
        "cgroup_skb"
    );
    assert_eq!(
        attached["inference"]["model_ports"],
        serde_json::json!([model.port])
    );
    assert_eq!(r["ok"], true, "{}", r["problems"]);

    // The throw-away cgroup and pin directory are gone again.
    let scratch = format!("moat-doctor-{pid}");
    assert!(!cgroup::cgroup2_mount().unwrap().join(&scratch).exists());
    assert!(!Path::new("/sys/fs/bpf").join(&scratch).exists());
}

#[test]
fn doctor_says_when_segmentation_is_off_and_when_the_config_is_broken() {
    require_root();
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("moat.toml");
    std::fs::write(
        &cfg,
        "[server]\nuser = \"root\"\n[segmentation]\nmode = \"off\"\n",
    )
    .unwrap();
    let (out, _) = doctor(&cfg, true);
    assert!(out.status.success());
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["segmentation"]["mode"], "off");
    assert_eq!(r["segmentation"]["off"], true);
    assert_eq!(r["service_user"]["exists"], true);
    assert_eq!(r["service_user"]["uid"], 0);
    assert!(
        r["hooks"]
            .as_array()
            .unwrap()
            .iter()
            .all(|h| h["required"] == false),
        "nothing is required with segmentation off"
    );
    let (human, _) = doctor(&cfg, false);
    let text = String::from_utf8_lossy(&human.stdout);
    assert!(text.contains("OFF — the kernel enforces nothing"), "{text}");

    std::fs::write(&cfg, "[segmentation.inference]\nmodel_ports = [0]\n").unwrap();
    let (out, _) = doctor(&cfg, true);
    assert!(!out.status.success(), "a broken config is a problem");
    let r: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(r["config"]["valid"], false);
    assert!(
        r["config"]["error"]
            .as_str()
            .unwrap()
            .contains("segmentation.inference.model_ports[0]"),
        "{}",
        r["config"]["error"]
    );
    assert_eq!(r["ok"], false);
}

/// The commands `dist/moat.service` runs exist and accept the unit's arguments: its
/// `ExecStartPre=` (config check) passes on the example inference-host config, and `moat serve`
/// takes `--config`.
#[test]
fn systemd_unit_commands_are_valid() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let unit = std::fs::read_to_string(root.join("dist/moat.service")).unwrap();
    let dropin =
        std::fs::read_to_string(root.join("dist/model-server.requires-moat.conf")).unwrap();
    assert!(unit.contains("\nBefore=model-server.service\n"));
    assert!(
        dropin.contains("\nRequires=moat.service\n") && dropin.contains("\nAfter=moat.service\n")
    );
    let example = root.join("examples/inference-host.toml");
    let mut seen = 0;
    for line in unit.lines() {
        let Some(cmd) = line
            .strip_prefix("ExecStartPre=")
            .or_else(|| line.strip_prefix("ExecStart="))
        else {
            continue;
        };
        let mut args: Vec<&str> = cmd.split_whitespace().collect();
        assert_eq!(args.remove(0), "/usr/local/bin/moat", "{line}");
        let mut c = Command::new(bin("moat"));
        for a in &args {
            if *a == "/etc/moat/moat.toml" {
                c.arg(&example);
            } else {
                c.arg(a);
            }
        }
        if args[0] == "serve" {
            c.arg("--help");
        }
        let out = c.output().unwrap();
        assert!(
            out.status.success(),
            "{line}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        seen += 1;
    }
    assert_eq!(seen, 2, "ExecStartPre= and ExecStart=");
}
