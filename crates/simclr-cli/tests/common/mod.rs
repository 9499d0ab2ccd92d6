//! What the tests that drive the `simclr` program share: running it, and the settings of a run
//! that trains in seconds.
#![allow(dead_code)] // each test binary uses its own part

use std::ffi::OsStr;
use std::path::Path;
use std::process::Command;

/// Runs the program in `cwd`: its exit code (-1 for a signal), stdout and stderr. Ranks give up
/// on a missing peer after 60 s.
pub fn simclr(args: &[impl AsRef<OsStr>], cwd: &Path) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .env("SIMCLR_DIST_TIMEOUT", "60")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `--set` arguments for a run that trains in seconds, into `dir`, for `epochs` epochs, on the
/// device `train.device` picks.
pub fn tiny(dir: &str, epochs: u32) -> Vec<String> {
    [
        "data.synthetic_train=64".to_string(),
        "data.synthetic_test=20".into(),
        "data.synthetic_side=16".into(),
        "data.image_size=16".into(),
        "model.base_width=4".into(),
        "model.projection_dim=8".into(),
        "train.batch_size=16".into(),
        format!("train.epochs={epochs}"),
        "train.log_every=1".into(),
        "train.online_probe=false".into(),
        "eval.knn_every=0".into(),
        format!("output.dir={dir}"),
    ]
    .into_iter()
    .flat_map(|s| ["--set".to_string(), s])
    .collect()
}
