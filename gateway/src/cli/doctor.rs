//! `moat doctor`: the facts an operator records when verifying an installation — kernel, BTF,
//! cgroup2 and bpffs mounts, which hooks can attach here (tried for real, in a throw-away
//! cgroup, network namespace and pin directory that are removed again), what is attached now
//! (from the pins), moat's version and its key dependencies, paths, the service user,
//! whether segmentation is off, and how each pool talks to its hosts (plain, TLS or mutual
//! TLS, with the client certificate's expiry: a warning from 30 days before).
//!
//! It changes nothing that exists: every probe works on objects it creates and removes itself.

use std::{
    collections::BTreeMap,
    fmt,
    fs::File,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, anyhow};
use aya::{
    Ebpf,
    programs::{CgroupAttachMode, CgroupSkb, CgroupSkbAttachType, CgroupSockAddr, SchedClassifier},
};
use moat_common::{Hook, guard::IngressHook};
use serde::Serialize;

use crate::{
    cgroup::{self, Cgroup},
    config::{Config, GuardAttach, SegmentationMode},
    segment,
};

/// Dependency versions from Cargo.lock, embedded by build.rs (`name=version,…`).
const DEPENDENCY_VERSIONS: &str = env!("MOAT_DEPENDENCY_VERSIONS");

#[derive(Debug, Serialize)]
pub struct Report {
    pub moat_version: &'static str,
    pub dependencies: BTreeMap<String, String>,
    /// Size of the embedded eBPF object (0: built without it).
    pub ebpf_object_bytes: usize,
    pub kernel: Option<String>,
    pub btf: Btf,
    pub cgroup2_mount: Option<String>,
    pub bpffs_mounts: Vec<String>,
    pub running_as_root: bool,
    pub config: ConfigFacts,
    pub service_user: ServiceUser,
    pub segmentation: SegmentationFacts,
    /// Each hook type moat uses, loaded and attached for real, then detached.
    pub hooks: Vec<HookCheck>,
    /// What moat has pinned now (`moat segment status`).
    pub attached: Option<segment::Status>,
    /// How each pool talks to its hosts.
    pub pools: Vec<PoolTls>,
    /// Worth acting on, but `moat serve` starts: a client certificate that expires within
    /// [`EXPIRY_WARNING_DAYS`] days (or has expired).
    pub warnings: Vec<String>,
    /// Everything that would stop `moat serve` from starting with this config.
    pub problems: Vec<String>,
    pub ok: bool,
}

#[derive(Debug, Serialize)]
pub struct Btf {
    pub path: &'static str,
    pub present: bool,
}

#[derive(Debug, Serialize)]
pub struct ConfigFacts {
    pub path: String,
    pub valid: bool,
    pub error: Option<String>,
    pub data_dir: Option<String>,
}

#[derive(Debug, Serialize)]
pub struct ServiceUser {
    /// `server.user` (default `moat`).
    pub name: Option<String>,
    pub exists: bool,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct SegmentationFacts {
    /// `enforce` or `off`.
    pub mode: Option<&'static str>,
    /// True when segmentation is off: the kernel protects nothing.
    pub off: bool,
    /// This host runs the gateway side (connect hooks, data plane).
    pub gateway: bool,
    /// This host runs the inference guard, and where it attaches.
    pub inference_guard: Option<String>,
    pub pin_root: Option<String>,
}

/// A client certificate this close to its end is reported.
pub const EXPIRY_WARNING_DAYS: i64 = 30;

#[derive(Debug, Serialize)]
pub struct PoolTls {
    pub pool: String,
    /// `plain`, `tls` (the hosts are authenticated) or `mtls` (the gateway too).
    pub mode: &'static str,
    pub client_cert_file: Option<String>,
    /// The client certificate's notAfter, RFC 3339.
    pub client_cert_expires: Option<String>,
    /// Whole days until then (negative: expired).
    pub client_cert_days_left: Option<i64>,
}

impl PoolTls {
    fn of(pool: &crate::config::Pool, now: i64) -> PoolTls {
        let cert = pool.tls_client.as_ref();
        PoolTls {
            pool: pool.name.clone(),
            mode: match (pool.tls, cert.is_some()) {
                (false, _) => "plain",
                (true, false) => "tls",
                (true, true) => "mtls",
            },
            client_cert_file: cert.map(|c| c.cert_file.display().to_string()),
            client_cert_expires: cert.map(|c| {
                time::OffsetDateTime::from_unix_timestamp(c.not_after)
                    .ok()
                    .and_then(|t| {
                        t.format(&time::format_description::well_known::Rfc3339)
                            .ok()
                    })
                    .unwrap_or_else(|| c.not_after.to_string())
            }),
            client_cert_days_left: cert.map(|c| (c.not_after - now).div_euclid(86_400)),
        }
    }

