//! The live expiry check of `moat audit report`, through the daemon's real code path: the
//! identity service the worker runs (`auth::Identity`), with the daemon's pepper and signing
//! keys from its data directory, as the service user. Only the store is a scratch one (the
//! probe's throw-away user and session never touch the real one).
//!
//! 1. An access token with a 2-second lifetime is minted by a password grant and verified
//!    (accepted); after its lifetime plus the configured leeway it must be refused.
//! 2. A refresh token is rotated twice; the spent first one must then be refused, and the
//!    session it belonged to must be revoked.
//!
//! `MOAT_TEST_PROBE_LEEWAY_SECS` (for the tests only) hands the verifier another leeway than
//! the one the probe waits for: a verifier that does not enforce expiry as configured, which
//! the check must report as a failure.

use std::{
    io::Read,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use serde::{Deserialize, Serialize};
use zeroize::Zeroizing;

use crate::{
    auth::{Identity, secrets::random_base62},
    config::{Captured, Config, Sources},
    store::sqlite::SqliteStore,
};

/// The access token's lifetime in the check.
pub const PROBE_TTL_SECS: u64 = 2;
pub const ENV_TEST_LEEWAY: &str = "MOAT_TEST_PROBE_LEEWAY_SECS";

/// What the probe child reads on stdin: the config as the parent loaded it.
#[derive(Serialize, Deserialize)]
pub struct ProbeInput {
    pub path: String,
    pub text: String,
    pub captured: Captured,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeResult {
    pub access_token_lifetime_secs: u64,
    pub leeway_secs: u64,
    pub waited_secs: f64,
    pub fresh_token_accepted: bool,
    pub expired_token_refused: bool,
    pub refresh_rotated: bool,
    pub spent_refresh_refused: bool,
    pub session_revoked_after_reuse: bool,
    pub ok: bool,
    pub detail: Vec<String>,
}

/// `moat audit probe` (hidden; run by the report as the service user): reads a
/// [`ProbeInput`] on stdin and prints a [`ProbeResult`].
pub fn child() -> anyhow::Result<()> {
    let mut input = String::new();
    std::io::stdin().read_to_string(&mut input)?;
    let input: ProbeInput = serde_json::from_str(&input).context("bad probe input")?;
    let config = Config::parse(
        std::path::Path::new(&input.path),
        &input.text,
        Sources::Replay(&input.captured),
    )?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let result = runtime.block_on(run(&config))?;
    println!("{}", serde_json::to_string(&result)?);
    Ok(())
}

async fn run(config: &Config) -> anyhow::Result<ProbeResult> {
    let scratch = std::env::temp_dir().join(format!("moat-probe-{}", random_base62(12)));
    let result = probe(config, &scratch).await;
    let _ = std::fs::remove_dir_all(&scratch);
    result
}

async fn probe(config: &Config, scratch: &std::path::Path) -> anyhow::Result<ProbeResult> {
    let store = SqliteStore::open_in(scratch).context("scratch store")?;
    let leeway_override = std::env::var(ENV_TEST_LEEWAY)
        .ok()
        .and_then(|v| v.parse().ok());
    let identity = Arc::new(
        Identity::new(config, Arc::new(store))?.for_expiry_probe(PROBE_TTL_SECS, leeway_override),
    );
    let leeway = config.auth().leeway_secs;
    let mut r = ProbeResult {
        access_token_lifetime_secs: PROBE_TTL_SECS,
        leeway_secs: leeway,
        ..Default::default()
    };
    // A throw-away tenant and user in the scratch store, with a random password.
    let password = Zeroizing::new(random_base62(24));
    {
        let admin = identity.admin();
        admin.add_tenant("probe")?;
        admin.add_user("probe", "probe", &[], Some(password.as_str()))?;
    }
    let local = std::net::IpAddr::from([127, 0, 0, 1]);
    let tokens = identity
        .grant_password("probe", password, local)
        .await
        .map_err(|e| anyhow::anyhow!("password grant: {e:?}"))?;
    let minted = Instant::now();
    r.fresh_token_accepted = identity
        .verify_access_token(&tokens.access_token)
        .await
        .is_ok();
    r.detail.push(format!(
        "minted an access token living {PROBE_TTL_SECS} s; verified at once: {}",
        if r.fresh_token_accepted {
            "accepted"
        } else {
            "REFUSED"
        }
    ));
    // Past its lifetime plus the leeway (whole seconds: the claims are), and one more second.
    let wait = Duration::from_secs(PROBE_TTL_SECS + leeway + 1);
    tokio::time::sleep(wait.saturating_sub(minted.elapsed())).await;
    r.waited_secs = minted.elapsed().as_secs_f64();
    r.expired_token_refused = identity
        .verify_access_token(&tokens.access_token)
        .await
        .is_err();
    r.detail.push(format!(
        "after {:.1} s (lifetime {PROBE_TTL_SECS} s + leeway {leeway} s): {}",
        r.waited_secs,
        if r.expired_token_refused {
            "refused"
        } else {
            "ACCEPTED"
        }
    ));

    let rt0 = tokens.refresh_token.clone();
    let step1 = identity.grant_refresh(&rt0).await;
    let rt2 = match &step1 {
        Ok(t1) => identity.grant_refresh(&t1.refresh_token).await.ok(),
        Err(_) => None,
    };
    r.refresh_rotated = step1.is_ok() && rt2.is_some();
    // Spent twice over now (its successor was rotated too): a replay, whatever the grace.
    r.spent_refresh_refused = identity.grant_refresh(&rt0).await.is_err();
    r.session_revoked_after_reuse = match &rt2 {
        Some(t2) => identity.grant_refresh(&t2.refresh_token).await.is_err(),
        None => false,
    };
    r.detail.push(format!(
        "refresh token rotated twice: {}; the spent first one presented again: {}; the \
         session's newest token afterwards: {}",
        if r.refresh_rotated { "ok" } else { "FAILED" },
        if r.spent_refresh_refused {
            "refused"
        } else {
            "ACCEPTED"
        },
        if r.session_revoked_after_reuse {
            "refused (session revoked)"
        } else {
            "ACCEPTED"
        },
    ));
    r.ok = r.fresh_token_accepted
        && r.expired_token_refused
        && r.refresh_rotated
        && r.spent_refresh_refused
        && r.session_revoked_after_reuse;
    Ok(r)
}

/// Runs the probe in a child process as the service user (as the worker would), or as
/// this user when not root.
pub fn run_as_service_user(config: &Config) -> anyhow::Result<ProbeResult> {
    use std::io::Write;
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;
    // As the worker: exec'd through a descriptor opened now, as root, since the service user
    // may not be allowed to walk to the binary (a checkout under a 0700 folder, say).
    let exe = std::env::current_exe()?;
    let exe =
        std::fs::File::open(&exe).with_context(|| format!("cannot open {}", exe.display()))?;
    let mut cmd = std::process::Command::new(format!("/proc/self/fd/{}", exe.as_raw_fd()));
    cmd.args(["audit", "probe"])
        .current_dir("/")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped());
    if nix::unistd::geteuid().is_root() {
        let user = crate::daemon::privdrop::ServiceUser::lookup(&config.server().user)?;
        // std drops the supplementary groups too when it changes the uid as root.
        cmd.uid(user.uid.as_raw()).gid(user.gid.as_raw());
    }
    let mut child = cmd.spawn().context("cannot start the expiry probe")?;
    let input = ProbeInput {
        path: config.path.display().to_string(),
        text: config.source.clone(),
        captured: config.captured.clone(),
    };
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(serde_json::to_string(&input)?.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        anyhow::bail!(
            "the expiry probe failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).context("undecodable probe result")
}
