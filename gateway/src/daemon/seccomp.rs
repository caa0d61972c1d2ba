//! The worker's seccomp filter: the system calls an internet-facing HTTP proxy has no use for,
//! and that an attacker who took it over would reach for first, kill the whole process.
//!
//! **This is a deny-list** (default: allow). An allow-list with a default of KILL is the
//! stronger form, but the worker's set of calls is the union of tokio, hyper, rustls/ring,
//! SQLite, mimalloc and glibc, and a call missed there kills the worker on some rare path in
//! production. The deny-list closes the known escalation and escape routes instead:
//!
//! - sockets of any family but `AF_INET`, `AF_INET6` and `AF_UNIX` (the control channel):
//!   no netlink, packet, vsock, …;
//! - tracing and reading other processes: `ptrace`, `process_vm_readv/writev`, `kcmp`;
//! - the kernel's attack surface the worker never needs: `bpf`, `perf_event_open`,
//!   `userfaultfd`, `io_uring_*` (its operations would also bypass this filter), `keyctl`,
//!   `add_key`, `request_key`;
//! - namespaces and mounts: `unshare`, `setns`, `clone` with any `CLONE_NEW*` flag, `mount`,
//!   `umount2`, the new mount API (`fsopen`, `fsmount`, `move_mount`, …), `pivot_root`,
//!   `chroot`;
//! - the machine itself: `kexec_*`, module loading, `reboot`, `swapon/off`, `acct`, clock
//!   setting;
//! - running another program: `execve`, `execveat` (the worker never execs).
//!
//! A denied call is `SECCOMP_RET_KILL_PROCESS`: the worker dies by SIGSYS, the supervisor
//! logs it and starts a new one. `clone3` gets `ENOSYS` instead (its flags sit in memory a
//! filter cannot read): glibc then falls back to `clone`, whose flags are checked. A call for
//! another architecture (32-bit `int 0x80`, x32) is killed too, so the deny-list cannot be
//! stepped around by syscall number.
//!
//! The filter needs `no_new_privs` (set by the privilege drop) and is installed on every
//! thread at once (`TSYNC`): the log writer thread exists before the worker starts.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// Installs the worker's filters on every thread of this process, for good.
pub fn install() -> Result<()> {
    for program in programs()? {
        seccompiler::apply_filter_all_threads(&program).context("cannot install seccomp filter")?;
    }
    Ok(())
}

