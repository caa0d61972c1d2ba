//! The worker's seccomp filter: an **allow-list** with a default of kill. The worker may make
//! the system calls an HTTP proxy built on tokio, hyper, rustls, SQLite and glibc makes, with
//! their arguments narrowed where a call is also an escalation route; anything else kills the
//! whole process (`SECCOMP_RET_KILL_PROCESS`), the supervisor logs the death and starts a new
//! worker.
//!
//! What the list leaves out, by design (an attacker who took over the worker reaches for these
//! first): `ptrace`, `process_vm_*`, `kcmp`, `bpf`, `perf_event_open`, `userfaultfd`,
//! `io_uring_*` (whose operations would bypass this filter), the keyring calls, namespaces
//! (`unshare`, `setns`, `clone` with a `CLONE_NEW*` flag), every mount call old and new,
//! `chroot`, `pivot_root`, `open_by_handle_at`, `kexec_*`, modules, `reboot`, swap, clock
//! setting, `execve`/`execveat` (the worker never runs a program), `setuid` and friends,
//! `chmod`/`chown` by path, `mknod`, `ioperm`/`iopl`, `personality`, `syslog`.
//!
//! Narrowed by argument:
//! - `socket`/`socketpair`: `AF_INET`, `AF_INET6` and `AF_UNIX` (the control channel) only;
//! - `clone`: no namespace flag; `clone3` answers `ENOSYS` (its flags sit in memory a filter
//!   cannot read), glibc then falls back to `clone`;
//! - `prctl`: naming threads and reading state only (`PR_SET_DUMPABLE` back to 1 would undo
//!   [`super::privdrop::make_undumpable`]);
//! - `ioctl`: the non-blocking, close-on-exec, bytes-readable and terminal queries the
//!   runtime and the logger make;
//! - `kill`/`tgkill`/`tkill`: only to this process (glibc's `abort` and `raise`), never to
//!   another process of the service user.
//!
//! A call for another architecture (32-bit `int 0x80`, x32) is killed too. The filter needs
//! `no_new_privs` (set by the privilege drop) and is installed on every thread at once
//! (`TSYNC`): the log writer thread exists before the worker starts.

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
    let allow = SeccompFilter::new(
        allowed(std::process::id())?,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        arch,
    )?;
    let clone3 = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        arch,
    )?;
    // The allow-list last: installing a filter takes `prctl(PR_SET_NO_NEW_PRIVS)` and `seccomp`,
    // which the worker has no use for once it runs.
    let mut programs: Vec<BpfProgram> = x32_guard().into_iter().collect();
    programs.push(clone3.try_into()?);
    programs.push(allow.try_into()?);
    Ok(programs)
}