    /// The warning for a certificate near or past its end.
    fn warning(&self) -> Option<String> {
        let (days, file) = (self.client_cert_days_left?, self.client_cert_file.as_ref()?);
        let until = self.client_cert_expires.as_deref().unwrap_or("?");
        if days < 0 {
            Some(format!(
                "pools.{}: the client certificate {file} expired on {until}; model servers that \
                 require it refuse the gateway (rotate it: `moat certs init`, then SIGHUP)",
                self.pool
            ))
        } else if days < EXPIRY_WARNING_DAYS {
            Some(format!(
                "pools.{}: the client certificate {file} expires in {days} day(s), on {until}: \
                 rotate it and send SIGHUP",
                self.pool
            ))
        } else {
            None
        }
    }
}

#[derive(Debug, Serialize)]
pub struct HookCheck {
    /// Program name in moat's eBPF object.
    pub program: &'static str,
    /// Hook type and attach point tried.
    pub hook: &'static str,
    pub can_attach: bool,
    pub error: Option<String>,
    /// Whether the loaded config needs this hook.
    pub required: bool,
}

/// Gathers the report. `config_path` need not load: a broken config is reported, not fatal.
pub fn run(config_path: &Path) -> Report {
    let config = Config::load(config_path);
    let root = nix::unistd::geteuid().is_root();
    let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
    let bpffs_mounts: Vec<String> = mounts
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.get(2) == Some(&"bpf")).then(|| f[1].to_owned())
        })
        .collect();
    let cfg = config.as_ref().ok();
    let (mode, runs_gateway, guard) = match cfg {
        Some(c) => (
            Some(c.segmentation().mode),
            c.runs_gateway(),
            c.inference.as_ref(),
        ),
        None => (None, true, None),
    };
    let enforce = mode == Some(SegmentationMode::Enforce);
    let user_name = cfg.map(|c| c.server().user.clone());
    let user = user_name
        .as_deref()
        .and_then(|n| nix::unistd::User::from_name(n).ok().flatten());

    let mut problems = Vec::new();
    if let Err(e) = &config {
        problems.push(format!("config: {e}"));
    }
    let hooks = if root {
        probe_hooks(&bpffs_mounts)
    } else {
        problems.push("not root: hook checks skipped (run `sudo moat doctor`)".into());
        Vec::new()
    };
    let hooks: Vec<HookCheck> = hooks
        .into_iter()
        .map(|mut h| {
            h.required = enforce
                && match h.program {
                    "guard_cgroup_skb" => guard.is_some_and(|g| g.attach != GuardAttach::Tc),
                    "guard_tc" => guard.is_some_and(|g| g.attach != GuardAttach::CgroupSkb),
                    "bpffs_pin" => runs_gateway || guard.is_some(),
                    _ => runs_gateway,
                };
            if h.required && !h.can_attach {
                problems.push(format!(
                    "{} ({}) cannot attach: {}",
                    h.program,
                    h.hook,
                    h.error.as_deref().unwrap_or("unknown error")
                ));
            }
            h
        })
        .collect();
    let attached =
        cfg.and_then(|c| segment::status(&segment::Pins::new(&c.segmentation().pin_root)).ok());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    let pools: Vec<PoolTls> = cfg
        .map(|c| c.pools.values().map(|p| PoolTls::of(p, now)).collect())
        .unwrap_or_default();
    let warnings = pools.iter().filter_map(PoolTls::warning).collect();

    Report {
        moat_version: env!("CARGO_PKG_VERSION"),
        dependencies: DEPENDENCY_VERSIONS
            .split(',')
            .filter_map(|kv| kv.split_once('='))
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect(),
        ebpf_object_bytes: segment::object_len(),
        kernel: std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .ok()
            .map(|s| s.trim().to_owned()),
        btf: Btf {
            path: "/sys/kernel/btf/vmlinux",
            present: Path::new("/sys/kernel/btf/vmlinux").exists(),
        },
        cgroup2_mount: cgroup::cgroup2_mount()
            .ok()
            .map(|p| p.display().to_string()),
        bpffs_mounts,
        running_as_root: root,
        config: ConfigFacts {
            path: config
                .as_ref()
                .map(|c| c.path.clone())
                .unwrap_or_else(|_| config_path.to_path_buf())
                .display()
                .to_string(),
            valid: config.is_ok(),
            error: config.as_ref().err().map(|e| e.to_string()),
            data_dir: cfg.map(|c| c.data_dir.display().to_string()),
        },
        service_user: ServiceUser {
            exists: user.is_some(),
            uid: user.as_ref().map(|u| u.uid.as_raw()),
            gid: user.as_ref().map(|u| u.gid.as_raw()),
            name: user_name,
        },
        segmentation: SegmentationFacts {
            mode: mode.map(|m| match m {
                SegmentationMode::Enforce => "enforce",
                SegmentationMode::Off => "off",
            }),
            off: mode == Some(SegmentationMode::Off),
            gateway: cfg.is_some() && runs_gateway,
            inference_guard: guard.map(|g| {
                let at: Vec<String> = segment::inference::Attachment::wanted(g)
                    .iter()
                    .map(|a| a.to_string())
                    .collect();
                at.join("; ")
            }),
            pin_root: cfg.map(|c| c.segmentation().pin_root.display().to_string()),
        },
        hooks,
        attached,
        pools,
        warnings,
        ok: problems.is_empty(),
        problems,
    }
}

