//! `[server]` and `[admin]`: the listeners and the service user.

use super::Invalid;
use crate::config::{AdminConfig, ServerConfig};

pub(in crate::config) fn server(server: &ServerConfig) -> Result<(), Invalid> {
    if server.max_body_bytes == 0 {
        return Err(Invalid::new("server.max_body_bytes", "must be at least 1"));
    }
    for (key, ms) in [
        ("server.header_timeout_ms", server.header_timeout_ms),
        ("server.body_timeout_ms", server.body_timeout_ms),
        ("server.send_timeout_ms", server.send_timeout_ms),
    ] {
        if !(1..=3_600_000).contains(&ms) {
            return Err(Invalid::new(key, "must be between 1 and 3600000 (an hour)"));
        }
    }
    if server.user.is_empty() {
        return Err(Invalid::new("server.user", "must not be empty"));
    }
    // Shared by every program that wants "no privileges": any of them could signal the worker
    // and read its data directory. (`moat serve` also refuses the overflow uid under any name,
    // and a user that runs other programs.)
    if server.user == "nobody" {
        return Err(Invalid::new(
            "server.user",
            "must not be `nobody`, an account other programs share: give moat a user of its own \
             (default `moat`)",
        ));
    }
    Ok(())
}

/// The admin plane listens on loopback only, never where the data plane does.
pub(in crate::config) fn admin(admin: &AdminConfig, server: &ServerConfig) -> Result<(), Invalid> {
    let Some(a) = admin.listen else {
        return Ok(());
    };
    if !a.ip().is_loopback() {
        return Err(Invalid::new(
            "admin.listen",
            format!("{a} is not a loopback address; the admin plane is local only"),
        ));
    }
    if a == server.listen && a.port() != 0 {
        return Err(Invalid::new(
            "admin.listen",
            "must differ from `server.listen`: the data plane has no admin route",
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use crate::config::tests::load;

    #[test]
    fn server_values_are_bounded() {
        let e = load("[server]\nuser = \"\"\n").unwrap_err();
        assert_eq!(e.key, "server.user");
        let e = load("[server]\nuser = \"nobody\"\n").unwrap_err();
        assert_eq!(e.key, "server.user");
        assert!(e.reason.contains("nobody"), "{e}");
        let e = load("[server]\nmax_body_bytes = 0\n").unwrap_err();
        assert_eq!(e.key, "server.max_body_bytes");
        for key in ["header_timeout_ms", "body_timeout_ms", "send_timeout_ms"] {
            let e = load(&format!("[server]\n{key} = 0\n")).unwrap_err();
            assert_eq!(e.key, format!("server.{key}"));
            let e = load(&format!("[server]\n{key} = 3600001\n")).unwrap_err();
            assert_eq!(e.key, format!("server.{key}"));
            assert!(load(&format!("[server]\n{key} = 500\n")).is_ok());
        }
    }

    #[test]
    fn admin_plane_is_loopback_and_apart() {
        assert!(load("[admin]\nlisten = \"127.0.0.1:9090\"\n").is_ok());
        let e = load("[admin]\nlisten = \"0.0.0.0:9090\"\n").unwrap_err();
        assert_eq!(e.key, "admin.listen");
        assert!(e.reason.contains("not a loopback address"), "{e}");
        let e = load("[admin]\nlisten = \"127.0.0.1:8080\"\n").unwrap_err();
        assert_eq!(e.key, "admin.listen");
        assert!(e.reason.starts_with("must differ"), "{e}");
    }
}
