//! Mutual TLS from the gateway to its model servers, across the three-host lab (gateway,
//! inference host, rogue host; see `moat_tests::netns`).
//!
//! The inference host's guard admits packets by source address; a rogue host that takes over
//! the gateway's address gets past it. What stops that host is the model server asking for a
//! client certificate from the gateway's private CA. The material comes from
//! `moat certs init`; the model server is `moat-sim --tls-cert … --client-ca …`.
//!
//! Root required (namespaces, cgroups, eBPF); never skipped. Everything is removed on drop.

use std::{
    io::{BufRead, BufReader, Read, Write},
    net::{SocketAddr, TcpStream},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use moat_tests::{
    Daemon, bin,
    http::{Client, Request},
    kernel::{KillOnDrop, require_root},
    netns::{Lab, Netns, PortReservation, sa},
};
use nix::sys::signal::Signal;
use rustls_pki_types::{CertificateDer, ServerName, pem::PemObject};
use serde_json::Value;

/// `moat certs init --out dir --host host`; returns the folder.
fn certs_init(dir: &Path, name: &str, host: &str) -> PathBuf {
    let out = dir.join(name);
    let o = Command::new(bin("moat"))
        .args(["certs", "init", "--host", host, "--out"])
        .arg(&out)
        .output()
        .unwrap();
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let printed = String::from_utf8_lossy(&o.stdout);
    assert!(printed.contains("tls_client_cert_file"), "{printed}");
    out
}

/// A client certificate issued by the CA in `ca_dir` (its ca.pem and ca.key), valid from
/// `from` to `until` (Unix seconds), written to `<stem>.pem` / `<stem>.key` (0600).
fn issue_client(ca_dir: &Path, out: &Path, stem: &str, from: i64, until: i64) {
    let ca_key =
        rcgen::KeyPair::from_pem(&std::fs::read_to_string(ca_dir.join("ca.key")).unwrap()).unwrap();
    let issuer = rcgen::Issuer::from_ca_cert_pem(
        &std::fs::read_to_string(ca_dir.join("ca.pem")).unwrap(),
        ca_key,
    )
    .unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let mut p = rcgen::CertificateParams::default();
    p.distinguished_name
        .push(rcgen::DnType::CommonName, format!("moat gateway {stem}"));
    p.extended_key_usages = vec![rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    p.not_before = time::OffsetDateTime::from_unix_timestamp(from).unwrap();
    p.not_after = time::OffsetDateTime::from_unix_timestamp(until).unwrap();
    let cert = p.signed_by(&key, &issuer).unwrap();
    std::fs::write(out.join(format!("{stem}.pem")), cert.pem()).unwrap();
    write_key(&out.join(format!("{stem}.key")), &key.serialize_pem());
}

fn write_key(path: &Path, pem: &str) {
    use std::os::unix::fs::OpenOptionsExt;
    let _ = std::fs::remove_file(path);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    f.write_all(pem.as_bytes()).unwrap();
}

/// Puts `src.pem`/`src.key` where the gateway's config points (`client.pem`/`client.key`),
/// as an operator rotating a certificate would: replace the files, then SIGHUP.
fn install_client(dir: &Path, src_dir: &Path, stem: &str) {
    std::fs::copy(
        src_dir.join(format!("{stem}.pem")),
        dir.join("client.pem.new"),
    )
    .unwrap();
    std::fs::rename(dir.join("client.pem.new"), dir.join("client.pem")).unwrap();
    write_key(
        &dir.join("client.key"),
        &std::fs::read_to_string(src_dir.join(format!("{stem}.key"))).unwrap(),
    );
}

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

/// A TLS model server on `0.0.0.0:port` inside `ns` that requires a client certificate from
/// `certs/ca.pem`, with its control routes on a loopback port of the same namespace.
struct TlsSim {
    control: SocketAddr,
    _proc: KillOnDrop,
}

impl TlsSim {
    fn start(ns: &Netns, port: u16, certs: &Path, host: &str) -> TlsSim {
        let mut child = ns
            .command(bin("moat-sim"))
            .args(["--listen", &format!("0.0.0.0:{port}")])
            .args(["--control-listen", "127.0.0.1:0"])
            .arg("--tls-cert")
            .arg(certs.join(format!("server-{host}.pem")))
            .arg("--tls-key")
            .arg(certs.join(format!("server-{host}.key")))
            .arg("--client-ca")
            .arg(certs.join("ca.pem"))
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moat-sim");
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        assert!(line.starts_with("LISTENING"), "moat-sim: {line}");
        line.clear();
        out.read_line(&mut line).unwrap();
        let control = line
            .strip_prefix("CONTROL ")
            .and_then(|a| a.trim().parse().ok())
            .unwrap_or_else(|| panic!("moat-sim: {line}"));
        TlsSim {
            control,
            _proc: KillOnDrop(child),
        }
    }

    fn stats(&self, lab: &Lab) -> Value {
        let control = self.control;
        let url = format!("http://{control}/_sim/stats");
        let r = lab
            .inference
            .run(move || Client::new().get(url).send())
            .expect("sim stats");
        assert_eq!(r.status(), 200);
        r.json().unwrap()
    }

    /// Inference requests answered so far.
    fn requests(&self, lab: &Lab) -> u64 {
        self.stats(lab)["requests"].as_u64().unwrap()
    }
}

/// Sends `request` (a chat through the gateway, [`Daemon::chat`]) from inside `ns`: its
/// status and body (0 and nothing: no answer).
fn chat(ns: &Netns, request: &Request) -> (u16, String) {
    let request = request.clone();
    ns.run(move || request.send())
        .map(|r| (r.status().as_u16(), r.text().unwrap_or_default()))
        .unwrap_or((0, String::new()))
}

/// The DER of the first certificate in a PEM file, base64 (as `moat-sim` reports it).
fn der_b64(pem: &Path) -> String {
    use base64::Engine as _;
    let der = CertificateDer::from_pem_file(pem).unwrap();
    base64::engine::general_purpose::STANDARD.encode(der.as_ref())
}

/// What the rogue host gets from a TLS exchange with the model port, its socket bound to
/// `from`: `Ok(answer)` when an HTTP answer came back, `Err(why)` otherwise. The rogue trusts
/// the CA (it knows the public certificate), but has no client certificate.
fn rogue_tls_request(
    rogue: &Netns,
    from: &str,
    to: SocketAddr,
    ca: &Path,
) -> Result<String, String> {
    let roots = {
        let mut r = rustls::RootCertStore::empty();
        r.add(CertificateDer::from_pem_file(ca).unwrap()).unwrap();
        r
    };
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let (from, to) = match (from.parse().unwrap(), to) {
        (std::net::IpAddr::V4(f), SocketAddr::V4(t)) => (f, t),
        _ => unreachable!("IPv4 only"),
    };
    rogue.run(move || {
        let tcp = connect_from(from, to).map_err(|e| format!("TCP connect: {e}"))?;
        tcp.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let name = ServerName::try_from(Lab::INF_GW4).unwrap();
        let conn = rustls::ClientConnection::new(Arc::new(config), name).unwrap();
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        let body = r#"{"model":"m","messages":[{"role":"user","content":"hi"}]}"#;
        write!(
            tls,
            "POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n{body}",
            body.len()
        )
        .map_err(|e| format!("TLS: {e}"))?;
        let mut answer = String::new();
        match tls.read_to_string(&mut answer) {
            Ok(_) if answer.starts_with("HTTP/") => Ok(answer),
            Ok(_) => Err(format!("no answer ({} bytes)", answer.len())),
            Err(e) => Err(format!("TLS: {e}")),
        }
    })
}

/// A TCP connection from `from` (a local address of the calling thread's namespace) to `to`,
/// given up after two seconds without an answer (SO_SNDTIMEO bounds `connect`).
fn connect_from(
    from: std::net::Ipv4Addr,
    to: std::net::SocketAddrV4,
) -> std::io::Result<TcpStream> {
    use std::os::fd::FromRawFd;
    let sin = |ip: std::net::Ipv4Addr, port: u16| libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    let len = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    let check = |r: libc::c_int| {
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: plain socket calls on a descriptor owned by the returned stream.
    unsafe {
        let fd = check(libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0))?;
        let tcp = TcpStream::from_raw_fd(fd);
        tcp.set_write_timeout(Some(Duration::from_secs(2)))?;
        let local = sin(from, 0);
        check(libc::bind(fd, (&raw const local).cast(), len))?;
        let remote = sin(*to.ip(), to.port());
        check(libc::connect(fd, (&raw const remote).cast(), len))?;
        Ok(tcp)
    }
}

#[test]
fn mtls_keeps_a_rogue_host_with_the_gateways_address_out() {
    require_root();
    let lab = Lab::new();
    let port = PortReservation::new();
    let p = port.port;
    let (mut gateway, mut inference) = (Daemon::enforcing(), Daemon::enforcing());
    let d = gateway.dir().to_path_buf();
    let d = d.as_path();
    let certs = certs_init(d, "certs", Lab::INF_GW4);
    let other = certs_init(d, "other", Lab::INF_GW4);
    let sim = TlsSim::start(&lab.inference, p, &certs, Lab::INF_GW4);
    let gateway_cgroup = gateway.cgroup().child("gateway");

    // The inference host: the guard (cgroup_skb) admits only the gateway's address.
    inference.write_config(&format!(
        "[segmentation]\npin_root = \"{}\"\n[segmentation.inference]\nmodel_ports = [{p}]\n\
         allowed_gateways = [\"{}\"]\nattach = \"cgroup_skb\"\n",
        inference.pin_root().display(),
        Lab::GW4,
    ));
    inference.start_in(&lab.inference);
    inference.wait_log("inference guard active");

    // The gateway: one mTLS pool; its key is root-only, the worker gets it from the
    // supervisor. No passive ejection in the way of the failure checks below.
    install_client(d, &certs, "gateway-client");
    gateway.write_config(&format!(
        "[server]\nlisten = \"127.0.0.1:0\"\ndata_dir = \"data\"\nuser = \"moat\"\n\
         [pools.gpu]\nhosts = [\"{}:{p}\"]\ntls = true\ntls_ca_file = \"{}\"\n\
         tls_client_cert_file = \"client.pem\"\ntls_client_key_file = \"client.key\"\n\
         health_interval_ms = 200\neject_after_failures = 1000\n\
         [models.m]\npool = \"gpu\"\n\
         [roles.tester]\npermissions = [\"model:*\", \"inference:*\"]\n\
         [segmentation]\ngateway_cgroup = \"{}\"\npin_root = \"{}\"\n",
        Lab::INF_GW4,
        certs.join("ca.pem").display(),
        gateway_cgroup.relative.display(),
        gateway.pin_root().display()
    ));
    gateway.create_tester_key();
    gateway.start_in(&lab.gateway);
    let hup = || gateway.signal(Signal::SIGHUP);
    let request = gateway.chat("m");

    // 1. The gateway's requests pass: the model server took its certificate.
    assert_eq!(chat(&lab.gateway, &request).0, 200, "chat over mTLS");
    assert_eq!(sim.requests(&lab), 1);
    assert_eq!(
        sim.stats(&lab)["last_client_cert"],
        der_b64(&certs.join("gateway-client.pem"))
    );

    // 2. Rotation by SIGHUP under a bounded request loop: not one request fails, and the new
    //    certificate is the one presented afterwards.
    issue_client(&certs, d, "rotated", now() - 60, now() + 86_400);
    let statuses = std::thread::scope(|scope| {
        let loader = scope.spawn(|| {
            let mut statuses = Vec::new();
            let deadline = Instant::now() + Duration::from_secs(20);
            while statuses.len() < 60 && Instant::now() < deadline {
                statuses.push(chat(&lab.gateway, &request).0);
                std::thread::sleep(Duration::from_millis(20));
            }
            statuses
        });
        std::thread::sleep(Duration::from_millis(300));
        install_client(d, d, "rotated");
        hup();
        gateway.wait_log_nth("config reloaded", 0);
        loader.join().unwrap()
    });
    let failed = statuses.iter().filter(|s| **s != 200).count();
    assert!(statuses.len() >= 30, "the loop ran: {}", statuses.len());
    assert_eq!(
        failed, 0,
        "requests failed across the rotation: {statuses:?}"
    );
    assert_eq!(chat(&lab.gateway, &request).0, 200);
    assert_eq!(
        sim.stats(&lab)["last_client_cert"],
        der_b64(&d.join("rotated.pem")),
        "new connections present the rotated certificate"
    );

    // 3. A key that is not the certificate's: the reload is refused, naming both files; the
    //    running certificate stays.
    std::fs::copy(other.join("gateway-client.pem"), d.join("client.pem")).unwrap();
    hup();
    let refused = gateway.wait_log_nth("config reload refused", 0);
    let why = refused.to_string();
    assert!(
        why.contains("tls_client_key_file") && why.contains("is not the key of"),
        "{why}"
    );
    assert_eq!(
        chat(&lab.gateway, &request).0,
        200,
        "the old certificate stays"
    );

    // 4. A client certificate from another CA, then an expired one from the right CA: the
    //    model server refuses the handshake; the gateway says which pool and why, and the
    //    client gets a clear error (503 once the active check has seen it, 502 before).
    let refused_by_server = |stem_dir: &Path, stem: &str, alert: &str, nth: usize| {
        install_client(d, stem_dir, stem);
        hup();
        gateway.wait_log_nth("config reloaded", nth);
        let before = sim.requests(&lab);
        let line = gateway.wait_log_nth(alert, 0);
        assert_eq!(line["pool"], "gpu", "{line}");
        let (status, body) = chat(&lab.gateway, &request);
        assert!(status == 503 || status == 502, "{status} {body}");
        assert!(body.contains("inference"), "{body}");
        assert_eq!(
            sim.requests(&lab),
            before,
            "nothing reached the model server"
        );
    };
    refused_by_server(&other, "gateway-client", "UnknownCA", 1);
    issue_client(&certs, d, "expired", now() - 10 * 86_400, now() - 86_400);
    refused_by_server(d, "expired", "CertificateExpired", 2);
    gateway.wait_log_nth("client certificate has expired", 0);
    install_client(d, d, "rotated");
    hup();
    gateway.wait_log_nth("config reloaded", 3);
    let deadline = Instant::now() + Duration::from_secs(10);
    while chat(&lab.gateway, &request).0 != 200 {
        assert!(Instant::now() < deadline, "back to a good certificate");
        std::thread::sleep(Duration::from_millis(100));
    }

    // `moat doctor` shows the pool's mode and warns: the rotated certificate lives a day.
    let out = gateway.cli(&["doctor", "--json"], None);
    let report: Value = serde_json::from_slice(&out.stdout).expect("doctor JSON");
    let pool = &report["pools"][0];
    assert_eq!(pool["pool"], "gpu");
    assert_eq!(pool["mode"], "mtls");
    assert_eq!(pool["client_cert_days_left"], 0, "{pool}");
    let warnings = report["warnings"].to_string();
    assert!(
        warnings.contains("pools.gpu: the client certificate")
            && warnings.contains("expires in 0 day(s)"),
        "{warnings}"
    );

    // 5. The rogue host takes over the gateway's address (on a shared segment: ARP; here the
    //    inference host's route to that address points at the rogue's link). The guard lets
    //    it through — the TCP handshake completes — but the model server wants a client
    //    certificate: no answer, nothing generated.
    lab.rogue
        .ip(&["addr", "add", &format!("{}/32", Lab::GW4), "dev", "to-inf"]);
    lab.inference.ip(&[
        "route",
        "add",
        &format!("{}/32", Lab::GW4),
        "dev",
        Lab::IF_FROM_ROGUE,
    ]);
    let (before, rejected) = (
        sim.requests(&lab),
        sim.stats(&lab)["tls_rejected"].as_u64().unwrap(),
    );
    let got = rogue_tls_request(
        &lab.rogue,
        Lab::GW4,
        sa(Lab::INF_ROGUE4, p),
        &certs.join("ca.pem"),
    );
    let why = got.expect_err("the rogue host must get no answer");
    assert!(
        !why.starts_with("TCP connect"),
        "the guard admitted the spoofed address: {why}"
    );
    assert_eq!(
        sim.requests(&lab),
        before,
        "nothing generated for the rogue host"
    );
    assert_eq!(
        sim.stats(&lab)["tls_rejected"].as_u64().unwrap(),
        rejected + 1,
        "the model server refused the rogue's handshake"
    );
    // Control: from its own address the rogue host does not even get a TCP handshake.
    let own = rogue_tls_request(
        &lab.rogue,
        Lab::ROGUE4,
        sa(Lab::INF_ROGUE4, p),
        &certs.join("ca.pem"),
    );
    assert!(
        own.is_err_and(|e| e.starts_with("TCP connect")),
        "the guard drops the rogue's own address"
    );
}
