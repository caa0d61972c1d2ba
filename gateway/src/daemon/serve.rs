//! `moat serve`: as root, the supervisor and its unprivileged worker (see [`crate::daemon::supervisor`]);
//! as a normal user, with segmentation off only, a single unprivileged process. On an
//! inference host (`[segmentation.inference]`, no pools), the ingress guard alone (see
//! [`crate::daemon::inference_host`]).

use anyhow::{Context, bail};

use crate::{
    config::{Config, SegmentationMode},
    daemon::inference_host,
    daemon::supervisor,
    daemon::worker,
};

pub fn run(config: Config) -> anyhow::Result<()> {
    if !config.runs_gateway() {
        return inference_host::run(config);
    }
    if nix::unistd::geteuid().is_root() {
        return supervisor::run(config);
    }
    if config.segmentation().mode == SegmentationMode::Enforce {
        bail!(
            "{}: kernel enforcement needs root: run `moat serve` as root, or set \
             segmentation.mode = \"off\" to run a single unprivileged process without it",
            config.path.display()
        );
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    runtime.block_on(worker::serve_standalone(config))
}
