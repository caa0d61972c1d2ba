//! End-to-end authorization and tenancy: a real `moat serve` in front of real `moat-sim`
//! hosts, principals made with the real CLI.
//!
//! - the two-tenant, three-role matrix: every (principal, model) pair is allowed or 403 as
//!   the policy says, `/v1/models` matches it, and the per-host request counts of the
//!   simulators prove the dedicated tenant never reaches the shared pool, even with its own
//!   pool down;
//! - tenant identity from the credential only (a body field is refused, a header ignored);
//! - quotas: 429 at the configured limit, an honest `Retry-After`, refusals charged nothing,
//!   tokens reserved and reconciled with the upstream's usage, concurrent streams;
//! - a narrowed key or a user's removed role loses access on the next request after the
//!   change reaches the daemon; a revoked key's open stream is closed.

use std::{
    process::Command,
    time::{Duration, Instant},
};

use moat_tests::{Daemon, Events, Sim, bin, fetch, post_json};
use serde_json::{Value, json};

const CHAT: &str = "/v1/chat/completions";

/// Runs the `moat` CLI on the daemon's config; returns stdout.
fn cli(moat: &Daemon, args: &[&str]) -> String {
    moat.cli_ok(args, None)
}

/// A user in `tenant` with `roles` and a key for it (narrowed to `key_roles` if given):
/// returns (key, key id).
fn principal(
    moat: &Daemon,
    tenant: &str,
    user: &str,
    roles: &[&str],
    key_roles: &[&str],
) -> (String, String) {
    // The tenant may exist already (the fixture's own, or an earlier principal's): then the
    // CLI must say exactly that, and nothing else may go wrong.
    let out = moat.cli(&["tenants", "add", tenant], None);
    if !out.status.success() {
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "tenants add {tenant}: {err}");
        assert!(
            err.contains("already exists"),
            "tenants add {tenant}: {err}"
        );
    }
    let mut args = vec!["users", "add", user, "--tenant", tenant];
    for r in roles {
        args.extend(["--role", r]);
    }
    cli(moat, &args);
    let mut args = vec!["keys", "create", "--user", user, "--json"];
    for r in key_roles {
        args.extend(["--role", r]);
    }
    let v: Value = serde_json::from_str(cli(moat, &args).trim()).unwrap();
    (
        v["key"].as_str().unwrap().to_owned(),
        v["key_id"].as_str().unwrap().to_owned(),
    )
}

async fn chat(
    moat: &Daemon,
    key: &str,
    body: Value,
    extra: &[(&str, &str)],
) -> (u16, Value, Option<u64>) {
    let auth = format!("Bearer {key}");
    let mut headers = vec![("authorization", auth.as_str())];
    headers.extend_from_slice(extra);
    let (status, h, v) = post_json(&moat.url(CHAT), &body, &headers).await;
    let retry = h
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok());
    (status.as_u16(), v, retry)
}