/// Loads and attaches every program type moat uses into throw-away attach points, then
/// detaches: a cgroup of its own for the cgroup hooks, `lo` of a new network namespace for
/// TC (tcx, or a clsact filter before Linux 6.6), a directory of its own on the bpffs for
/// pinning.
fn probe_hooks(bpffs_mounts: &[String]) -> Vec<HookCheck> {
    let mut out = Vec::new();
    let check = |program: &'static str, hook: &'static str, r: Result<()>| HookCheck {
        program,
        hook,
        can_attach: r.is_ok(),
        error: r.err().map(|e| format!("{e:#}")),
        required: false,
    };
    let scratch = PathBuf::from(format!("moat-doctor-{}", std::process::id()));
    let cg = Cgroup::ensure(&scratch);
    let mut bpf = segment::object().and_then(|o| Ok(Ebpf::load(o)?));
    for hook in Hook::SOCK_ADDR {
        let r = match (&cg, &mut bpf) {
            (Ok(cg), Ok(bpf)) => attach_sock_addr(bpf, hook.program_name(), &cg.path),
            (Err(e), _) => Err(anyhow!("{e:#}")),
            (_, Err(e)) => Err(anyhow!("{e:#}")),
        };
        out.push(check(
            hook.program_name(),
            "cgroup_sock_addr (cgroup2 root on serve)",
            r,
        ));
    }
    let r = match (&cg, &mut bpf) {
        (Ok(cg), Ok(bpf)) => attach_cgroup_skb(
            bpf,
            Hook::Egress.program_name(),
            CgroupSkbAttachType::Egress,
            &cg.path,
        ),
        (Err(e), _) => Err(anyhow!("{e:#}")),
        (_, Err(e)) => Err(anyhow!("{e:#}")),
    };
    out.push(check(
        Hook::Egress.program_name(),
        "cgroup_skb egress (cgroup2 root on serve)",
        r,
    ));
    let r = match (&cg, &mut bpf) {
        (Ok(cg), Ok(bpf)) => attach_cgroup_skb(
            bpf,
            IngressHook::CgroupSkb.program_name(),
            CgroupSkbAttachType::Ingress,
            &cg.path,
        ),
        (Err(e), _) => Err(anyhow!("{e:#}")),
        (_, Err(e)) => Err(anyhow!("{e:#}")),
    };
    out.push(check(
        IngressHook::CgroupSkb.program_name(),
        "cgroup_skb ingress (cgroup2 root on serve)",
        r,
    ));
    if let Ok(cg) = &cg {
        let _ = cg.remove();
    }
    let r = std::thread::spawn(attach_tc_in_scratch_netns)
        .join()
        .unwrap_or_else(|_| Err(anyhow!("the tc probe panicked")));
    out.push(check(
        IngressHook::Tc.program_name(),
        match segment::tc::TcMode::of_kernel() {
            segment::tc::TcMode::Tcx => "tc ingress as a tcx link",
            segment::tc::TcMode::Netlink => {
                "tc ingress as a clsact qdisc filter via netlink (no tcx before Linux 6.6)"
            }
        },
        r,
    ));
    let r = match &mut bpf {
        Ok(bpf) => pin_in_scratch_dir(bpf, bpffs_mounts),
        Err(e) => Err(anyhow!("{e:#}")),
    };
    out.push(check("bpffs_pin", "pin a map on the bpffs", r));
    out
}

