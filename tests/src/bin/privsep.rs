//! `moat-privsep`: the privilege-separation tests' helper.
//!
//! - `moat-privsep seccomp <call>`: sets `no_new_privs` and installs the worker's seccomp
//!   filter through the same library function the worker calls (`moat::daemon::seccomp`),
//!   then makes one system call. A denied call kills it by SIGSYS; `allowed` makes the calls a
//!   worker does make and exits 0.
//! - `moat-privsep peek <pid>`: run as the worker's uid, tries to read and trace it; prints
//!   one JSON object with the outcome (`"ok"` or the errno name) of each attempt.

use std::{ffi::CString, io::Error};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.iter().map(String::as_str).collect::<Vec<_>>()[..] {
        ["seccomp", call] => seccomp(call),
        ["peek", pid] => peek(pid.parse().expect("pid")),
        _ => {
            eprintln!("usage: moat-privsep seccomp <call> | peek <pid>");
            std::process::exit(2);
        }
    }
}

fn seccomp(call: &str) {
    // No core file for the SIGSYS the test expects (the worker has the same limit).
    let no_core = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: plain syscall with a valid pointer.
    unsafe { libc::setrlimit(libc::RLIMIT_CORE, &no_core) };
    // SAFETY: prctl with integer arguments. The worker has this from its privilege drop.
    assert_eq!(
        unsafe { libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) },
        0
    );
    moat::daemon::seccomp::install().expect("install the worker's filter");
    // SAFETY (all below): raw system calls with arguments that are valid or deliberately null;
    // the filter is expected to stop each one before the kernel looks at them.
    let r: i64 = unsafe {
        match call {
            "allowed" => return allowed(),
            "bpf" => libc::syscall(libc::SYS_bpf, 0, 0, 0),
            "ptrace" => libc::syscall(libc::SYS_ptrace, libc::PTRACE_TRACEME, 0, 0, 0),
            "netlink" => libc::socket(libc::AF_NETLINK, libc::SOCK_RAW, 0).into(),
            "packet" => libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0).into(),
            "mount" => libc::syscall(libc::SYS_mount, 0, 0, 0, 0, 0),
            "unshare" => libc::syscall(libc::SYS_unshare, libc::CLONE_NEWNET),
            "clone-newuser" => libc::syscall(
                libc::SYS_clone,
                libc::CLONE_NEWUSER | libc::SIGCHLD,
                0,
                0,
                0,
                0,
            ),
            "process_vm_readv" => libc::syscall(libc::SYS_process_vm_readv, 1, 0, 0, 0, 0, 0),
            "keyctl" => libc::syscall(libc::SYS_keyctl, 0, 0, 0, 0, 0),
            "io_uring_setup" => libc::syscall(libc::SYS_io_uring_setup, 1, 0),
            // Not on the allow-list, and harmless: proves the default is kill.
            "personality" => libc::syscall(libc::SYS_personality, 0xffff_ffffu32),
            "dumpable" => libc::prctl(libc::PR_SET_DUMPABLE, 1, 0, 0, 0).into(),
            "kill-other" => libc::kill(1, 0).into(),
            "ioctl-other" => libc::ioctl(0, libc::TIOCSTI, c"x".as_ptr()).into(),
            "execve" => {
                let path = CString::new("/bin/true").unwrap();
                let argv = [path.as_ptr(), std::ptr::null()];
                libc::execv(path.as_ptr(), argv.as_ptr()).into()
            }
            #[cfg(target_arch = "x86_64")]
            "x32" => libc::syscall(0x4000_0000 | libc::SYS_getpid),
            other => panic!("unknown call {other}"),
        }
    };
    // Reached only when the filter let the call through.
    println!("{call} returned {r}: {}", Error::last_os_error());
    std::process::exit(0);
}

/// What the worker does: IPv4, IPv6 and Unix sockets, new threads (glibc tries clone3, gets
/// ENOSYS, falls back to clone), a TCP round trip on loopback, a signal check on itself,
/// naming a thread.
fn allowed() {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("AF_INET socket");
    let addr = l.local_addr().unwrap();
    let server = std::thread::spawn(move || {
        let (mut s, _) = l.accept().unwrap();
        s.write_all(b"pong").unwrap();
    });
    let mut c = std::net::TcpStream::connect(addr).unwrap();
    let mut buf = String::new();
    c.read_to_string(&mut buf).unwrap();
    assert_eq!(buf, "pong");
    server.join().unwrap();
    // IPv6 may have no address here; the socket itself must be allowed.
    // SAFETY: plain socket calls, closed right away.
    unsafe {
        for family in [libc::AF_INET6, libc::AF_UNIX] {
            let fd = libc::socket(family, libc::SOCK_STREAM, 0);
            assert!(fd >= 0, "socket({family}): {}", Error::last_os_error());
            libc::close(fd);
        }
    }
    std::os::unix::net::UnixStream::pair().expect("socketpair(AF_UNIX)");
    // SAFETY: signal 0 to this process (a check, nothing delivered); naming this thread.
    unsafe {
        assert_eq!(libc::kill(libc::getpid(), 0), 0, "kill(self, 0)");
        assert_eq!(
            libc::prctl(libc::PR_SET_NAME, c"privsep".as_ptr(), 0, 0, 0),
            0,
            "prctl(PR_SET_NAME)"
        );
    }
    println!("allowed calls work");
}

/// Each way a process of the same uid could look into `pid`.
fn peek(pid: i32) {
    let outcome = |r: i64| {
        if r >= 0 {
            "ok".to_owned()
        } else {
            errno_name(Error::last_os_error().raw_os_error().unwrap_or(0))
        }
    };
    let environ = match std::fs::read(format!("/proc/{pid}/environ")) {
        Ok(_) => "ok".to_owned(),
        Err(e) => errno_name(e.raw_os_error().unwrap_or(0)),
    };
    // PTRACE_SEIZE does not stop the target; this process exits right after, which detaches.
    // SAFETY: ptrace with integer arguments.
    let attach = outcome(unsafe { libc::ptrace(libc::PTRACE_SEIZE, pid, 0, 0) });
    // One byte from an address that is surely mapped in a Rust program: its own stack guard is
    // not, but the permission check comes before the address is looked at.
    let mut byte = 0u8;
    let local = libc::iovec {
        iov_base: (&mut byte as *mut u8).cast(),
        iov_len: 1,
    };
    let remote = libc::iovec {
        iov_base: 0x1000 as *mut libc::c_void,
        iov_len: 1,
    };
    // SAFETY: valid local buffer; the remote one is the kernel's to check.
    let vm_readv = outcome(unsafe { libc::process_vm_readv(pid, &local, 1, &remote, 1, 0) } as i64);
    println!("{{\"environ\":\"{environ}\",\"attach\":\"{attach}\",\"vm_readv\":\"{vm_readv}\"}}");
}

fn errno_name(errno: i32) -> String {
    match errno {
        libc::EPERM => "EPERM".into(),
        libc::EACCES => "EACCES".into(),
        libc::EFAULT => "EFAULT".into(),
        libc::ESRCH => "ESRCH".into(),
        other => format!("errno {other}"),
    }
}