fn ask(model: &str) -> Value {
    json!({"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4})
}

async fn models(moat: &Daemon, key: &str) -> Vec<String> {
    let auth = format!("Bearer {key}");
    let (status, _, body) = fetch(
        "GET",
        &moat.url("/v1/models"),
        &[("authorization", &auth)],
        "",
    )
    .await;
    assert_eq!(status, 200);
    let v: Value = serde_json::from_slice(&body).unwrap();
    let mut names: Vec<String> = v["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap().to_owned())
        .collect();
    names.sort();
    names
}

const POLICY: &str = r#"
[roles.reader]
permissions = ["model:chat", "inference:local"]
[roles.analyst]
permissions = ["model:*", "inference:local", "logprobs"]
[roles.power]
permissions = ["model:*", "inference:*"]

[tenants.acme]
dedicated = true
local_only = true

[models.chat]
pool = "shared"
tenant_pools = { acme = "acme-gpu" }
[models.big]
pool = "ext"
"#;

fn pools(shared: &Sim, acme: &Sim, ext: &Sim) -> String {
    let pool = |name: &str, sim: &Sim, extra: &str| {
        format!(
            "[pools.{name}]\nhosts = [\"{}\"]\nhealth_interval_ms = 100\nhealth_timeout_ms = 500\n\
             connect_timeout_ms = 500\n{extra}\n",
            sim.addr
        )
    };
    format!(
        "{}{}{}",
        pool("shared", shared, ""),
        pool("acme-gpu", acme, "dedicated_to = \"acme\"\n"),
        pool("ext", ext, "provider = \"external\"\nexternal = true\n"),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_tenants_three_roles() {
    let shared = Sim::start(&[]);
    let mut acme_sim = Sim::start(&[]);
    let ext = Sim::start(&[]);
    let moat = Daemon::gateway(
        "",
        &format!("{}{POLICY}", pools(&shared, &acme_sim, &ext)),
        &[],
    );
    let mut keys = Vec::new();
    for tenant in ["acme", "beta"] {
        for role in ["reader", "analyst", "power"] {
            let (key, _) = principal(&moat, tenant, &format!("{tenant}-{role}"), &[role], &[]);
            keys.push((tenant, role, key));
        }
    }

    // (tenant, role, model, logprobs) → allowed?
    let allowed = |tenant: &str, role: &str, model: &str, logprobs: bool| -> bool {
        let model_ok = match model {
            // acme is dedicated and local-only: `big` (shared, external) never serves it.
            "big" => tenant == "beta" && role == "power",
            _ => true,
        };
        model_ok && (!logprobs || role == "analyst")
    };
    let (mut to_shared, mut to_acme, mut to_ext) = (0, 0, 0);
    for (tenant, role, key) in &keys {
        for model in ["chat", "big"] {
            for logprobs in [false, true] {
                let mut body = ask(model);
                if logprobs {
                    body["logprobs"] = json!(true);
                }
                let (status, v, _) = chat(&moat, key, body, &[]).await;
                let want = allowed(tenant, role, model, logprobs);
                if want {
                    assert_eq!(
                        status, 200,
                        "{tenant}/{role} {model} logprobs={logprobs}: {v}"
                    );
                    match (*tenant, model) {
                        ("acme", _) => to_acme += 1,
                        (_, "chat") => to_shared += 1,
                        _ => to_ext += 1,
                    }
                } else {
                    assert_eq!(
                        status, 403,
                        "{tenant}/{role} {model} logprobs={logprobs}: {v}"
                    );
                    assert_eq!(v["error"]["type"], "permission_error", "{v}");
                }
            }
        }
        let want: Vec<&str> = match (*tenant, *role) {
            ("beta", "power") => vec!["big", "chat"],
            _ => vec!["chat"],
        };
        assert_eq!(models(&moat, key).await, want, "{tenant}/{role} /v1/models");
    }
    assert_eq!(
        shared.requests().await,
        to_shared,
        "shared pool: beta's chat only"
    );
    assert_eq!(acme_sim.requests().await, to_acme, "acme's pool: acme only");
    assert_eq!(
        ext.requests().await,
        to_ext,
        "external pool: beta/power only"
    );
    assert!(to_acme > 0 && to_shared > 0 && to_ext > 0);

    // Tenant identity comes from the credential only.
    let acme_key = &keys[0].2;
    let mut body = ask("chat");
    body["tenant"] = json!("beta");
    let (status, v, _) = chat(&moat, acme_key, body, &[]).await;
    assert_eq!(status, 400, "a tenant field in the body is refused: {v}");
    let (status, _, _) = chat(
        &moat,
        acme_key,
        ask("chat"),
        &[("x-moat-tenant", "beta"), ("x-tenant", "beta")],
    )
    .await;
    assert_eq!(status, 200, "tenant headers are ignored");
    assert_eq!(
        acme_sim.requests().await,
        to_acme + 1,
        "still routed to acme's own pool"
    );
    assert_eq!(shared.requests().await, to_shared);

    // acme's pool down: no fallback to the shared pool, ever.
    acme_sim.kill();
    for _ in 0..5 {
        let (status, v, _) = chat(&moat, acme_key, ask("chat"), &[]).await;
        assert!(
            status == 502 || status == 503,
            "acme without its pool: {status} {v}"
        );
    }
    assert_eq!(
        shared.requests().await,
        to_shared,
        "the shared pool never saw acme"
    );
    // Beta is unaffected.
    let (status, _, _) = chat(&moat, &keys[3].2, ask("chat"), &[]).await;
    assert_eq!(status, 200);
}

#[test]
fn violating_configs_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("moat.toml");
    for (text, key) in [
        (
            "[tenants.acme]\ndedicated = true\n[pools.p]\nhosts = [\"127.0.0.1:1\"]\ndedicated_to = \"acme\"\n\
             [models.m]\npool = \"p\"\n",
            "models.m.pool",
        ),
        (
            "[tenants.acme]\nlocal_only = true\ndedicated = true\n[pools.p]\nhosts = [\"127.0.0.1:1\"]\n\
             dedicated_to = \"acme\"\nexternal = true\n",
            "pools.p.external",
        ),
        (
            "[pools.p]\nhosts = [\"127.0.0.1:1\"]\ndedicated_to = \"acme\"\n",
            "pools.p.dedicated_to",
        ),
    ] {
        std::fs::write(&path, format!("[segmentation]\nmode = \"off\"\n{text}")).unwrap();
        let out = Command::new(bin("moat"))
            .arg("--config")
            .arg(&path)
            .args(["config", "check"])
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{text} was accepted");
        assert!(stderr.contains(key), "{key} not named: {stderr}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quotas_refuse_at_the_limit_and_charge_once() {
    let sim = Sim::start(&["--chunks", "8"]);
    let slow = Sim::start(&["--chunks", "400", "--tokens-per-sec", "20"]);
    let config = format!(
        "[pools.p]\nhosts = [\"{}\"]\n[pools.slow]\nhosts = [\"{}\"]\n\
         [models.chat]\npool = \"p\"\n[models.slow]\npool = \"slow\"\n\
         [tenants.rpm]\nquota = {{ requests_per_minute = 5 }}\nkey_quota = {{ requests_per_minute = 3 }}\n\
         [tenants.tpm]\nkey_quota = {{ tokens_per_minute = 200 }}\n\
         [tenants.testing]\nkey_quota = {{ concurrent_streams = 1 }}\n",
        sim.addr, slow.addr
    );
    let moat = Daemon::gateway("", &config, &[]);
    let (a, _) = principal(&moat, "rpm", "rpm-a", &["tester"], &[]);
    let (b, _) = principal(&moat, "rpm", "rpm-b", &["tester"], &[]);

    // An attempt the upstream failed generated nothing: the SDK's retry of it is not charged
    // twice (the attempt is refunded).
    sim.fail(json!({"mode": "error500", "count": 1})).await;
    let (status, v, _) = chat(&moat, &a, ask("chat"), &[]).await;
    assert_eq!(status, 502, "{v}");

    // Requests per minute: key a gets exactly 3.
    for i in 0..3 {
        let (status, v, _) = chat(&moat, &a, ask("chat"), &[]).await;
        assert_eq!(status, 200, "request {i}: {v}");
    }
    for _ in 0..3 {
        let (status, v, retry) = chat(&moat, &a, ask("chat"), &[]).await;
        assert_eq!(status, 429, "{v}");
        assert_eq!(v["error"]["code"], "rate_limit_exceeded");
        let retry = retry.expect("Retry-After");
        assert!(
            (58..=60).contains(&retry),
            "the oldest charge expires in a minute: {retry}"
        );
    }
    // The refusals charged nothing: the tenant (limit 5) still has 2 for key b.
    for _ in 0..2 {
        let (status, v, _) = chat(&moat, &b, ask("chat"), &[]).await;
        assert_eq!(status, 200, "{v}");
    }
    let (status, v, retry) = chat(&moat, &b, ask("chat"), &[]).await;
    assert_eq!(status, 429, "the tenant's 6th: {v}");
    assert!(retry.is_some_and(|r| (1..=60).contains(&r)));
    assert_eq!(
        sim.requests().await,
        6,
        "the failed attempt and 5 admitted ones; refused requests never reached the upstream"
    );

    // Tokens per minute: 100 tokens reserved (max_tokens) plus the prompt; reconciled with
    // the upstream's usage (8 + 1 tokens), so many such requests fit in 200.
    let (t, _) = principal(&moat, "tpm", "tpm-a", &["tester"], &[]);
    let mut big = ask("chat");
    big["max_tokens"] = json!(100);
    for i in 0..5 {
        let (status, v, _) = chat(&moat, &t, big.clone(), &[]).await;
        assert_eq!(status, 200, "request {i} after reconciliation: {v}");
        assert_eq!(v["usage"]["total_tokens"], 9);
    }
    // Streams are reconciled from their last usage event (`include_usage`).
    let (t2, _) = principal(&moat, "tpm", "tpm-b", &["tester"], &[]);
    let mut streamed = big.clone();
    streamed["stream"] = json!(true);
    streamed["stream_options"] = json!({"include_usage": true});
    let auth2 = format!("Bearer {t2}");
    for i in 0..5 {
        let resp = moat_tests::send(
            "POST",
            &moat.url(CHAT),
            &[
                ("content-type", "application/json"),
                ("authorization", &auth2),
            ],
            streamed.to_string(),
        )
        .await;
        assert_eq!(resp.status(), 200, "stream {i} after reconciliation");
        let mut events = Events::new(resp);
        while events.next().await.unwrap().is_some() {}
    }
    // 5 × 9 = 45 used; a reservation of 150 + prompt no longer fits under 200.
    big["max_tokens"] = json!(150);
    let (status, v, retry) = chat(&moat, &t, big.clone(), &[]).await;
    assert_eq!(status, 429, "{v}");
    assert!(retry.is_some_and(|r| (58..=60).contains(&r)), "{retry:?}");
    big["max_tokens"] = json!(250);
    let (status, v, _) = chat(&moat, &t, big, &[]).await;
    assert_eq!(status, 400, "a request that can never fit: {v}");

    // Concurrent streams: one at a time for the harness's key.
    let mut stream = ask("slow");
    stream["stream"] = json!(true);
    stream["max_tokens"] = json!(400);
    let first = moat.open(CHAT, &stream).await;
    assert_eq!(first.status(), 200);
    let mut events = Events::new(first);
    assert!(events.next().await.unwrap().is_some());
    let (status, retry, v) = moat.post_json(CHAT, &stream, &[]).await;
    assert_eq!(status, 429, "{v}");
    assert_eq!(retry_of(&retry), Some(1));
    let (status, _, _) = moat.post_json(CHAT, &ask("chat"), &[]).await;
    assert_eq!(status, 200, "a non-streamed request is not a stream");
    drop(events);
    let ok = moat_tests::eventually(Duration::from_secs(3), || async {
        let mut s = ask("slow");
        s["stream"] = json!(true);
        s["max_tokens"] = json!(2);
        moat.post_json(CHAT, &s, &[]).await.0 == 200
    })
    .await;
    assert!(ok, "the slot comes back when the stream ends");
}

/// Sends `request` until it answers `want` (a change made by another process lands within
/// the daemon's revocation poll) or 3 s passed; returns the last status and body.
async fn until_status<F, Fut>(want: u16, mut request: F) -> (u16, Value)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = (u16, Value, Option<u64>)>,
{
    let deadline = Instant::now() + Duration::from_secs(3);
    loop {
        let (status, v, _) = request().await;
        if status == want || Instant::now() >= deadline {
            return (status, v);
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Opens a chat stream with `key` and waits for its first event.
async fn open_stream(moat: &Daemon, key: &str, body: &Value) -> Events {
    let auth = format!("Bearer {key}");
    let resp = moat_tests::send(
        "POST",
        &moat.url(CHAT),
        &[
            ("content-type", "application/json"),
            ("authorization", &auth),
        ],
        body.to_string(),
    )
    .await;
    assert_eq!(resp.status(), 200);
    let mut events = Events::new(resp);
    assert!(events.next().await.unwrap().is_some());
    events
}

fn retry_of(h: &hyper::HeaderMap) -> Option<u64> {
    h.get("retry-after")?.to_str().ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn narrowed_key_and_removed_role_lose_access_and_revoked_streams_end() {
    let sim = Sim::start(&["--chunks", "400", "--tokens-per-sec", "20"]);
    let config = format!(
        "[auth]\nrevocation_poll_ms = 100\n\
         [pools.p]\nhosts = [\"{}\"]\n[pools.ext]\nhosts = [\"{}\"]\nprovider = \"external\"\nexternal = true\n\
         [models.chat]\npool = \"p\"\n[models.big]\npool = \"ext\"\n\
         [roles.reader]\npermissions = [\"model:chat\", \"inference:local\"]\n\
         [roles.power]\npermissions = [\"model:*\", \"inference:*\", \"logprobs\"]\n",
        sim.addr, sim.addr
    );
    let moat = Daemon::gateway("", &config, &[]);
    let (key, key_id) = principal(&moat, "beta", "bob", &["reader", "power"], &[]);
    let (status, v, _) = chat(&moat, &key, ask("big"), &[]).await;
    assert_eq!(status, 200, "{v}");

    // Narrow the key from another process; the daemon learns of it within one poll.
    cli(&moat, &["keys", "narrow", &key_id, "--role", "reader"]);
    let (status, v) = until_status(403, || chat(&moat, &key, ask("big"), &[])).await;
    assert_eq!(status, 403, "the narrowed key is refused the model: {v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    assert_eq!(models(&moat, &key).await, ["chat"]);
    let (status, _, _) = chat(&moat, &key, ask("chat"), &[]).await;
    assert_eq!(status, 200);

    // A role taken from the user is gone from its keys.
    cli(&moat, &["users", "roles", "bob", "--role", "power"]);
    let (status, v) = until_status(403, || chat(&moat, &key, ask("chat"), &[])).await;
    assert_eq!(status, 403, "key [reader] ∩ user [power] = nothing: {v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    assert!(models(&moat, &key).await.is_empty());

    // A revoked key's open stream is closed.
    let (key2, key2_id) = principal(&moat, "beta", "carol", &["reader"], &[]);
    let mut body = ask("chat");
    body["stream"] = json!(true);
    body["max_tokens"] = json!(400);
    let mut events = open_stream(&moat, &key2, &body).await;
    cli(&moat, &["keys", "revoke", &key2_id]);
    let mut last = String::new();
    // The daemon learns of the revocation within one poll (100 ms); the deadline is slack.
    let ended = tokio::time::timeout(Duration::from_secs(3), async {
        loop {
            match events.next().await {
                Ok(Some(e)) => last = e,
                _ => return,
            }
        }
    })
    .await;
    assert!(ended.is_ok(), "the stream of a revoked key kept going");
    assert!(last.contains("revoked"), "the last event says why: {last}");
    let (status, _, _) = chat(&moat, &key2, ask("chat"), &[]).await;
    assert_eq!(status, 401);

    // So is a disabled user's.
    let (key3, _) = principal(&moat, "beta", "dan", &["reader"], &[]);
    let mut events = open_stream(&moat, &key3, &body).await;
    cli(&moat, &["users", "disable", "dan"]);
    let ended = tokio::time::timeout(Duration::from_secs(2), async {
        while let Ok(Some(_)) = events.next().await {}
    })
    .await;
    assert!(ended.is_ok(), "the stream of a disabled user kept going");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_plane_is_separate_and_permissioned() {
    let sim = Sim::start(&[]);
    let config = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\n\
         [pools.p]\nhosts = [\"{}\"]\n[models.chat]\npool = \"p\"\n\
         [roles.ops]\npermissions = [\"admin:*\"]\n[roles.keyadmin]\npermissions = [\"admin:keys\"]\n",
        sim.addr
    );
    let moat = Daemon::gateway("", &config, &[]);
    let (ops, _) = principal(&moat, "testing", "opsy", &["ops", "tester"], &[]);
    let (other_ops, other_ops_id) = principal(&moat, "other", "other-ops", &["ops"], &[]);

    // An inference key gets 403 on every admin route; the data plane has none at all.
    for (m, path) in [
        ("GET", "/admin/keys"),
        ("GET", "/admin/users"),
        ("GET", "/admin/tenants"),
        ("GET", "/admin/policy"),
    ] {
        let (status, v) = moat.admin(m, path, moat.key(), None).await;
        assert_eq!(status, 403, "{path}: {v}");
        assert_eq!(v["error"]["type"], "permission_error");
        let auth = format!("Bearer {ops}");
        let (status, _, _) = fetch(m, &moat.url(path), &[("authorization", &auth)], "").await;
        assert_eq!(status, 404, "{path} on the data plane");
    }
    let (status, v) = moat.admin("GET", "/admin/keys", "moat_nope", None).await;
    assert_eq!(status, 401, "{v}");
    assert_eq!(v["error"]["type"], "authentication_error", "{v}");

    // Users and keys made over the admin plane, in the admin's tenant.
    let (status, v) = moat
        .admin(
            "POST",
            "/admin/users",
            &ops,
            Some(json!({"username": "dave", "roles": ["tester"]})),
        )
        .await;
    assert_eq!(status, 201, "{v}");
    assert_eq!(v["tenant"], "testing");
    let (status, v) = moat
        .admin(
            "POST",
            "/admin/users",
            &ops,
            Some(json!({"username": "eve", "tenant": "other"})),
        )
        .await;
    assert_eq!(status, 400, "no tenant field: {v}");
    assert_eq!(v["error"]["type"], "invalid_request_error");
    let (status, v) = moat
        .admin("POST", "/admin/keys", &ops, Some(json!({"user": "dave"})))
        .await;
    assert_eq!(status, 201, "{v}");
    let (dave, dave_id) = (
        v["key"].as_str().unwrap().to_owned(),
        v["key_id"].as_str().unwrap().to_owned(),
    );
    assert_eq!(chat(&moat, &dave, ask("chat"), &[]).await.0, 200);
    let (status, v) = moat
        .admin("GET", "/admin/policy?user=dave", &ops, None)
        .await;
    assert_eq!(status, 200);
    assert_eq!(v["models"]["chat"]["pool"], "p", "{v}");

    // Another tenant's admin cannot touch it: to it the key does not exist.
    let path = format!("/admin/keys/{dave_id}/revoke");
    let (status, v) = moat.admin("POST", &path, &other_ops, None).await;
    assert_eq!(status, 404, "{v}");
    assert_eq!(
        v["error"]["message"],
        format!("no key `{dave_id}` in your tenant"),
        "{v}"
    );
    let (status, v) = moat.admin("GET", "/admin/keys", &other_ops, None).await;
    assert_eq!(status, 200, "{v}");
    let listed: Vec<&str> = v["keys"]
        .as_array()
        .unwrap_or_else(|| panic!("a key list: {v}"))
        .iter()
        .map(|k| k["key_id"].as_str().unwrap())
        .collect();
    assert_eq!(
        listed,
        [other_ops_id.as_str()],
        "only its own tenant's keys"
    );
    let (status, v) = moat.admin("GET", "/admin/keys", &ops, None).await;
    assert_eq!(status, 200, "{v}");
    assert!(
        v["keys"]
            .as_array()
            .unwrap()
            .iter()
            .any(|k| k["key_id"] == dave_id.as_str()),
        "the key's own tenant lists it: {v}"
    );

    // Narrowed in this process: the very next request is judged on the new roles.
    let (status, v) = moat
        .admin(
            "POST",
            &format!("/admin/keys/{dave_id}/narrow"),
            &ops,
            Some(json!({"roles": []})),
        )
        .await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"key_id": dave_id, "roles": []}));
    let (status, v, _) = chat(&moat, &dave, ask("chat"), &[]).await;
    assert_eq!(status, 403, "{v}");
    assert_eq!(v["error"]["type"], "permission_error", "{v}");
    let (status, v) = moat.admin("POST", &path, &ops, None).await;
    assert_eq!(status, 200, "{v}");
    assert_eq!(v, json!({"key_id": dave_id, "changed": true}));
    assert_eq!(
        chat(&moat, &dave, ask("chat"), &[]).await.0,
        401,
        "revoked at once"
    );
}
