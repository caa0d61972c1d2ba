//! `cargo xtask run --replicas N`: N gateway replicas on one host, sharing a throw-away
//! PostgreSQL (identity) and Redis (quotas) from the Debian packages `setup` installs, in
//! front of the demo inference host. Everything lives in `target/replicas-demo/` and is
//! stopped on Ctrl-C (or when any replica exits).
//!
//! Ports: replicas on 8080, 8081, …; PostgreSQL on 55432, Redis on 56379.

use std::{
    fs,
    os::unix::{fs::PermissionsExt, process::CommandExt},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};

const PG_PORT: u16 = 55432;
const REDIS_PORT: u16 = 56379;
const FIRST_PORT: u16 = 8080;

/// Children killed (and reaped) on drop, last started first.
#[derive(Default)]
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        while let Some((name, mut c)) = self.0.pop() {
            eprintln!("run: stopping {name}");
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn uid_gid(user: &str) -> Result<(u32, u32)> {
    let id = |flag: &str| -> Result<u32> {
        let out = Command::new("id").args([flag, user]).output()?;
        if !out.status.success() {
            bail!("no user {user}");
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
    };
    Ok((id("-u")?, id("-g")?))
}

fn chown(path: &Path, uid: u32, gid: u32) -> Result<()> {
    std::os::unix::fs::chown(path, Some(uid), Some(gid))
        .with_context(|| format!("chown {}", path.display()))
}

fn wait_port(port: u16, what: &str) -> Result<()> {
    let start = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            bail!("{what} did not listen on {port}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

fn postgres_bin() -> Result<PathBuf> {
    let mut majors: Vec<(u32, PathBuf)> = fs::read_dir("/usr/lib/postgresql")
        .context("PostgreSQL is not installed (cargo xtask setup)")?
        .flatten()
        .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
        .collect();
    majors.sort();
    Ok(majors
        .pop()
        .context("no PostgreSQL in /usr/lib/postgresql")?
        .1)
}

fn moat(root: &Path, config: &Path, args: &[&str], stdin_line: Option<&str>) -> Result<String> {
    let mut cmd = Command::new(root.join("target/release/moat"));
    cmd.args(args).arg("--config").arg(config);
    let out = if let Some(line) = stdin_line {
        use std::io::Write;
        let mut c = cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).spawn()?;
        c.stdin.take().unwrap().write_all(line.as_bytes())?;
        c.wait_with_output()?
    } else {
        cmd.output()?
    };
    if !out.status.success() {
        bail!(
            "moat {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn run(root: &Path, replicas: u16, inference_host: &str) -> Result<()> {
    if replicas < 2 {
        bail!("--replicas needs at least 2");
    }
    let dir = root.join("target/replicas-demo");
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir)?;
    fs::set_permissions(&dir, fs::Permissions::from_mode(0o711))?;
    let mut children = Children::default();

    // PostgreSQL, as `nobody` (it refuses root); password auth over TCP.
    let pg = postgres_bin()?;
    let (uid, gid) = uid_gid("nobody")?;
    let (data, run) = (dir.join("pg"), dir.join("pg-run"));
    for d in [&data, &run] {
        fs::create_dir(d)?;
        chown(d, uid, gid)?;
    }
    let mut pw = [0u8; 16];
    fs::File::open("/dev/urandom").and_then(|mut f| std::io::Read::read_exact(&mut f, &mut pw))?;
    let password: String = pw.iter().map(|b| format!("{b:02x}")).collect();
    let pwfile = run.join("pw");
    fs::write(&pwfile, &password)?;
    chown(&pwfile, uid, gid)?;
    let st = Command::new(pg.join("initdb"))
        .args([
            "--no-sync",
            "--auth-local=trust",
            "--auth-host=scram-sha-256",
        ])
        .args(["-U", "moat", "-E", "UTF8", "--locale=C"])
        .arg(format!("--pwfile={}", pwfile.display()))
        .arg("-D")
        .arg(&data)
        .current_dir(&dir)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .status()?;
    if !st.success() {
        bail!("initdb failed");
    }
    fs::remove_file(&pwfile)?;
    let child = Command::new(pg.join("postgres"))
        .arg("-D")
        .arg(&data)
        .args([
            "-c",
            "listen_addresses=127.0.0.1",
            "-p",
            &PG_PORT.to_string(),
        ])
        .arg("-c")
        .arg(format!("unix_socket_directories={}", run.display()))
        .current_dir(&dir)
        .uid(uid)
        .gid(gid)
        .stdout(Stdio::null())
        .stderr(fs::File::create(dir.join("postgres.log"))?)
        .spawn()?;
    children.0.push(("postgres".into(), child));
    wait_port(PG_PORT, "postgres")?;
    std::thread::sleep(Duration::from_millis(500));

    let child = Command::new("redis-server")
        .args(["--port", &REDIS_PORT.to_string(), "--bind", "127.0.0.1"])
        .args(["--save", "", "--appendonly", "no"])
        .arg("--dir")
        .arg(&dir)
        .stdout(fs::File::create(dir.join("redis.log"))?)
        .spawn()
        .context("cannot start redis-server (cargo xtask setup)")?;
    children.0.push(("redis".into(), child));
    wait_port(REDIS_PORT, "redis")?;

    // The database password every replica shares (the pepper is copied below).
    let secret = |name: &str, content: &str| -> Result<()> {
        let p = dir.join(name);
        fs::write(&p, content)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o600))?;
        Ok(())
    };
    secret("db-password", &password)?;
    let configs: Vec<PathBuf> = (0..replicas)
        .map(|i| {
            let path = dir.join(format!("replica-{i}.toml"));
            let text = format!(
                "[server]\nlisten = \"127.0.0.1:{}\"\ndata_dir = \"data-{i}\"\n\n\
                 [store]\nkind = \"postgres\"\nurl = \"postgres://moat@127.0.0.1:{PG_PORT}/postgres\"\n\
                 password_file = \"db-password\"\n\n\
                 [quotas]\nbackend = \"redis\"\nredis_url = \"redis://127.0.0.1:{REDIS_PORT}/\"\n\n\
                 [quotas.key]\nrequests_per_minute = 100\n\n\
                 [pools.local]\nhosts = [\"{inference_host}\"]\n\n\
                 [models.\"meta-llama/Llama-3.1-8B-Instruct\"]\npool = \"local\"\n\n\
                 [roles.user]\npermissions = [\"model:*\", \"inference:*\"]\n\n\
                 [segmentation]\nmode = \"off\"\n",
                FIRST_PORT + i
            );
            fs::write(&path, text).map(|_| path)
        })
        .collect::<std::io::Result<_>>()?;

    moat(root, &configs[0], &["store", "migrate"], None)?;
    moat(root, &configs[0], &["tenants", "add", "demo"], None)?;
    moat(
        root,
        &configs[0],
        &["users", "add", "demo", "--tenant", "demo", "--role", "user"],
        None,
    )?;
    let key = moat(
        root,
        &configs[0],
        &["keys", "create", "--user", "demo"],
        None,
    )?;
    // Every replica hashes keys with the same pepper: the first one's, copied.
    let pepper = fs::read(dir.join("data-0/secrets/pepper"))?;
    for cfg in &configs[1..] {
        moat(root, cfg, &["tenants", "list"], None)?;
    }
    for i in 1..replicas {
        fs::write(dir.join(format!("data-{i}/secrets/pepper")), &pepper)?;
    }
    for (i, cfg) in configs.iter().enumerate() {
        let child = Command::new(root.join("target/release/moat"))
            .args(["serve", "--config"])
            .arg(cfg)
            .stdout(fs::File::create(dir.join(format!("replica-{i}.log")))?)
            .stderr(Stdio::inherit())
            .spawn()?;
        children.0.push((format!("replica {i}"), child));
        wait_port(FIRST_PORT + i as u16, "a replica")?;
    }
    eprintln!(
        "\nrun: {replicas} replicas on 127.0.0.1:{FIRST_PORT}..{} sharing PostgreSQL \
         (127.0.0.1:{PG_PORT}) and Redis (127.0.0.1:{REDIS_PORT}); configs and logs in {}\n\
         run: an API key of user `demo` (100 requests per minute across all replicas):\n\n{}\n\
         run: try  curl -H \"Authorization: Bearer <key>\" http://127.0.0.1:{FIRST_PORT}/v1/models\n\
         run: Ctrl-C stops everything",
        FIRST_PORT + replicas - 1,
        dir.display(),
        key.trim()
    );
    // Until a replica (or the whole group, on Ctrl-C) ends.
    loop {
        for (name, c) in children.0.iter_mut() {
            if let Some(st) = c.try_wait()? {
                bail!("{name} exited: {st}");
            }
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}