fn attach_sock_addr(bpf: &mut Ebpf, name: &str, cgroup: &Path) -> Result<()> {
    let prog: &mut CgroupSockAddr = bpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    prog.load().context("load")?;
    let id = prog
        .attach(File::open(cgroup)?, CgroupAttachMode::Single)
        .context("attach")?;
    prog.detach(id).context("detach")?;
    Ok(())
}

fn attach_cgroup_skb(
    bpf: &mut Ebpf,
    name: &str,
    attach_type: CgroupSkbAttachType,
    cgroup: &Path,
) -> Result<()> {
    let prog: &mut CgroupSkb = bpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    prog.load().context("load")?;
    let id = prog
        .attach(File::open(cgroup)?, attach_type, CgroupAttachMode::Single)
        .context("attach")?;
    prog.detach(id).context("detach")?;
    Ok(())
}

/// Runs on a thread of its own: the thread leaves for a new, empty network namespace (only
/// `lo`, down), which vanishes with the thread.
fn attach_tc_in_scratch_netns() -> Result<()> {
    nix::sched::unshare(nix::sched::CloneFlags::CLONE_NEWNET)
        .context("cannot create a scratch network namespace")?;
    let mut bpf = Ebpf::load(segment::object()?)?;
    let name = IngressHook::Tc.program_name();
    let prog: &mut SchedClassifier = bpf
        .program_mut(name)
        .with_context(|| format!("no program {name}"))?
        .try_into()?;
    prog.load().context("load")?;
    // The way `serve` attaches: tcx, or a clsact filter on kernels without tcx. Both vanish
    // with the scratch namespace.
    segment::tc::attach(prog, "lo").context("attach")?;
    Ok(())
}