/// The calls the worker may make, each unconditionally (an empty rule list) or when one of its
/// rules holds (the conditions of one rule must all hold). `own_pid`: the only process the
/// worker may signal.
fn allowed(own_pid: u32) -> Result<BTreeMap<i64, Vec<SeccompRule>>> {
    let always = [
        // Descriptors and plain I/O.
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_readv,
        libc::SYS_writev,
        libc::SYS_pread64,
        libc::SYS_pwrite64,
        libc::SYS_preadv,
        libc::SYS_pwritev,
        libc::SYS_preadv2,
        libc::SYS_pwritev2,
        libc::SYS_close,
        libc::SYS_close_range,
        libc::SYS_lseek,
        libc::SYS_dup,
        libc::SYS_dup2,
        libc::SYS_dup3,
        libc::SYS_fcntl,
        libc::SYS_pipe2,
        libc::SYS_eventfd2,
        libc::SYS_sendfile,
        libc::SYS_splice,
        // Files: config, certificates, the SQLite store and its journal, /proc reads.
        libc::SYS_open,
        libc::SYS_openat,
        libc::SYS_stat,
        libc::SYS_fstat,
        libc::SYS_lstat,
        libc::SYS_newfstatat,
        libc::SYS_statx,
        libc::SYS_statfs,
        libc::SYS_fstatfs,
        libc::SYS_access,
        libc::SYS_faccessat,
        libc::SYS_faccessat2,
        libc::SYS_readlink,
        libc::SYS_readlinkat,
        libc::SYS_getdents64,
        libc::SYS_getcwd,
        libc::SYS_fsync,
        libc::SYS_fdatasync,
        libc::SYS_ftruncate,
        libc::SYS_fallocate,
        libc::SYS_fadvise64,
        libc::SYS_flock,
        libc::SYS_unlink,
        libc::SYS_unlinkat,
        libc::SYS_rename,
        libc::SYS_renameat,
        libc::SYS_renameat2,
        libc::SYS_fchmod,
        libc::SYS_fchown,
        libc::SYS_umask,
        // The worker creates the identity secrets at first start: a private folder, a file
        // published with a hard link so two starts cannot both create it, its mode set.
        libc::SYS_mkdir,
        libc::SYS_mkdirat,
        libc::SYS_chmod,
        libc::SYS_fchmodat,
        libc::SYS_link,
        libc::SYS_linkat,
        // Memory.
        libc::SYS_brk,
        libc::SYS_mmap,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_mprotect,
        libc::SYS_madvise,
        libc::SYS_mincore,
        libc::SYS_membarrier,
        // Threads, scheduling, resources.
        libc::SYS_exit,
        libc::SYS_exit_group,
        libc::SYS_set_robust_list,
        libc::SYS_get_robust_list,
        libc::SYS_set_tid_address,
        libc::SYS_rseq,
        libc::SYS_arch_prctl,
        libc::SYS_futex,
        libc::SYS_futex_waitv,
        libc::SYS_sched_yield,
        libc::SYS_sched_getaffinity,
        libc::SYS_sched_setaffinity,
        libc::SYS_sched_getparam,
        libc::SYS_sched_getscheduler,
        libc::SYS_getpriority,
        // Lowering a thread's own priority (the password hashers); raising needs a capability.
        libc::SYS_setpriority,
        libc::SYS_getrlimit,
        libc::SYS_prlimit64,
        libc::SYS_getrusage,
        libc::SYS_times,
        libc::SYS_sysinfo,
        libc::SYS_uname,
        libc::SYS_getpid,
        libc::SYS_getppid,
        libc::SYS_gettid,
        libc::SYS_getuid,
        libc::SYS_geteuid,
        libc::SYS_getgid,
        libc::SYS_getegid,
        libc::SYS_getresuid,
        libc::SYS_getresgid,
        libc::SYS_getgroups,
        libc::SYS_getpgrp,
        libc::SYS_getpgid,
        libc::SYS_getsid,
        libc::SYS_capget,
        libc::SYS_getrandom,
        libc::SYS_restart_syscall,
        // Signals (tokio's signal handling and the runtime's own).
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_rt_sigtimedwait,
        libc::SYS_rt_sigpending,
        libc::SYS_rt_sigsuspend,
        libc::SYS_sigaltstack,
        // Waiting and time.
        libc::SYS_epoll_create,
        libc::SYS_epoll_create1,
        libc::SYS_epoll_ctl,
        libc::SYS_epoll_wait,
        libc::SYS_epoll_pwait,
        libc::SYS_epoll_pwait2,
        libc::SYS_poll,
        libc::SYS_ppoll,
        libc::SYS_select,
        libc::SYS_pselect6,
        libc::SYS_timerfd_create,
        libc::SYS_timerfd_settime,
        libc::SYS_timerfd_gettime,
        libc::SYS_nanosleep,
        libc::SYS_clock_nanosleep,
        libc::SYS_clock_gettime,
        libc::SYS_clock_getres,
        libc::SYS_gettimeofday,
        libc::SYS_time,
        // Network (the family is checked at `socket`).
        libc::SYS_bind,
        libc::SYS_listen,
        libc::SYS_accept,
        libc::SYS_accept4,
        libc::SYS_connect,
        libc::SYS_getsockname,
        libc::SYS_getpeername,
        libc::SYS_setsockopt,
        libc::SYS_getsockopt,
        libc::SYS_sendto,
        libc::SYS_recvfrom,
        libc::SYS_sendmsg,
        libc::SYS_recvmsg,
        libc::SYS_sendmmsg,
        libc::SYS_recvmmsg,
        libc::SYS_shutdown,
        // Allowed here, answered ENOSYS by the second filter.
        libc::SYS_clone3,
    ];
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> =
        always.into_iter().map(|nr| (nr, vec![])).collect();

    let arg_is = |arg: u8, value: u64| -> Result<SeccompRule> {
        Ok(SeccompRule::new(vec![SeccompCondition::new(
            arg,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::Eq,
            value,
        )?])?)
    };
    let any_of = |arg: u8, values: &[u64]| -> Result<Vec<SeccompRule>> {
        values.iter().map(|&v| arg_is(arg, v)).collect()
    };

    let families = [libc::AF_INET, libc::AF_INET6, libc::AF_UNIX].map(|f| f as u64);
    rules.insert(libc::SYS_socket, any_of(0, &families)?);
    rules.insert(libc::SYS_socketpair, any_of(0, &[libc::AF_UNIX as u64])?);

    // clone(flags, …) without any namespace flag.
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP) as u64;
    // (CLONE_NEWTIME shares its bit with clone(2)'s exit signal: it exists for clone3 and
    // unshare only, neither of which gets through.)
    rules.insert(
        libc::SYS_clone,
        vec![SeccompRule::new(vec![SeccompCondition::new(
            0,
            SeccompCmpArgLen::Qword,
            SeccompCmpOp::MaskedEq(namespaces),
            0,
        )?])?],
    );

    const PR_SET_VMA: u64 = 0x5356_4d41; // glibc names its anonymous mappings with it
    let prctl = [
        libc::PR_SET_NAME as u64,
        libc::PR_GET_NAME as u64,
        libc::PR_GET_DUMPABLE as u64,
        libc::PR_GET_NO_NEW_PRIVS as u64,
        libc::PR_CAPBSET_READ as u64,
        PR_SET_VMA,
    ];
    rules.insert(libc::SYS_prctl, any_of(0, &prctl)?);

    let ioctl = [
        libc::FIONBIO,
        libc::FIOCLEX,
        libc::FIONCLEX,
        libc::FIONREAD,
        libc::TCGETS,
        libc::TIOCGWINSZ,
    ]
    // `Ioctl` is u64 only on some targets.
    .map(|request| {
        #[allow(clippy::unnecessary_cast)]
        let request = request as u64;
        request
    });
    rules.insert(libc::SYS_ioctl, any_of(1, &ioctl)?);

    let own = u64::from(own_pid);
    rules.insert(libc::SYS_kill, any_of(0, &[own])?);
    rules.insert(libc::SYS_tgkill, any_of(0, &[own])?);
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