/// The filters, each a BPF program: the kernel runs them all and the strictest answer wins.
fn programs() -> Result<Vec<BpfProgram>> {
    let arch = TargetArch::try_from(std::env::consts::ARCH)
        .context("no seccomp filter for this architecture")?;
    let deny = SeccompFilter::new(
        denied()?,
        SeccompAction::Allow,
        SeccompAction::KillProcess,
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    let mut programs = vec![deny.try_into()?, clone3.try_into()?];
    programs.extend(x32_guard());
    Ok(programs)
}

/// The system calls that kill the worker, unconditionally (empty rule list) or when one of
/// their rules matches.
fn denied() -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let always = [
        libc::SYS_ptrace,
        libc::SYS_process_vm_readv,
        libc::SYS_process_vm_writev,
        libc::SYS_kcmp,
        libc::SYS_bpf,
        libc::SYS_perf_event_open,
        libc::SYS_userfaultfd,
        libc::SYS_io_uring_setup,
        libc::SYS_io_uring_enter,
        libc::SYS_io_uring_register,
        libc::SYS_keyctl,
        libc::SYS_add_key,
        libc::SYS_request_key,
        libc::SYS_unshare,
        libc::SYS_setns,
        libc::SYS_mount,
        libc::SYS_umount2,
        libc::SYS_fsopen,
        libc::SYS_fsconfig,
        libc::SYS_fsmount,
        libc::SYS_fspick,
        libc::SYS_move_mount,
        libc::SYS_open_tree,
        libc::SYS_mount_setattr,
        libc::SYS_pivot_root,
        libc::SYS_chroot,
        libc::SYS_open_by_handle_at,
        libc::SYS_kexec_load,
        libc::SYS_kexec_file_load,
        libc::SYS_init_module,
        libc::SYS_finit_module,
        libc::SYS_delete_module,
        libc::SYS_reboot,
        libc::SYS_swapon,
        libc::SYS_swapoff,
        libc::SYS_acct,
        libc::SYS_settimeofday,
        libc::SYS_clock_settime,
        libc::SYS_clock_adjtime,
        libc::SYS_adjtimex,
        libc::SYS_execve,
        libc::SYS_execveat,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        always.into_iter().map(|nr| (nr, vec![])).collect();

    // socket(domain, …) and socketpair(domain, …): a domain other than the three the worker
    // uses. The conditions of one rule must all hold.
    let other_family = || -> Result<SeccompRule> {
        let ne = |family: i32| {
            SeccompCondition::new(0, SeccompCmpArgLen::Dword, SeccompCmpOp::Ne, family as u64)
        };
        Ok(SeccompRule::new(vec![
            ne(libc::AF_INET)?,
            ne(libc::AF_INET6)?,
            ne(libc::AF_UNIX)?,
        ])?)
    };
    rules.insert(libc::SYS_socket, vec![other_family()?]);
    rules.insert(libc::SYS_socketpair, vec![other_family()?]);

    // clone(flags, …) with any namespace flag: one rule per flag, any of them matches.
    let namespaces = [
        libc::CLONE_NEWNS,
        libc::CLONE_NEWUTS,
        libc::CLONE_NEWIPC,
        libc::CLONE_NEWUSER,
        libc::CLONE_NEWPID,
        libc::CLONE_NEWNET,
        libc::CLONE_NEWCGROUP,
    ];
    // (CLONE_NEWTIME shares its bit with clone(2)'s exit signal: it exists for clone3 and
    // unshare only, both denied.)
    let clone_rules = namespaces
        .into_iter()
        .map(|flag| {
            let flag = flag as u64;
            Ok(SeccompRule::new(vec![SeccompCondition::new(
                0,
                SeccompCmpArgLen::Qword,
                SeccompCmpOp::MaskedEq(flag),
                flag,
            )?])?)
        })
        .collect::<Result<Vec<_>>>()?;
    rules.insert(libc::SYS_clone, clone_rules);
    Ok(rules)
}

/// On x86_64 the x32 ABI reaches the same kernel with syscall numbers offset by 0x40000000 and
/// the x86_64 audit arch, so a deny-list keyed by number would not see them: kill any such
/// call (the worker is not an x32 program). A hand-written program because the filter
/// builder matches exact numbers only.
#[cfg(target_arch = "x86_64")]
fn x32_guard() -> Option<BpfProgram> {
    use seccompiler::sock_filter;
    const LD_W_ABS: u16 = 0x20; // BPF_LD | BPF_W | BPF_ABS
    const JEQ_K: u16 = 0x15; // BPF_JMP | BPF_JEQ | BPF_K
    const JGE_K: u16 = 0x35; // BPF_JMP | BPF_JGE | BPF_K
    const RET_K: u16 = 0x06; // BPF_RET | BPF_K
    const AUDIT_ARCH_X86_64: u32 = 0xc000_003e;
    const X32_SYSCALL_BIT: u32 = 0x4000_0000;
    let op = |code, jt, jf, k| sock_filter { code, jt, jf, k };
    Some(vec![
        op(LD_W_ABS, 0, 0, 4), // seccomp_data.arch
        op(JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(LD_W_ABS, 0, 0, 0), // seccomp_data.nr
        op(JGE_K, 0, 1, X32_SYSCALL_BIT),
        op(RET_K, 0, 0, libc::SECCOMP_RET_KILL_PROCESS),
        op(RET_K, 0, 0, libc::SECCOMP_RET_ALLOW),
    ])
}

#[cfg(not(target_arch = "x86_64"))]
fn x32_guard() -> Option<BpfProgram> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_filters_compile_for_this_architecture() {
        let programs = programs().unwrap();
        assert!(programs.len() >= 2);
        assert!(programs.iter().all(|p| !p.is_empty() && p.len() < 4096));
    }
}
