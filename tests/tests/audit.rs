//! End to end: the audit trail of a real `moat serve` (issue 14).
//!
//! - every kind of tampering — an edit, a deletion, an insertion, a reorder, a truncation, a
//!   splice from another moat's log, a rotated file gone — is caught by `moat audit verify`,
//!   which names the first bad record and exits non-zero;
//! - the records name who did what (CLI and admin plane), cover the daemon's life (start,
//!   reload with digests, worker restart, stop) and the data plane's refusals; the admin
//!   plane serves them, tenant-scoped;
//! - `moat audit report`'s live expiry check passes, and fails when the verifier does not
//!   enforce expiry as configured (`MOAT_TEST_PROBE_LEEWAY_SECS`);
//! - after all of it, no key, password or token the test used appears in the audit log or
//!   the daemon's log.

use std::{
    fs,
    path::{Path, PathBuf},
    process::Output,
    time::{Duration, Instant},
};

use moat_tests::{Sim, daemon::Daemon, http::Client};
use serde_json::{Value, json};

const PASSWORD: &str = "audit trail password 1234";

fn audit_dir(d: &Daemon) -> PathBuf {
    d.data_dir().join("audit")
}

/// The log's files, oldest first (as `moat audit verify` finds them).
fn log_files(d: &Daemon) -> Vec<PathBuf> {
    let dir = audit_dir(d);
    let mut rotated: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            let n = p.file_name().unwrap().to_str().unwrap();
            n.starts_with("audit-") && n.ends_with(".log")
        })
        .collect();
    rotated.sort();
    rotated.push(dir.join("audit.log"));
    rotated
}