fn pin_in_scratch_dir(bpf: &mut Ebpf, bpffs_mounts: &[String]) -> Result<()> {
    let mount = bpffs_mounts
        .iter()
        .find(|m| m.as_str() == "/sys/fs/bpf")
        .or(bpffs_mounts.first())
        .context("no bpffs is mounted (moat mounts /sys/fs/bpf itself when it starts)")?;
    let dir = Path::new(mount).join(format!("moat-doctor-{}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    let pin = dir.join("map");
    let r = bpf
        .map(moat_common::guard::names::MAP_COUNTERS)
        .context("no map to pin")
        .and_then(|m| Ok(m.pin(&pin)?));
    let _ = std::fs::remove_file(&pin);
    let _ = std::fs::remove_dir(&dir);
    r
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let yes = |b: bool| if b { "yes" } else { "no" };
        let opt = |o: &Option<String>| o.clone().unwrap_or_else(|| "-".into());
        writeln!(f, "moat {}", self.moat_version)?;
        let deps: Vec<String> = self
            .dependencies
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        writeln!(f, "dependencies:    {}", deps.join(", "))?;
        writeln!(
            f,
            "eBPF object:     {}",
            if self.ebpf_object_bytes == 0 {
                "MISSING (built without `cargo xtask build`)".to_owned()
            } else {
                format!("embedded, {} bytes", self.ebpf_object_bytes)
            }
        )?;
        writeln!(f, "kernel:          {}", opt(&self.kernel))?;
        writeln!(
            f,
            "BTF:             {} ({})",
            yes(self.btf.present),
            self.btf.path
        )?;
        writeln!(f, "cgroup2 mount:   {}", opt(&self.cgroup2_mount))?;
        writeln!(f, "bpffs mounts:    {}", self.bpffs_mounts.join(", "))?;
        writeln!(f, "running as root: {}", yes(self.running_as_root))?;
        writeln!(
            f,
            "config:          {} ({})",
            self.config.path,
            if self.config.valid {
                "valid"
            } else {
                "INVALID"
            }
        )?;
        if let Some(e) = &self.config.error {
            writeln!(f, "  {e}")?;
        }
        writeln!(f, "data directory:  {}", opt(&self.config.data_dir))?;
        writeln!(
            f,
            "service user:    {} ({})",
            opt(&self.service_user.name),
            match self.service_user.uid {
                Some(uid) => format!("uid {uid}, gid {}", self.service_user.gid.unwrap_or(0)),
                None => "does not exist yet".into(),
            }
        )?;
        let s = &self.segmentation;
        writeln!(
            f,
            "segmentation:    {}",
            match s.mode {
                Some("off") => "OFF — the kernel enforces nothing".to_owned(),
                Some(m) => m.to_owned(),
                None => "-".to_owned(),
            }
        )?;
        writeln!(f, "  gateway side:    {}", yes(s.gateway))?;
        writeln!(
            f,
            "  inference guard: {}",
            s.inference_guard.as_deref().unwrap_or("no")
        )?;
        writeln!(f, "  pin root:        {}", opt(&s.pin_root))?;
        writeln!(f, "hooks (loaded, attached and detached again here):")?;
        for h in &self.hooks {
            writeln!(
                f,
                "  {:<17} {:<44} {}{}",
                h.program,
                h.hook,
                if h.can_attach { "ok" } else { "FAILS" },
                h.error
                    .as_ref()
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default()
            )?;
        }
        match &self.attached {
            Some(status) => {
                writeln!(f, "attached now:")?;
                for line in status.to_string().lines() {
                    writeln!(f, "  {line}")?;
                }
            }
            None => writeln!(f, "attached now: unknown (no valid config)")?,
        }
        if !self.pools.is_empty() {
            writeln!(f, "pools (TLS to the hosts):")?;
        }
        for p in &self.pools {
            write!(f, "  {:<17} {}", p.pool, p.mode)?;
            match (&p.client_cert_file, &p.client_cert_expires) {
                (Some(file), Some(until)) => writeln!(
                    f,
                    ", client certificate {file} expires {until} ({} days)",
                    p.client_cert_days_left.unwrap_or(0)
                )?,
                _ => writeln!(f)?,
            }
        }
        for w in &self.warnings {
            writeln!(f, "warning: {w}")?;
        }
        if self.problems.is_empty() {
            writeln!(f, "result: ok")
        } else {
            writeln!(f, "result: {} problem(s)", self.problems.len())?;
            for p in &self.problems {
                writeln!(f, "  - {p}")?;
            }
            Ok(())
        }
    }
}
