//! Unreadable images in an image-folder data set, through the `simclr` program: without
//! `data.skip_bad_images` the first bad file stops the run before it trains (or, found only when
//! decoded, with an error naming it and the epoch's checkpoint kept); with it, each bad file is
//! reported once and counted, and a data set with nothing readable left is a clear error.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Runs the program with `args` in `cwd`, killing it after 60 s: exit code, stdout, stderr.
fn simclr(args: &[String], cwd: &Path) -> (i32, String, String) {
    let mut child = Command::new(env!("CARGO_BIN_EXE_simclr"))
        .args(args)
        .current_dir(cwd)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut err = child.stderr.take().unwrap();
    let out_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    let err_t = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = err.read_to_string(&mut s);
        s
    });
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if start.elapsed() > Duration::from_secs(60) {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "simclr {args:?} ran for more than 60 s; stderr:\n{}",
                err_t.join().unwrap()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    (
        status.code().unwrap_or(-1),
        out_t.join().unwrap(),
        err_t.join().unwrap(),
    )
}

/// Deterministic noise (an LCG), so the PNGs do not compress to a few bytes.
fn noise(seed: u64, n: usize) -> Vec<u8> {
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (x >> 33) as u8
        })
        .collect()
}

/// The bytes of a valid 16 x 16 RGB PNG.
fn png_bytes(seed: u64) -> Vec<u8> {
    let img = image::RgbImage::from_raw(16, 16, noise(seed, 16 * 16 * 3)).unwrap();
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn write(path: &Path, bytes: &[u8]) -> PathBuf {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
    path.to_path_buf()
}

/// A valid PNG at `path`.
fn good(path: &Path, seed: u64) -> PathBuf {
    write(path, &png_bytes(seed))
}

/// Random bytes named like a PNG: its header is already unreadable.
fn garbage(path: &Path, seed: u64) -> PathBuf {
    write(path, &noise(seed ^ 0xbad, 300))
}

/// A PNG cut after its header: the header reads, the pixels do not.
fn truncated(path: &Path, seed: u64) -> PathBuf {
    let b = png_bytes(seed);
    write(path, &b[..b.len() / 2])
}

/// `root/train/{a,b}` and `root/test/{a,b}` with `train` and `test` valid images per class.
fn data_set(root: &Path, train: usize, test: usize) {
    for (split, n) in [("train", train), ("test", test)] {
        for (c, class) in ["a", "b"].iter().enumerate() {
            for i in 0..n {
                let seed = (c * 1000 + i) as u64 + if split == "test" { 500 } else { 0 };
                good(
                    &root.join(split).join(class).join(format!("{i:02}.png")),
                    seed,
                );
            }
        }
    }
}

/// `simclr pretrain` of a tiny model on the folder `data`, into `out`, with `extra` settings.
fn pretrain_args(data: &Path, out: &Path, extra: &[&str]) -> Vec<String> {
    let mut sets: Vec<String> = vec![
        "data.dataset=\"folder\"".into(),
        format!("data.path={:?}", data.display().to_string()),
        "data.image_size=16".into(),
        "data.threads=2".into(),
        "model.base_width=4".into(),
        "model.projection_dim=8".into(),
        "train.batch_size=4".into(),
        "train.epochs=1".into(),
        "train.warmup_epochs=0".into(),
        "train.log_every=1".into(),
        "train.online_probe=false".into(),
        "train.device=\"cpu\"".into(),
        "eval.knn_every=1".into(),
        "eval.knn_k=3".into(),
        format!("output.dir={:?}", out.display().to_string()),
    ];
    sets.extend(extra.iter().map(|s| s.to_string()));
    let mut args = vec![
        "pretrain".to_string(),
        "--preset".into(),
        "quickstart".into(),
    ];
    for s in sets {
        args.push("--set".into());
        args.push(s);
    }
    args
}

fn checkpoint(out: &Path) -> PathBuf {
    out.join("checkpoints/last.safetensors")
}

/// Whether the run wrote a step to its metrics.
fn trained(out: &Path) -> bool {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .is_ok_and(|m| m.contains("\"kind\":\"step\""))
}

#[test]
fn an_unreadable_training_image_stops_the_run_before_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 6, 3);
    let bad = garbage(&data.join("train/b/07-bad.png"), 1);
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(&pretrain_args(&data, &out, &[]), tmp.path());
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains(&bad.display().to_string()), "{err}");
    assert!(msg.contains("skip_bad_images"), "{err}");
    assert!(!out.exists(), "a run that cannot start leaves no folder");
}