/// Every record of the log, parsed.
fn records(d: &Daemon) -> Vec<Value> {
    log_files(d)
        .iter()
        .flat_map(|f| {
            fs::read_to_string(f)
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str::<Value>(l).unwrap())
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Waits until a record of `kind` matching `pred` is in the log (the writer syncs in batches).
fn wait_record(d: &Daemon, kind: &str, pred: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Some(r) = records(d)
            .into_iter()
            .find(|r| r["event"]["kind"] == kind && pred(&r["event"]))
        {
            return r;
        }
        assert!(
            Instant::now() < deadline,
            "no {kind} record:\n{}",
            serde_json::to_string_pretty(&records(d)).unwrap()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn verify(d: &Daemon, files: &[PathBuf]) -> Output {
    let mut args = vec!["audit".to_owned(), "verify".to_owned()];
    args.extend(files.iter().map(|f| f.display().to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    d.cli(&args, None)
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr)
}

/// Copies the log's files into a fresh folder, applies `f` to all their lines (in log order,
/// with the file each belongs to), writes them back under the same names, and returns the
/// copies' paths.
fn tampered(d: &Daemon, out: &Path, f: impl FnOnce(&mut Vec<(usize, String)>)) -> Vec<PathBuf> {
    let _ = fs::remove_dir_all(out);
    fs::create_dir_all(out).unwrap();
    let files = log_files(d);
    let mut lines: Vec<(usize, String)> = Vec::new();
    for (i, file) in files.iter().enumerate() {
        for l in fs::read_to_string(file).unwrap().split_inclusive('\n') {
            lines.push((i, l.to_owned()));
        }
    }
    f(&mut lines);
    let mut copies = Vec::new();
    for (i, file) in files.iter().enumerate() {
        let text: String = lines
            .iter()
            .filter(|(fi, _)| *fi == i)
            .map(|(_, l)| l.as_str())
            .collect();
        let copy = out.join(file.file_name().unwrap());
        fs::write(&copy, text).unwrap();
        copies.push(copy);
    }
    copies
}

fn seq_of(line: &str) -> u64 {
    serde_json::from_str::<Value>(line).unwrap()["seq"]
        .as_u64()
        .unwrap()
}

/// Asserts the verification failed, naming record `seq` and `why`.
fn assert_caught(o: &Output, seq: u64, why: &str, case: &str) {
    let text = stdout(o);
    assert!(!o.status.success(), "{case}: verify passed:\n{text}");
    assert!(
        text.contains(&format!("(seq {seq})")) && text.contains(why),
        "{case}: expected seq {seq} and {why:?} in:\n{text}"
    );
}

#[test]
fn verify_catches_every_kind_of_tampering() {
    // Small files: the log rotates, and the chain must run across the files.
    let mut moat = Daemon::no_upstream("[audit]\nmax_file_bytes = 1500\n");
    moat.create_tester_key();
    moat.start();
    for i in 0..20 {
        let r = Client::new()
            .get(moat.url("/v1/models"))
            .bearer_auth(format!("not-a-key-{i}"))
            .send()
            .unwrap();
        assert_eq!(r.status(), 401);
    }
    wait_record(&moat, "auth_failure", |_| true);
    moat.stop();
    let files = log_files(&moat);
    assert!(files.len() >= 3, "the log rotated: {files:?}");
    let all = records(&moat);
    assert!(all.len() >= 25, "{} records", all.len());
    assert_eq!(all.last().unwrap()["event"]["kind"], "daemon_stop");

    // Untouched: every file, in any order, verifies; so does the configured directory.
    let ok = verify(&moat, &files.iter().rev().cloned().collect::<Vec<_>>());
    assert!(ok.status.success(), "{}", stdout(&ok));
    assert!(stdout(&ok).starts_with("ok: "), "{}", stdout(&ok));
    let ok = verify(&moat, &[]);
    assert!(ok.status.success(), "{}", stdout(&ok));

    let work = moat.dir().join("tampered");
    // An edit: one character of record 5.
    let copies = tampered(&moat, &work, |l| {
        l[4].1 = l[4].1.replacen("\"ts\":\"2", "\"ts\":\"1", 1);
    });
    assert_caught(&verify(&moat, &copies), 5, "HMAC does not match", "edit");

    // A deletion: record 5 gone.
    let copies = tampered(&moat, &work, |l| {
        l.remove(4);
    });
    assert_caught(
        &verify(&moat, &copies),
        6,
        "records 5..5 are missing",
        "deletion",
    );

    // An insertion: a copy of a genuine record (valid HMAC) put in again later.
    let copies = tampered(&moat, &work, |l| {
        let copy = l[2].clone();
        l.insert(5, (l[4].0, copy.1));
    });
    assert_caught(
        &verify(&moat, &copies),
        3,
        "after seq 5",
        "insertion of a copy",
    );

    // An insertion: a forged record.
    let copies = tampered(&moat, &work, |l| {
        let fake = l[4].1.replacen("\"seq\":5,", "\"seq\":6,", 1);
        l.insert(5, (l[4].0, fake));
    });
    assert_caught(
        &verify(&moat, &copies),
        6,
        "HMAC does not match",
        "forged insertion",
    );

    // A reorder: records 5 and 6 swapped.
    let copies = tampered(&moat, &work, |l| {
        let (a, b) = (l[4].1.clone(), l[5].1.clone());
        l[4].1 = b;
        l[5].1 = a;
    });
    assert_caught(&verify(&moat, &copies), 6, "missing here", "reorder");

    // A truncation: the last two records cut off the end.
    let last = all.last().unwrap()["seq"].as_u64().unwrap();
    let copies = tampered(&moat, &work, |l| {
        l.truncate(l.len() - 2);
    });
    assert_caught(
        &verify(&moat, &copies),
        last - 1,
        "cut off the end",
        "tail truncation",
    );

    // A truncation in the middle of the last record.
    let copies = tampered(&moat, &work, |l| {
        let (fi, line) = l.pop().unwrap();
        l.push((fi, line[..line.len() / 2].to_owned()));
    });
    assert_caught(
        &verify(&moat, &copies),
        last,
        "cut off (no newline)",
        "cut record",
    );

    // A splice: record 5 of another moat's log (its own key) in place of ours.
    let other = Daemon::no_upstream("");
    for t in ["a", "b", "c", "d", "e", "f"] {
        other.cli_ok(&["tenants", "add", t], None);
    }
    let theirs = fs::read_to_string(other.data_dir().join("audit/audit.log")).unwrap();
    let theirs: Vec<&str> = theirs.split_inclusive('\n').collect();
    assert_eq!(seq_of(theirs[4]), 5);
    let copies = tampered(&moat, &work, |l| {
        l[4].1 = theirs[4].to_owned();
    });
    assert_caught(&verify(&moat, &copies), 5, "another moat's log", "splice");

    // A rotated file gone from the middle.
    let mut missing = files.clone();
    let gone = missing.remove(1);
    let first_after = seq_of(
        fs::read_to_string(&missing[1])
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    );
    let o = verify(&moat, &missing);
    assert_caught(
        &o,
        first_after,
        "missing here",
        &format!("{} removed", gone.display()),
    );

    // The log itself was never touched: it still verifies.
    let ok = verify(&moat, &[]);
    assert!(ok.status.success(), "{}", stdout(&ok));
}

/// An admin-plane and data-plane world: tenants `testing` (the fixture's key) and `acme`, a
/// simulated model server behind pool `local`.
fn admin_world(sim: &Sim) -> Daemon {
    let mut moat = Daemon::off(
        "",
        &format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [pools.local]\nhosts = [\"{}\"]\n\
             [models.\"test-model\"]\npool = \"local\"\n\
             [roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
             [roles.keyadmin]\npermissions = [\"admin:keys\", \"admin:users\"]\n\
             [roles.auditor]\npermissions = [\"audit:read\"]\n\
             [roles.chief]\npermissions = [\"audit:read\", \"admin:tenants\"]\n\
             [roles.nomodels]\npermissions = []\n\
             [tenants.acme]\nkey_quota = {{ requests_per_minute = 1 }}\n",
            sim.addr
        ),
    );
    moat.create_tester_key();
    moat.cli_ok(&["tenants", "add", "acme"], None);
    moat.start();
    moat
}

fn token(moat: &Daemon, body: Value) -> Value {
    let r = Client::new()
        .post(moat.url("/v1/auth/token"))
        .json(&body)
        .send()
        .unwrap();
    r.json().unwrap()
}

#[test]
fn records_name_actors_cover_the_daemon_and_leak_no_secret() {
    let sim = Sim::start(&[]);
    let mut moat = admin_world(&sim);
    let mut secrets: Vec<String> = vec![PASSWORD.to_owned(), moat.key().to_owned()];
    // CLI: a user with a password (from stdin), keys.
    moat.cli_ok(
        &[
            "users",
            "add",
            "alice",
            "--tenant",
            "acme",
            "--role",
            "user",
            "--role",
            "keyadmin",
            "--password",
        ],
        Some(&format!("{PASSWORD}\n")),
    );
    moat.add_user("acme", "aud", &["auditor"]);
    moat.add_user("testing", "boss", &["chief"]);
    moat.add_user("acme", "nobody", &["nomodels"]);
    let alice_key = moat.create_key("alice");
    let aud_key = moat.create_key("aud");
    let boss_key = moat.create_key("boss");
    let nobody_key = moat.create_key("nobody");
    secrets.extend([
        alice_key.clone(),
        aud_key.clone(),
        boss_key.clone(),
        nobody_key.clone(),
    ]);
    let cli = wait_record(&moat, "identity_change", |e| e["action"] == "key_created");
    assert_eq!(cli["source"], "cli");
    assert_eq!(cli["event"]["actor"], "cli:root");
    assert!(
        cli["event"]["target"].as_str().unwrap().len() > 4,
        "a key id"
    );

    // Admin plane: alice (keyadmin in acme) creates and revokes a key.
    let (status, created) = admin(
        &moat,
        "POST",
        "/admin/keys",
        &alice_key,
        Some(json!({"user": "alice"})),
    );
    assert_eq!(status, 201, "{created}");
    let admin_key = created["key"].as_str().unwrap().to_owned();
    let admin_key_id = created["key_id"].as_str().unwrap().to_owned();
    secrets.push(admin_key.clone());
    let (status, _) = admin(
        &moat,
        "POST",
        &format!("/admin/keys/{admin_key_id}/revoke"),
        &alice_key,
        None,
    );
    assert_eq!(status, 200);
    let rec = wait_record(&moat, "identity_change", |e| {
        e["action"] == "key_revoked" && e["target"] == admin_key_id.as_str()
    });
    assert_eq!(rec["event"]["actor"], "admin:alice");
    assert_eq!(rec["source"], "worker");
    wait_record(&moat, "identity_change", |e| {
        e["action"] == "key_created" && e["actor"] == "admin:alice"
    });
    // Authorization denied on the admin plane.
    let (status, _) = admin(&moat, "GET", "/admin/tenants", &alice_key, None);
    assert_eq!(status, 403);
    wait_record(&moat, "authz_denied", |e| {
        e["plane"] == "admin" && e["permission"] == "admin:tenants"
    });

    // Data plane: a bad key, a denied model, a quota.
    let r = Client::new()
        .get(moat.url("/v1/models"))
        .bearer_auth(&admin_key)
        .send()
        .unwrap();
    assert_eq!(r.status(), 401, "a revoked key");
    wait_record(&moat, "auth_failure", |e| {
        e["key_id"] == admin_key_id.as_str() && e["reason"] == "inactive key"
    });
    let chat = |key: &str| {
        Client::new()
            .post(moat.url("/v1/chat/completions"))
            .bearer_auth(key)
            .json(&json!({"model": "test-model", "messages": [{"role": "user", "content": "hi"}]}))
            .send()
            .unwrap()
            .status()
    };
    assert_eq!(chat(&nobody_key), 403);
    wait_record(&moat, "authz_denied", |e| {
        e["plane"] == "data" && e["tenant"] == "acme"
    });
    assert_eq!(
        chat(&alice_key),
        200,
        "the first request is within the quota"
    );
    assert_eq!(chat(&alice_key), 429);
    wait_record(&moat, "quota_denied", |e| e["tenant"] == "acme");

    // Tokens: password grant, refresh, reuse, revoke.
    let t = token(
        &moat,
        json!({"grant_type": "password", "username": "alice", "password": PASSWORD}),
    );
    let (access, rt1) = (
        t["access_token"].as_str().unwrap(),
        t["refresh_token"].as_str().unwrap(),
    );
    secrets.extend([access.to_owned(), rt1.to_owned()]);
    let t2 = token(
        &moat,
        json!({"grant_type": "refresh_token", "refresh_token": rt1}),
    );
    let rt2 = t2["refresh_token"].as_str().unwrap();
    secrets.extend([
        t2["access_token"].as_str().unwrap().to_owned(),
        rt2.to_owned(),
    ]);
    let t3 = token(
        &moat,
        json!({"grant_type": "refresh_token", "refresh_token": rt2}),
    );
    secrets.extend([
        t3["access_token"].as_str().unwrap().to_owned(),
        t3["refresh_token"].as_str().unwrap().to_owned(),
    ]);
    // rt1 is spent twice over: a replay, the session is revoked.
    let replay = token(
        &moat,
        json!({"grant_type": "refresh_token", "refresh_token": rt1}),
    );
    assert!(replay["error"].is_object(), "{replay}");
    let reuse = wait_record(&moat, "refresh_reuse", |_| true);
    let sid = reuse["event"]["sid"].as_str().unwrap().to_owned();
    wait_record(&moat, "session_revoked", |e| e["sid"] == sid.as_str());
    wait_record(&moat, "auth_success", |e| {
        e["method"] == "password" && e["sid"] == sid.as_str()
    });
    let bad = token(
        &moat,
        json!({"grant_type": "password", "username": "alice", "password": "wrong password 123"}),
    );
    assert!(bad["error"].is_object());
    wait_record(&moat, "auth_failure", |e| e["method"] == "password");
    secrets.push("wrong password 123".into());

    // Daemon life: a reload (new digest), a worker restart.
    let before = fs::read_to_string(moat.config_path()).unwrap();
    moat.write_config(&format!("{before}\n# reloaded\n"));
    moat.signal(nix::sys::signal::Signal::SIGHUP);
    let reload = wait_record(&moat, "config_reload", |_| true);
    assert_eq!(reload["event"]["applied"], true, "{reload}");
    assert_ne!(reload["event"]["old_digest"], reload["event"]["new_digest"]);
    let start = wait_record(&moat, "daemon_start", |_| true);
    assert_eq!(
        start["event"]["config_digest"],
        reload["event"]["old_digest"]
    );
    let worker = worker_pid(moat.pid());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(worker as i32),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    let restart = wait_record(&moat, "worker_restart", |_| true);
    assert_eq!(restart["event"]["pid"], worker);
    assert_eq!(restart["source"], "supervisor");
    moat.wait_log_nth("worker started", 1);

    // The admin plane serves the records: everything for a holder of `admin:tenants`, only
    // its own tenant's for a tenant auditor, nothing without `audit:read`.
    let (status, all) = admin_get(&moat, "/admin/audit?since=0&limit=10000", &boss_key);
    assert_eq!(status, 200, "{all}");
    let all = all["records"].as_array().unwrap().clone();
    assert!(all.iter().any(|r| r["event"]["tenant"] == "testing"));
    assert!(all.iter().any(|r| r["event"]["kind"] == "daemon_start"));
    let (status, mine) = admin_get(&moat, "/admin/audit?since=0", &aud_key);
    assert_eq!(status, 200, "{mine}");
    let mine = mine["records"].as_array().unwrap();
    assert!(!mine.is_empty());
    assert!(
        mine.iter().all(|r| r["event"]["tenant"] == "acme"),
        "{mine:?}"
    );
    let since = all[all.len() - 3]["seq"].as_u64().unwrap();
    let (_, page) = admin_get(&moat, &format!("/admin/audit?since={since}"), &boss_key);
    let seqs: Vec<u64> = page["records"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["seq"].as_u64().unwrap())
        .collect();
    assert!(
        seqs.len() >= 2 && seqs.iter().all(|&s| s > since),
        "{seqs:?}"
    );
    let (status, _) = admin_get(&moat, "/admin/audit", &alice_key);
    assert_eq!(status, 403);
    let (status, err) = admin_get(&moat, "/admin/audit?since=x", &boss_key);
    assert_eq!(status, 400);
    assert!(err["error"]["message"].is_string(), "{err}");

    moat.stop();
    let ok = verify(&moat, &[]);
    assert!(ok.status.success(), "{}", stdout(&ok));

    // The log is the supervisor's: the service user may read it, not write it.
    let meta = fs::metadata(audit_dir(&moat).join("audit.log")).unwrap();
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    assert_eq!(meta.uid(), 0);
    assert_eq!(meta.permissions().mode() & 0o777, 0o640);
    let key = fs::metadata(moat.data_dir().join("audit.key")).unwrap();
    assert_eq!((key.uid(), key.permissions().mode() & 0o777), (0, 0o600));
    // As the worker's user: reading works, appending, replacing and removing do not, and the
    // key cannot be read.
    let svc = nix::unistd::User::from_name("moat").unwrap().unwrap();
    let as_service_user = |script: &str| {
        use std::os::unix::process::CommandExt;
        std::process::Command::new("/bin/sh")
            .args(["-c", script])
            .uid(svc.uid.as_raw())
            .gid(svc.gid.as_raw())
            .current_dir("/")
            .output()
            .unwrap()
            .status
            .success()
    };
    let log = audit_dir(&moat).join("audit.log");
    let log = log.display();
    assert!(
        as_service_user(&format!("head -c 1 {log} >/dev/null")),
        "the worker's user reads the log"
    );
    assert!(!as_service_user(&format!("echo forged >> {log}")));
    assert!(!as_service_user(&format!("rm -f {log}")));
    assert!(!as_service_user(&format!("mv {log} {log}.x")));
    assert!(!as_service_user(&format!(
        "cat {} >/dev/null",
        moat.data_dir().join("audit.key").display()
    )));
    assert!(fs::metadata(audit_dir(&moat).join("audit.log")).is_ok());

    // No secret anywhere in the audit log or the daemon's logs.
    let mut haystack = String::new();
    for f in log_files(&moat) {
        haystack += &fs::read_to_string(f).unwrap();
    }
    for e in fs::read_dir(moat.dir()).unwrap() {
        let p = e.unwrap().path();
        if p.extension().is_some_and(|x| x == "log") {
            haystack += &fs::read_to_string(p).unwrap();
        }
    }
    assert!(
        haystack.contains("key_created"),
        "the sweep reads the real logs"
    );
    for s in &secrets {
        assert!(!s.is_empty());
        assert!(
            !haystack.contains(s.as_str()),
            "a secret is in the logs: {}…",
            &s[..8]
        );
    }
    // Nor any part of a key or token long enough to matter (the secret part of each key).
    for s in secrets.iter().filter(|s| s.starts_with("moat_")) {
        let tail = &s[s.len() - 20..];
        assert!(!haystack.contains(tail), "part of a key is in the logs");
    }
}

fn admin(moat: &Daemon, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
        .block_on(moat.admin(method, path, key, body))
}

fn admin_get(moat: &Daemon, path: &str, key: &str) -> (u16, Value) {
    admin(moat, "GET", path, key, None)
}

/// The supervisor's child (the worker).
fn worker_pid(supervisor: u32) -> u32 {
    for e in fs::read_dir("/proc").unwrap() {
        let Ok(pid) = e.unwrap().file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let status = fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
        if status.lines().any(|l| {
            l.strip_prefix("PPid:")
                .is_some_and(|p| p.trim() == supervisor.to_string())
        }) {
            return pid;
        }
    }
    panic!("no worker under {supervisor}");
}

fn report(moat: &Daemon, env: Option<(&str, &str)>) -> (bool, Value) {
    let mut cmd = std::process::Command::new(moat_tests::bin("moat"));
    cmd.args(["audit", "report", "--json", "--config"])
        .arg(moat.config_path());
    if let Some((k, v)) = env {
        cmd.env(k, v);
    }
    let out = cmd.output().unwrap();
    let v: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("report is not JSON: {}", stdout(&out)));
    (out.status.success(), v)
}

#[test]
fn report_live_expiry_check_passes_and_fails_when_expiry_is_broken() {
    let mut moat = Daemon::no_upstream("[auth]\nleeway_secs = 1\n");
    moat.create_tester_key();
    moat.start();
    let (ok, r) = report(&moat, None);
    let check = &r["expiry_check"]["Ok"];
    assert!(
        check["ok"] == true,
        "{}",
        serde_json::to_string_pretty(&r).unwrap()
    );
    assert!(
        ok,
        "{}",
        serde_json::to_string_pretty(&r["problems"]).unwrap()
    );
    assert_eq!(check["fresh_token_accepted"], true);
    assert_eq!(check["expired_token_refused"], true);
    assert_eq!(check["spent_refresh_refused"], true);
    assert_eq!(check["session_revoked_after_reuse"], true);
    assert!(check["waited_secs"].as_f64().unwrap() >= 4.0, "{check}");
    // The rest of the report: credentials judged, the worker's privileges from /proc.
    let creds = r["credentials"].as_array().unwrap();
    let pepper = creds
        .iter()
        .find(|c| c["what"].as_str().unwrap().starts_with("pepper"))
        .unwrap();
    assert_eq!(pepper["mode"], "0600");
    assert!(
        pepper["problems"].as_array().unwrap().is_empty(),
        "{pepper}"
    );
    let worker = r["worker_processes"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["role"] == "worker")
        .unwrap_or_else(|| panic!("{}", r["worker_processes"]));
    assert_eq!(worker["status"]["CapEff"], "0000000000000000");
    assert_eq!(worker["status"]["NoNewPrivs"], "1");
    assert!(
        r["versions"]["rustc (built with)"]
            .as_str()
            .unwrap()
            .starts_with("rustc ")
    );
    assert!(
        r["audit_log"].as_str().unwrap().starts_with("ok: "),
        "{}",
        r["audit_log"]
    );

    // A verifier that does not hold tokens to the configured leeway: the check must fail.
    let (ok, r) = report(&moat, Some(("MOAT_TEST_PROBE_LEEWAY_SECS", "30")));
    let check = &r["expiry_check"]["Ok"];
    assert!(!ok, "the report passed with broken expiry");
    assert_eq!(check["ok"], false);
    assert_eq!(check["expired_token_refused"], false);
    assert!(
        r["problems"]
            .as_array()
            .unwrap()
            .iter()
            .any(|p| p.as_str().unwrap().contains("live expiry check failed")),
        "{}",
        r["problems"]
    );

    // A secret file loosened on disk: named, with what is wrong.
    let pepper = moat.data_dir().join("secrets/pepper");
    use std::os::unix::fs::PermissionsExt;
    fs::set_permissions(&pepper, fs::Permissions::from_mode(0o644)).unwrap();
    let (ok, r) = report(&moat, None);
    assert!(!ok);
    assert!(
        r["problems"].as_array().unwrap().iter().any(|p| {
            let p = p.as_str().unwrap();
            p.contains("pepper") && p.contains("0644")
        }),
        "{}",
        r["problems"]
    );
    fs::set_permissions(&pepper, fs::Permissions::from_mode(0o600)).unwrap();
    // Markdown by default.
    let md = moat.cli(&["audit", "report"], None);
    let text = String::from_utf8_lossy(&md.stdout);
    assert!(text.starts_with("# moat security report"), "{text}");
    assert!(text.contains("## Live expiry check") && text.contains("## Attack surface"));
}
