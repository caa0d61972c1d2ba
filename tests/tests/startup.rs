//! What a start leaves behind and what it refuses (root required; never skipped): the file and
//! folder modes and owners the README promises for the data directory, the secrets and the
//! database, after the CLI and `moat serve` ran for real; and an admin listener on an address
//! other than loopback, refused with the key named.

use std::{
    os::unix::fs::MetadataExt,
    path::Path,
    time::{Duration, Instant},
};

use moat_tests::{daemon::Daemon, entries_below, kernel::require_root};

/// (mode bits, uid, gid) of a path.
fn mode_owner(path: &Path) -> (u32, u32, u32) {
    let m = std::fs::metadata(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    (m.mode() & 0o7777, m.uid(), m.gid())
}

/// The data dir is the service user's, 0700; the secrets folder 0700; the pepper, the signing
/// keys, the database and its WAL 0600 — all owned by the service user, whether the CLI (run as
/// root, it becomes the service user first) or the daemon made them. Nothing in it is readable
/// by anyone else.
#[test]
fn data_dir_secrets_and_database_have_the_stated_modes_and_owner() {
    require_root();
    let mut d = Daemon::enforcing();
    let _gateway = d.cgroup().child("gateway");
    d.write_config(&d.enforcing_config(&["127.0.0.1:9".parse().unwrap()], "", ""));
    let service = nix::unistd::User::from_name("moat").unwrap().unwrap();
    let (uid, gid) = (service.uid.as_raw(), service.gid.as_raw());
    let data = d.data_dir();
    let secrets = data.join("secrets");

    // The CLI, run as root, makes the store as the service user.
    d.create_tester_key();
    assert_eq!(
        mode_owner(&data),
        (0o700, uid, gid),
        "data dir made by the CLI"
    );
    assert_eq!(mode_owner(&data.join("moat.db")), (0o600, uid, gid));
    assert_eq!(mode_owner(&secrets.join("pepper")), (0o600, uid, gid));
    assert_eq!(std::fs::read(secrets.join("pepper")).unwrap().len(), 32);

    // The daemon adds its signing keys (sealed, in the store); the database is open (its WAL
    // exists).
    d.start();
    d.wait_log("worker started");
    let deadline = Instant::now() + Duration::from_secs(15);
    while !data.join("moat.db-wal").exists() {
        assert!(
            Instant::now() < deadline,
            "no WAL in {:?}",
            entries_below(&data)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    assert_eq!(mode_owner(&data), (0o700, uid, gid), "data dir");
    assert_eq!(mode_owner(&secrets), (0o700, uid, gid), "secrets folder");
    for file in [
        secrets.join("pepper"),
        data.join("moat.db"),
        data.join("moat.db-wal"),
    ] {
        assert_eq!(mode_owner(&file), (0o600, uid, gid), "{}", file.display());
    }
    // And nothing else in there is open to group or others, nor someone else's — but the
    // audit trail, which root owns so the worker cannot rewrite it: its folder and files are
    // readable by the service user's group, its HMAC key by root alone.
    let audit = data.join("audit");
    for entry in entries_below(&data) {
        let (mode, u, g) = mode_owner(&entry);
        let want = if entry == audit {
            (0o750, 0, gid)
        } else if entry == data.join("audit.key") {
            (0o600, 0, 0)
        } else if entry.starts_with(&audit) {
            (0o640, 0, gid)
        } else if entry.is_dir() {
            (0o700, uid, gid)
        } else {
            (0o600, uid, gid)
        };
        assert_eq!((mode, u, g), want, "{}", entry.display());
    }
}

/// `[admin] listen` on anything but loopback is refused at load — by `moat config check` and
/// by `moat serve`, which then binds nothing — with the file, the key and the reason; loopback
/// addresses (the control) load.
#[test]
fn admin_listener_off_loopback_is_refused_naming_the_key() {
    require_root();
    let d = Daemon::off("", "[pools.gpu]\nhosts = [\"127.0.0.1:9\"]\n");
    let base = d.read_config();
    let write = |admin: &str| d.write_config(&format!("{base}[admin]\nlisten = \"{admin}\"\n"));
    let moat = |args: &[&str]| d.cli(args, None);
    for ok in ["127.0.0.1:0", "[::1]:0", "127.0.0.2:0"] {
        write(ok);
        let out = moat(&["config", "check"]);
        assert!(
            out.status.success(),
            "{ok}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    for bad in [
        "0.0.0.0:8081",
        "[::]:8081",
        "10.0.0.1:8081",
        "[fd00::1]:8081",
    ] {
        write(bad);
        let want = format!(
            "moat: {}: key `admin.listen`: {bad} is not a loopback address; the admin plane is \
             local only",
            d.config_path().display()
        );
        for args in [&["config", "check"][..], &["serve"][..]] {
            let out = moat(args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(
                out.status.code(),
                Some(1),
                "moat {args:?} with {bad}: {err}"
            );
            assert!(
                err.contains(&want),
                "moat {args:?}: expected {want:?} in {err}"
            );
            assert!(
                !err.contains("listening"),
                "moat {args:?} with {bad} bound something: {err}"
            );
        }
        assert!(!d.data_dir().exists(), "a refused config makes no data dir");
    }
}
