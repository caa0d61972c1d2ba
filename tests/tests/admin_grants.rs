//! End-to-end: what an admin-plane caller may hand out, over the real admin listener of a
//! real `moat serve`, with principals made by the real (all-powerful) CLI.
//!
//! - every admin permission set that exists (`admin:keys`, `admin:users`, both, `admin:*`,
//!   `admin:*` with inference rights) × every kind of role (an inference role, a key-admin
//!   role, `admin:*`): creating a user with it, setting it on a user, minting a key for a
//!   user who has it — allowed exactly when the caller holds the route's permission and
//!   everything the role carries, and the role carries no global permission;
//! - the two escalations this closes: a key admin minting the boss a key with the boss's
//!   `admin:*` (then listing every tenant), a user admin giving itself `admin:*`;
//! - a taken username is refused the same way whether it is taken in the caller's tenant or
//!   in another one (no directory of other tenants' users).

use moat_tests::{Daemon, Sim};
use serde_json::{Value, json};

struct Plane {
    moat: Daemon,
    _sim: Sim,
}

impl Plane {
    fn start() -> Plane {
        let sim = Sim::start(&[]);
        let config = format!(
            "[admin]\nlisten = \"127.0.0.1:0\"\n\
             [pools.p]\nhosts = [\"{}\"]\n[models.chat]\npool = \"p\"\n\
             [roles.user]\npermissions = [\"model:chat\", \"inference:*\"]\n\
             [roles.keyadmin]\npermissions = [\"admin:keys\"]\n\
             [roles.useradmin]\npermissions = [\"admin:users\"]\n\
             [roles.ops]\npermissions = [\"admin:*\"]\n",
            sim.addr
        );
        let moat = Daemon::gateway("", &config, &[]);
        moat.cli_ok(&["tenants", "add", "acme"], None);
        moat.cli_ok(&["tenants", "add", "beta"], None);
        Plane { moat, _sim: sim }
    }

    /// A user in tenant `acme` with `roles`, and (if `key`) a key with all of them.
    fn user(&self, name: &str, roles: &[&str], key: bool) -> Option<String> {
        self.moat.add_user("acme", name, roles);
        key.then(|| self.moat.create_key(name))
    }

    async fn call(&self, method: &str, path: &str, key: &str, body: Option<Value>) -> (u16, Value) {
        self.moat.admin(method, path, key, body).await
    }

    fn roles_of(&self, name: &str) -> Vec<String> {
        let out = self.moat.cli_ok(&["users", "list", "--json"], None);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        let users = v.as_array().or(v["users"].as_array()).cloned().unwrap();
        let u = users.iter().find(|u| u["username"] == name).unwrap();
        serde_json::from_value(u["roles"].clone()).unwrap()
    }

    fn key_count(&self, name: &str) -> usize {
        let out = self
            .moat
            .cli_ok(&["keys", "list", "--user", name, "--json"], None);
        let v: Value = serde_json::from_str(out.trim()).unwrap();
        v.as_array().or(v["keys"].as_array()).map_or(0, Vec::len)
    }
}

