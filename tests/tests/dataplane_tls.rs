//! Upstream TLS: a pool with `tls = true` reaches its host over rustls, trusting only the CA
//! in `tls_ca_file`; a host whose certificate that CA did not sign is never sent a request.
//!
//! The TLS host is a terminating forwarder (tokio-rustls) in front of a `moat-sim`, with a
//! CA and a leaf certificate for `127.0.0.1` made by `openssl` for this test.

use std::{path::Path, process::Command, sync::Arc, time::Duration};

use moat_tests::{Daemon, Events, Sim, eventually, get_json};
use rustls_pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
use serde_json::{Value, json};
use tokio::net::{TcpListener, TcpStream};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl (cargo xtask setup installs it)");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Makes `<name>-ca.pem` and a leaf `<name>.pem`/`<name>.key` for IP 127.0.0.1 signed by it.
fn make_pki(dir: &Path, name: &str) {
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    let ca_key = format!("{name}-ca.key");
    let ca = format!("{name}-ca.pem");
    let mut args = vec!["req", "-x509"];
    args.extend(ec);
    args.extend(["-keyout", &ca_key, "-out", &ca, "-days", "2"]);
    args.extend(["-subj", "/CN=moat test CA"]);
    openssl(dir, &args);
    let key = format!("{name}.key");
    let csr = format!("{name}.csr");
    let mut args = vec!["req"];
    args.extend(ec);
    args.extend(["-keyout", &key, "-out", &csr, "-subj", "/CN=127.0.0.1"]);
    openssl(dir, &args);
    std::fs::write(
        dir.join("leaf.ext"),
        "subjectAltName=IP:127.0.0.1\nbasicConstraints=CA:FALSE\n\
         keyUsage=digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    let leaf = format!("{name}.pem");
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-out",
            &leaf,
            "-days",
            "2",
            "-extfile",
            "leaf.ext",
        ],
    );
}

/// Terminates TLS with `<name>.pem`/`<name>.key` and forwards the bytes to `upstream`.
async fn tls_forwarder(dir: &Path, name: &str, upstream: std::net::SocketAddr) -> u16 {
    let certs: Vec<CertificateDer<'static>> =
        CertificateDer::pem_file_iter(dir.join(format!("{name}.pem")))
            .unwrap()
            .map(Result::unwrap)
            .collect();
    let key = PrivateKeyDer::from_pem_file(dir.join(format!("{name}.key"))).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        loop {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let Ok(mut up) = TcpStream::connect(upstream).await else {
                    return;
                };
                let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
            });
        }
    });
    port
}

fn config(port: u16, ca: Option<&str>) -> String {
    let ca = ca.map_or(String::new(), |c| format!("tls_ca_file = \"{c}\"\n"));
    format!(
        "[pools.gpu]\nhosts = [\"127.0.0.1:{port}\"]\ntls = true\n{ca}health_interval_ms = 100\n\n\
         [models.chat]\npool = \"gpu\"\n"
    )
}

fn chat(stream: bool) -> Value {
    json!({"model": "chat", "messages": [{"role": "user", "content": "over tls"}], "stream": stream})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_pools_trust_only_their_ca() {
    let pki = tempfile::tempdir().unwrap();
    make_pki(pki.path(), "good");
    make_pki(pki.path(), "other");
    let sim = Sim::start(&["--echo"]);
    let port = tls_forwarder(pki.path(), "good", sim.addr).await;

    // The right CA: health checks and requests go over TLS.
    let ca = std::fs::read_to_string(pki.path().join("good-ca.pem")).unwrap();
    let moat = Daemon::gateway("", &config(port, Some("ca.pem")), &[("ca.pem", &ca)]);
    moat.wait_pools_ready().await;
    let (status, _, answer) = moat
        .post_json("/v1/chat/completions", &chat(false), &[])
        .await;
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["choices"][0]["message"]["content"], "over tls");
    let resp = moat.open("/v1/chat/completions", &chat(true)).await;
    let mut events = Events::new(resp);
    let mut n = 0;
    while let Some(e) = events.next().await.unwrap() {
        n += 1;
        if e == "[DONE]" {
            break;
        }
    }
    assert!(n >= 4);
    assert_eq!(sim.requests().await, 2);

    // A CA that did not sign the host's certificate: the handshake fails, so the host is
    // never ready and no request reaches it.
    let other = std::fs::read_to_string(pki.path().join("other-ca.pem")).unwrap();
    let wrong = Daemon::gateway("", &config(port, Some("ca.pem")), &[("ca.pem", &other)]);
    let refused = eventually(Duration::from_secs(3), || async {
        wrong.log().contains("upstream host unhealthy")
    })
    .await;
    assert!(refused, "{}", wrong.log());
    let (status, _) = get_json(&wrong.url("/readyz")).await;
    assert_eq!(status, 503);
    let (status, _, body) = wrong
        .post_json("/v1/chat/completions", &chat(false), &[])
        .await;
    assert!(status == 503 || status == 502, "{status}: {body}");
    // Only the default webpki roots: a private CA is not trusted either.
    let webpki = Daemon::gateway("", &config(port, None), &[]);
    let (status, _, _) = webpki
        .post_json("/v1/chat/completions", &chat(false), &[])
        .await;
    assert!(status == 503 || status == 502, "{status}");
    assert_eq!(
        sim.requests().await,
        2,
        "an untrusted TLS host got a request"
    );
}