#[test]
fn a_training_image_corrupt_past_its_header_is_an_error_naming_it() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 6, 3);
    let bad = truncated(&data.join("train/a/07-cut.png"), 2);
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(&pretrain_args(&data, &out, &[]), tmp.path());
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains(&bad.display().to_string()), "{err}");
    assert!(msg.contains("cannot decode"), "{err}");
}

#[test]
fn an_unreadable_test_image_stops_the_run_before_it_trains() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 6, 3);
    let bad = garbage(&data.join("test/a/09-bad.png"), 3);
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(&pretrain_args(&data, &out, &[]), tmp.path());
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains(&bad.display().to_string()), "{err}");
    assert!(!trained(&out), "failed only after training:\n{err}");
    assert!(!out.exists(), "a run that cannot start leaves no folder");
}

#[test]
fn a_failing_knn_monitor_keeps_the_epochs_checkpoint() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 6, 3);
    // Its header reads, so only the monitor, decoding it, finds it bad.
    let bad = truncated(&data.join("test/b/09-cut.png"), 4);
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(&pretrain_args(&data, &out, &["train.epochs=2"]), tmp.path());
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains(&bad.display().to_string()), "{err}");
    assert!(msg.contains("--resume"), "{err}");
    assert!(checkpoint(&out).is_file(), "the epoch is lost:\n{err}");
    assert!(trained(&out));
}

#[test]
fn skipped_images_are_reported_once_each_and_counted() {
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 2, 3);
    // 4 readable training images and 6 that are not, two of them already in their header; in
    // batches of 4, a batch can be left with fewer than the two images a step needs.
    let mut bad = vec![
        garbage(&data.join("train/a/50-bad.png"), 5),
        garbage(&data.join("train/b/50-bad.png"), 6),
    ];
    for i in 0..4 {
        let class = if i % 2 == 0 { "a" } else { "b" };
        bad.push(truncated(
            &data.join(format!("train/{class}/6{i}-cut.png")),
            10 + i,
        ));
    }
    bad.push(garbage(&data.join("test/a/50-bad.png"), 7));
    bad.push(truncated(&data.join("test/b/50-cut.png"), 8));
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(
        &pretrain_args(
            &data,
            &out,
            &["data.skip_bad_images=true", "train.epochs=3"],
        ),
        tmp.path(),
    );
    assert_eq!(code, 0, "{err}");
    assert!(checkpoint(&out).is_file());
    for f in &bad {
        let name = f.display().to_string();
        let lines: Vec<&str> = err.lines().filter(|l| l.contains(&name)).collect();
        assert_eq!(lines.len(), 1, "{name} is reported {lines:?} in:\n{err}");
        assert!(lines[0].starts_with("warning:"), "{err}");
    }
    // Left out up front: the files whose header is unreadable.
    assert!(
        err.contains("left out 2 unreadable images of 10"),
        "no count of the training images left out:\n{err}"
    );
    // Found while training: the 4 truncated ones of the 8 that remain, in every epoch.
    let counts = err
        .lines()
        .filter(|l| {
            l.starts_with("warning: epoch ") && l.contains("skipped 4 unreadable images of 8")
        })
        .count();
    assert_eq!(counts, 3, "no count per epoch:\n{err}");
}

#[test]
fn a_training_set_with_nothing_readable_is_a_clear_error() {
    // Every image corrupt past its header: found only when decoded.
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("data");
    data_set(&data, 0, 3);
    for i in 0..8 {
        let class = if i % 2 == 0 { "a" } else { "b" };
        truncated(&data.join(format!("train/{class}/{i:02}.png")), 20 + i);
    }
    let out = tmp.path().join("run");
    let (code, _, err) = simclr(
        &pretrain_args(&data, &out, &["data.skip_bad_images=true"]),
        tmp.path(),
    );
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains("none of the 8 images"), "{err}");
    assert!(msg.contains(&data.display().to_string()), "{err}");
    assert!(!err.contains("batch norm"), "{err}");

    // Every image unreadable in its header: found before the run starts.
    let data = tmp.path().join("data2");
    data_set(&data, 0, 3);
    for i in 0..8 {
        let class = if i % 2 == 0 { "a" } else { "b" };
        garbage(&data.join(format!("train/{class}/{i:02}.png")), 30 + i);
    }
    let out = tmp.path().join("run2");
    let (code, _, err) = simclr(
        &pretrain_args(&data, &out, &["data.skip_bad_images=true"]),
        tmp.path(),
    );
    assert_eq!(code, 1, "{err}");
    let msg = err.lines().find(|l| l.starts_with("error:")).unwrap_or("");
    assert!(msg.contains("none of its 8 image files"), "{err}");
    assert!(
        msg.contains(&data.join("train").display().to_string()),
        "{err}"
    );
    assert!(!out.exists());
}