/// A refusal for handing out too much: 403, OpenAI-shaped, with a reason.
fn assert_denied(cell: &str, status: u16, v: &Value) {
    assert_eq!(status, 403, "{cell}: {v}");
    assert_eq!(v["error"]["type"], "permission_error", "{cell}: {v}");
    assert_eq!(v["error"]["code"], "permission_denied", "{cell}: {v}");
    assert!(
        v["error"]["message"]
            .as_str()
            .is_some_and(|m| !m.is_empty()),
        "{cell}: {v}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_permissions_times_target_roles() {
    let plane = Plane::start();
    // (caller's roles, may it: create a user with / set on a user / mint a key for a holder of
    // `user`, `keyadmin`, `ops`).
    #[allow(clippy::type_complexity)]
    let matrix: &[(&str, &[&str], [bool; 3], [bool; 3])] = &[
        // (name, roles, users: create & set roles, keys: mint)
        ("k", &["keyadmin"], [false; 3], [false, true, false]),
        ("u", &["useradmin"], [false; 3], [false; 3]),
        (
            "ku",
            &["keyadmin", "useradmin"],
            [false, true, false],
            [false, true, false],
        ),
        ("o", &["ops"], [false, true, false], [false, true, false]),
        (
            "ou",
            &["ops", "user"],
            [true, true, false],
            [true, true, false],
        ),
    ];
    let targets = ["user", "keyadmin", "ops"];
    for target in targets {
        plane.user(&format!("holder-{target}"), &[target], false);
    }
    for (name, held, users_ok, keys_ok) in matrix {
        let key = plane.user(&format!("caller-{name}"), held, true).unwrap();
        for (i, target) in targets.iter().enumerate() {
            let cell = format!("caller {held:?} handing out `{target}`");

            let new = format!("new-{name}-{target}");
            let body = json!({"username": new, "roles": [target]});
            let (status, v) = plane.call("POST", "/admin/users", &key, Some(body)).await;
            if users_ok[i] {
                assert_eq!(status, 201, "{cell}: create: {v}");
                assert_eq!(plane.roles_of(&new), [*target]);
            } else {
                assert_denied(&format!("{cell}: create"), status, &v);
            }

            let plain = format!("plain-{name}-{target}");
            plane.user(&plain, &[], false);
            let path = format!("/admin/users/{plain}/roles");
            let (status, v) = plane
                .call("POST", &path, &key, Some(json!({"roles": [target]})))
                .await;
            if users_ok[i] {
                assert_eq!(status, 200, "{cell}: set roles: {v}");
                assert_eq!(plane.roles_of(&plain), [*target]);
            } else {
                assert_denied(&format!("{cell}: set roles"), status, &v);
                assert!(plane.roles_of(&plain).is_empty(), "{cell}");
            }

            let holder = format!("holder-{target}");
            let before = plane.key_count(&holder);
            let body = json!({"user": holder});
            let (status, v) = plane.call("POST", "/admin/keys", &key, Some(body)).await;
            if keys_ok[i] {
                assert_eq!(status, 201, "{cell}: key: {v}");
                assert_eq!(plane.key_count(&holder), before + 1, "{cell}");
            } else {
                assert_denied(&format!("{cell}: key"), status, &v);
                assert_eq!(plane.key_count(&holder), before, "{cell}");
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_key_with_the_boss_rights_and_no_self_promotion() {
    let plane = Plane::start();
    plane.user("boss", &["ops", "keyadmin"], false);
    let keyadmin = plane.user("keys-person", &["keyadmin"], true).unwrap();
    let useradmin = plane.user("users-person", &["useradmin"], true).unwrap();

    // The key admin asks for a key of the boss: refused, with the reason; none was made.
    let (status, v) = plane
        .call(
            "POST",
            "/admin/keys",
            &keyadmin,
            Some(json!({"user": "boss"})),
        )
        .await;
    assert_denied("boss key", status, &v);
    let msg = v["error"]["message"].as_str().unwrap();
    assert!(msg.contains("admin:tenants, audit:read"), "{msg}");
    assert_eq!(plane.key_count("boss"), 0);
    // Nor does its own key list every tenant.
    let (status, _) = plane.call("GET", "/admin/tenants", &keyadmin, None).await;
    assert_eq!(status, 403);
    // Narrowed to what the key admin holds itself, it may.
    let (status, v) = plane
        .call(
            "POST",
            "/admin/keys",
            &keyadmin,
            Some(json!({"user": "boss", "roles": ["keyadmin"]})),
        )
        .await;
    assert_eq!(status, 201, "{v}");

    // The user admin gives itself admin:*: refused, its roles unchanged.
    let (status, v) = plane
        .call(
            "POST",
            "/admin/users/users-person/roles",
            &useradmin,
            Some(json!({"roles": ["useradmin", "ops"]})),
        )
        .await;
    assert_denied("self promotion", status, &v);
    assert_eq!(plane.roles_of("users-person"), ["useradmin"]);
    let (status, _) = plane.call("GET", "/admin/tenants", &useradmin, None).await;
    assert_eq!(status, 403);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_taken_username_answers_the_same_wherever_it_is_taken() {
    let plane = Plane::start();
    let admin = plane.user("people-admin", &["useradmin"], true).unwrap();
    plane.user("in-acme", &[], false);
    plane.moat.add_user("beta", "in-beta", &[]);

    let create = |name: &str| json!({"username": name});
    let (own_status, own) = plane
        .call("POST", "/admin/users", &admin, Some(create("in-acme")))
        .await;
    let (else_status, elsewhere) = plane
        .call("POST", "/admin/users", &admin, Some(create("in-beta")))
        .await;
    assert_eq!(own_status, 400, "{own}");
    assert_eq!((else_status, &elsewhere), (own_status, &own));
    assert_eq!(own["error"]["message"], "this username is not available");
    assert!(!elsewhere.to_string().contains("beta"), "{elsewhere}");
    // A free name is created (the only thing a global namespace cannot hide).
    let (status, v) = plane
        .call("POST", "/admin/users", &admin, Some(create("fresh")))
        .await;
    assert_eq!(status, 201, "{v}");
}
