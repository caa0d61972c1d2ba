//! The official OpenAI Python SDK, unmodified, through moat: a chat, a streamed chat, an
//! embedding, error mapping, and a broken stream (see `tests/python/openai_sdk.py`). The
//! virtualenv is created by the test set-up itself (`moat_tests::python_with_openai`).

use std::time::Duration;

use moat_tests::{Daemon, Sim, python_with_openai, tests_dir};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_official_python_sdk_works_through_moat() {
    let python = tokio::task::spawn_blocking(python_with_openai)
        .await
        .unwrap();
    let sim = Sim::start(&["--echo", "--tokens-per-sec", "200"]);
    let config = format!(
        "[pools.gpu]\nhosts = [\"{}\"]\nhealth_interval_ms = 100\n\n\
         [models.chat]\npool = \"gpu\"\nupstream_model = \"org/chat-upstream\"\n\
         [models.secret]\npool = \"gpu\"\n\
         [roles.tester]\npermissions = [\"model:chat\", \"inference:local\"]\n",
        sim.addr
    );
    let moat = Daemon::gateway("", &config, &[]);
    moat.wait_pools_ready().await;

    let run = tokio::process::Command::new(python)
        .arg(tests_dir().join("python/openai_sdk.py"))
        .env("MOAT_BASE_URL", moat.url("/v1"))
        .env("MOAT_API_KEY", moat.key())
        .env("MOAT_MODEL", "chat")
        .env("MOAT_DENIED_MODEL", "secret")
        .env("MOAT_SIM_URL", sim.url(""))
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(Duration::from_secs(120), run)
        .await
        .expect("the SDK script hung")
        .expect("cannot run python");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.trim_end().ends_with("OK"),
        "SDK script failed:\n{stdout}\n{stderr}\n--- moat log ---\n{}",
        moat.log()
    );
    let stats = sim.stats().await;
    assert!(
        !stats.to_string().contains(moat.key()),
        "the client's key reached the upstream: {stats}"
    );
}
