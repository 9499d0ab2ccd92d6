//! Every setting and every command argument of the `simclr` binary at its edges.
//!
//! The cases are generated from what the program itself reports, so that a new setting, enum
//! value, command or option is covered without being listed here: the settings are every key of
//! every preset as `simclr presets NAME` prints it, the enum values are those named by the
//! message for an unknown one, and the commands and options are those of `--help` and
//! `COMMAND -h`.
//!
//! Each case must end in bounded time without a panic or a signal, either successfully or with
//! a non-zero exit whose message names the setting, the option or the file given, and a failure
//! must leave every file of its folder (a trained run among them) as it was.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

mod common;
use common::simclr;

/// A case that runs longer than this hangs.
const CASE_TIMEOUT: Duration = Duration::from_secs(60);

/// Cases run at once: the binary is mostly single-threaded at these sizes.
const PARALLEL: usize = 4;

/// A run small enough to train and evaluate in well under a second.
const TINY: &[&str] = &[
    "data.synthetic_train=32",
    "data.synthetic_test=16",
    "data.synthetic_side=16",
    "data.image_size=16",
    "model.base_width=4",
    "model.projection_dim=8",
    "train.batch_size=16",
    "train.epochs=1",
    "train.max_steps=1",
    "eval.knn_every=0",
    "eval.knn_k=3",
    "train.online_probe=false",
    "train.device=\"cpu\"",
    "eval.linear_epochs=1",
    "data.threads=1",
];

/// Cases not run, by label, each with the reason. They are defects outside this crate's
/// configuration, or requests that are legitimately unbounded; every entry must still match a
/// generated case, so a stale one fails the suite.
const KNOWN: &[(&str, &str)] = &[];

/// One invocation and what its failure message may name.
struct Case {
    /// Shown in failures and matched against [`KNOWN`].
    label: String,
    args: Vec<String>,
    /// A failure must name one of these (a key, an option, a file).
    names: Vec<String>,
    /// A TOML file written as `edge.toml` before the run.
    config_file: Option<String>,
    /// A failure may instead name another setting: the one this value conflicts with.
    any_setting: bool,
}

fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_simclr")
}

fn tiny_sets() -> Vec<String> {
    TINY.iter()
        .flat_map(|s| ["--set".to_string(), s.to_string()])
        .collect()
}

/// The command line as a shell would take it.
fn shell_line(args: &[String]) -> String {
    let quote = |a: &String| {
        if !a.is_empty()
            && a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.=/%:,+".contains(c))
        {
            a.clone()
        } else {
            format!("'{}'", a.replace('\'', "'\\''"))
        }
    };
    std::iter::once("simclr".to_string())
        .chain(args.iter().map(quote))
        .collect::<Vec<_>>()
        .join(" ")
}

// ---------------------------------------------------------------------------------------------
// The settings.

/// Every `table.key` of every preset with its value (the first preset that has it).
fn settings(cwd: &Path) -> BTreeMap<String, toml::Value> {
    let (code, list, err) = simclr(&["presets"], cwd);
    assert_eq!(code, 0, "simclr presets: {err}");
    let mut keys = BTreeMap::new();
    for name in list.lines().filter_map(|l| l.split_whitespace().next()) {
        let (code, text, err) = simclr(&["presets", name], cwd);
        assert_eq!(code, 0, "simclr presets {name}: {err}");
        let table: toml::Table = text
            .parse()
            .unwrap_or_else(|e| panic!("simclr presets {name} is not TOML: {e}"));
        for (k, v) in table {
            match v {
                toml::Value::Table(t) => {
                    for (k2, v2) in t {
                        keys.entry(format!("{k}.{k2}")).or_insert(v2);
                    }
                }
                v => {
                    keys.entry(k).or_insert(v);
                }
            }
        }
    }
    assert!(keys.len() > 50, "too few settings found: {keys:?}");
    keys
}

/// The values an enum-like string setting takes, from the message for an unknown one
/// ("expected one of `a`, `b`"); empty for a free-form string.
fn variants(key: &str, cwd: &Path) -> Vec<String> {
    let spec = format!("{key}=\"nonsense\"");
    // Zero epochs and steps fail validation, so an accepted string trains nothing; a bad enum
    // value fails before validation.
    let (_, _, err) = simclr(
        &[
            "pretrain",
            "--set",
            "train.epochs=0",
            "--set",
            "train.max_steps=0",
            "--set",
            &spec,
        ],
        cwd,
    );
    let Some((_, rest)) = err.split_once("expected one of") else {
        return Vec::new();
    };
    rest.split('`')
        .skip(1)
        .step_by(2)
        .map(str::to_string)
        .collect()
}

fn is_path_key(key: &str) -> bool {
    key.ends_with(".dir") || key.ends_with(".path")
}

/// Edge values (TOML text) for a setting whose value is `v`.
fn edge_values(v: &toml::Value) -> Vec<String> {
    let strs = |xs: &[&str]| xs.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let int_edges = [
        "0",
        "-1",
        "1",
        "4294967295",
        "4294967296",
        "9223372036854775807",
        "99999999999999999999",
        "18446744073709551616",
    ];
    let float_edges = [
        "0", "-0.0", "-1", "nan", "inf", "-inf", "1e308", "1e-45", "1e400",
    ];
    // Wrong types for anything.
    let mut out = strs(&["\"nonsense\"", "[1, 2]", "{ a = 1 }"]);
    match v {
        toml::Value::Integer(_) => {
            out.extend(strs(&int_edges));
            out.extend(strs(&["1.5", "true", "\"1\""]));
        }
        toml::Value::Float(_) => {
            out.extend(strs(&float_edges));
            out.extend(strs(&["true", "\"0.5\""]));
        }
        toml::Value::Boolean(_) => out.extend(strs(&["0", "1", "\"true\"", "\"yes\""])),
        toml::Value::String(_) => out.extend(strs(&["\"\"", "0", "true", "\" \""])),
        toml::Value::Array(a) => {
            let n = a.len();
            let elem = a.first().cloned().unwrap_or(toml::Value::Integer(0));
            let arr = |x: &str, len: usize| format!("[{}]", vec![x; len].join(", "));
            let (one, edges): (&str, &[&str]) = match elem {
                toml::Value::Float(_) => ("0.5", &float_edges),
                _ => ("1", &int_edges),
            };
            out.push("[]".into());
            out.push(arr(one, n.saturating_sub(1)));
            out.push(arr(one, n + 1));
            out.push(arr("\"a\"", n));
            out.push(one.into());
            for e in edges {
                out.push(arr(e, n));
            }
            // Reversed ranges and mixed ones.
            if n == 2 {
                out.push(format!("[{}, {one}]", edges[6.min(edges.len() - 1)]));
                out.push("[1.0, 0.5]".into());
            }
        }
        _ => {}
    }
    out.dedup();
    out
}

/// Where relative paths of a case point: prepared in every case's folder by [`prepare`].
const PATH_VALUES: &[&str] = &[
    "missing",
    "missing/deeper/run",
    "file.txt",
    "emptydir",
    "ro",
    "ro/run",
    "run",
    "",
];

fn config_cases(cwd: &Path, keys: &BTreeMap<String, toml::Value>) -> Vec<Case> {
    let mut cases = Vec::new();
    let tiny = tiny_sets();
    let push_set = |cases: &mut Vec<Case>, sets: &[String], names: Vec<String>| {
        let mut args = vec!["train".to_string(), "--preset".into(), "quickstart".into()];
        args.extend(tiny.iter().cloned());
        args.push("--set".into());
        args.push("output.dir=\"new\"".into());
        for s in sets {
            args.push("--set".into());
            args.push(s.clone());
        }
        cases.push(Case {
            label: format!("train --set {}", sets.join(" --set ")),
            args,
            names,
            config_file: None,
            any_setting: true,
        });
    };
    let tables: BTreeSet<&str> = keys
        .keys()
        .filter_map(|k| k.split_once('.'))
        .map(|(t, _)| t)
        .collect();
    for t in &tables {
        push_set(&mut cases, &[format!("{t}=1")], vec![t.to_string()]);
        push_set(
            &mut cases,
            &[format!("{t}.no_such_key=1")],
            vec!["no_such_key".into()],
        );
    }
    push_set(
        &mut cases,
        &["no_such_table.key=1".into()],
        vec!["no_such_table".into()],
    );
    for (key, value) in keys {
        let names = vec![key.clone()];
        for edge in edge_values(value) {
            push_set(&mut cases, &[format!("{key}={edge}")], names.clone());
        }
        if value.is_str() {
            for variant in variants(key, cwd) {
                push_set(&mut cases, &[format!("{key}=\"{variant}\"")], names.clone());
                // Every data set with every kind of path (the synthetic one ignores it).
                if key == "data.dataset" {
                    for p in PATH_VALUES {
                        let mut names = names.clone();
                        names.push("data.path".into());
                        if !p.is_empty() {
                            names.push(p.to_string());
                        }
                        push_set(
                            &mut cases,
                            &[format!("{key}=\"{variant}\""), format!("data.path=\"{p}\"")],
                            names,
                        );
                    }
                }
            }
        }
        if is_path_key(key) {
            for p in PATH_VALUES {
                let mut names = names.clone();
                if !p.is_empty() {
                    names.push(p.to_string());
                }
                push_set(&mut cases, &[format!("{key}=\"{p}\"")], names);
            }
        }
        // The same key ill-typed in a file: the message names the file.
        if let Some((table, bare)) = key.split_once('.') {
            let wrong = if value.is_str() { "1" } else { "\"nonsense\"" };
            let mut text = String::from("preset = \"quickstart\"\n");
            let mut sections: BTreeMap<&str, Vec<String>> = BTreeMap::new();
            for s in TINY.iter().chain(&["output.dir=\"new\""]) {
                let (k, v) = s.split_once('=').unwrap();
                let (t, b) = k.split_once('.').unwrap();
                if k != key {
                    sections.entry(t).or_default().push(format!("{b} = {v}"));
                }
            }
            sections
                .entry(table)
                .or_default()
                .push(format!("{bare} = {wrong}"));
            for (t, lines) in sections {
                text.push_str(&format!("[{t}]\n{}\n", lines.join("\n")));
            }
            cases.push(Case {
                label: format!("train --config edge.toml ({key} = {wrong})"),
                args: vec!["train".into(), "--config".into(), "edge.toml".into()],
                names: vec!["edge.toml".into()],
                config_file: Some(text),
                any_setting: false,
            });
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// The commands.

/// A valid invocation of `command` (in a folder prepared by [`prepare`]), to which one edge
/// argument at a time is given.
fn base_invocation(command: &str) -> Option<Vec<String>> {
    let s = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let with_tiny = |mut v: Vec<String>| {
        v.splice(1..1, tiny_sets());
        v
    };
    Some(match command {
        "pretrain" | "train" => with_tiny(s(&[command, "--set", "output.dir=\"new\""])),
        "linear-eval" => s(&["linear-eval", "--run", "run"]),
        "finetune" => s(&[
            "finetune",
            "--run",
            "run",
            "--labels",
            "100%",
            "--epochs",
            "1",
            "--batch-size",
            "16",
        ]),
        "knn" => s(&["knn", "--run", "run", "--k", "3"]),
        "embed" => s(&["embed", "--run", "run", "--out", "e.npy"]),
        "export" => s(&["export", "--run", "run", "--out", "enc.safetensors"]),
        "augment-preview" => with_tiny(s(&[
            "augment-preview",
            "--images",
            "2",
            "--views",
            "2",
            "--out",
            "p.png",
        ])),
        "ablate" => with_tiny(s(&["ablate", "--study", "temperature", "--out", "abl"])),
        "plot" => s(&["plot", "--run", "run"]),
        "launch" => {
            let mut v = s(&["launch", "--procs", "1", "--", "pretrain"]);
            v.extend(tiny_sets());
            v.extend(s(&["--set", "output.dir=\"new\""]));
            v
        }
        "presets" => s(&["presets"]),
        _ => return None,
    })
}

/// The commands `simclr --help` lists.
fn commands(cwd: &Path) -> Vec<String> {
    let (code, help, err) = simclr(&["--help"], cwd);
    assert_eq!(code, 0, "{err}");
    let list = help
        .split_once("Commands:")
        .expect("--help lists commands")
        .1;
    let list = list.split("\n\n").next().unwrap();
    list.lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect()
}

/// One option of `COMMAND -h`: its name, the name of its value (None for a switch) and the
/// values it is limited to.
struct Opt {
    name: String,
    value: Option<String>,
    possible: Vec<String>,
}

fn options(command: &str, cwd: &Path) -> (Vec<Opt>, Vec<String>) {
    let (code, help, err) = simclr(&[command, "-h"], cwd);
    assert_eq!(code, 0, "{command} -h: {err}");
    let mut opts = Vec::new();
    let mut positional = Vec::new();
    let mut section = "";
    for line in help.lines() {
        if line.ends_with(':') && !line.starts_with(' ') {
            section = line;
            continue;
        }
        let t = line.trim_start();
        let mut words = t.split_whitespace();
        let possible = t
            .split_once("[possible values: ")
            .map(|(_, r)| {
                r.trim_end_matches(']')
                    .split(", ")
                    .map(str::to_string)
                    .collect()
            })
            .unwrap_or_default();
        if section == "Arguments:" {
            if let Some(w) = words.next() {
                positional.push(w.trim_matches(|c| "<>[].".contains(c)).to_string());
            }
            continue;
        }
        let Some(first) = words.next() else { continue };
        let Some(name) = first.strip_prefix("--") else {
            continue;
        };
        if name == "help" {
            continue;
        }
        let value = words
            .next()
            .filter(|w| w.starts_with('<'))
            .map(|w| w.trim_matches(|c| c == '<' || c == '>').to_string());
        opts.push(Opt {
            name: name.to_string(),
            value,
            possible,
        });
    }
    (opts, positional)
}

fn option_values(opt: &Opt) -> Vec<String> {
    let v = |xs: &[&str]| xs.iter().map(|x| x.to_string()).collect::<Vec<_>>();
    let numbers = v(&[
        "0",
        "-1",
        "1",
        "99999999999",
        "18446744073709551616",
        "0.5",
        "nan",
        "inf",
        "-inf",
        "1e308",
        "",
        "nonsense",
    ]);
    let value = opt.value.as_deref().unwrap_or("");
    let mut out = match value {
        "RUN" | "RESUME" => v(&["missing", "file.txt", "emptydir", "cfgonly", "ro", ""]),
        "CHECKPOINT" => v(&[
            "missing.safetensors",
            "emptydir",
            "file.txt",
            "run/config.toml",
            "run/encoder.safetensors",
            "",
        ]),
        "OUT" => v(&[
            "emptydir",
            "missing/x.npy",
            "run/x.npy",
            "run/config.toml",
            "file.txt",
            "ro/x.png",
            "",
        ]),
        "CONFIG" => v(&[
            "missing.toml",
            "emptydir",
            "file.txt",
            "run/config.toml",
            "",
        ]),
        "PRESET" => v(&["", "nonsense", "QUICKSTART"]),
        "KEY=VALUE" => v(&[
            "",
            "=",
            "=1",
            "train.lr",
            "train.=1",
            ".lr=1",
            "train.lr.x=1",
            "train=1",
            "no_such.key=1",
            "train.lr=",
            "train.lr==1",
            "train.batch_size=1",
        ]),
        "LABELS" => {
            let mut l = numbers.clone();
            l.extend(v(&[
                "0%", "100%", "101%", "-5%", "1e-9%", "%", "1%", "nan%",
            ]));
            l
        }
        _ if !opt.possible.is_empty() => v(&["", "nonsense"]),
        _ => numbers,
    };
    out.extend(opt.possible.iter().cloned());
    out
}

/// `base` with `--name value` in place of its own `--name` (or added).
fn with_option(base: &[String], name: &str, value: &str) -> Vec<String> {
    let flag = format!("--{name}");
    let mut args = base.to_vec();
    // Options go before a launch's `--`.
    let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
    match args[..end].iter().position(|a| *a == flag) {
        Some(i) if name != "set" => args[i + 1] = value.to_string(),
        _ => {
            args.insert(end, value.to_string());
            args.insert(end, flag);
        }
    }
    args
}

fn command_cases(cwd: &Path) -> Vec<Case> {
    let mut cases = Vec::new();
    for command in commands(cwd) {
        let base = base_invocation(&command).unwrap_or_else(|| {
            panic!("`simclr {command}` is new: give it a valid invocation in base_invocation")
        });
        let (opts, positional) = options(&command, cwd);
        cases.push(Case {
            label: command.clone(),
            args: base.clone(),
            names: vec![],
            config_file: None,
            any_setting: false,
        });
        for opt in &opts {
            let flag = format!("--{}", opt.name);
            if opt.value.is_none() {
                let mut args = base.clone();
                let end = args.iter().position(|a| a == "--").unwrap_or(args.len());
                args.insert(end, flag.clone());
                cases.push(Case {
                    label: format!("{command} {flag}"),
                    args,
                    names: vec![flag.clone()],
                    config_file: None,
                    any_setting: false,
                });
                continue;
            }
            for value in option_values(opt) {
                let mut names = vec![flag.clone()];
                if !value.is_empty() {
                    names.push(value.clone());
                    // A path is named as it is given or by its folder.
                    if let Some((dir, _)) = value.split_once('/') {
                        names.push(dir.to_string());
                    }
                    if let Some((key, _)) = value.split_once('=') {
                        names.push(key.to_string());
                    }
                    // clap reads `-inf` as the flags `-i -n -f` and names the first.
                    if value.starts_with('-') && value.len() > 2 {
                        names.push(format!("'{}'", &value[..2]));
                    }
                }
                cases.push(Case {
                    label: format!("{command} {flag} {value}"),
                    args: with_option(&base, &opt.name, &value),
                    names,
                    config_file: None,
                    any_setting: false,
                });
            }
        }
        for arg in positional {
            let values: Vec<String> = ["", "nonsense", "--no-such-flag", "help"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            for value in values {
                let mut args = base.clone();
                match args.iter().position(|a| a == "--") {
                    Some(i) => args.truncate(i + 1),
                    None => args.truncate(1),
                }
                args.push(value.clone());
                cases.push(Case {
                    label: format!("{command} <{arg}> {value}"),
                    args,
                    names: vec![value, arg.clone()],
                    config_file: None,
                    any_setting: false,
                });
            }
        }
    }
    cases
}

// ---------------------------------------------------------------------------------------------
// Running.

/// Copies `from` into `to`, recursively.
fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let dst = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_dir(&e.path(), &dst);
        } else {
            std::fs::copy(e.path(), dst).unwrap();
        }
    }
}

/// A case's folder: a trained run, a run folder without a checkpoint, a regular file, an empty
/// folder and a read-only one.
fn prepare(dir: &Path, run: &Path, case: &Case) {
    use std::os::unix::fs::PermissionsExt;
    copy_dir(run, &dir.join("run"));
    std::fs::create_dir_all(dir.join("cfgonly")).unwrap();
    std::fs::copy(run.join("config.toml"), dir.join("cfgonly/config.toml")).unwrap();
    std::fs::write(dir.join("file.txt"), "not a run, not TOML [\n").unwrap();
    std::fs::create_dir_all(dir.join("emptydir")).unwrap();
    let ro = dir.join("ro");
    std::fs::create_dir_all(&ro).unwrap();
    std::fs::set_permissions(&ro, std::fs::Permissions::from_mode(0o555)).unwrap();
    if let Some(text) = &case.config_file {
        std::fs::write(dir.join("edge.toml"), text).unwrap();
    }
}

/// Every folder and file under `dir` with its bytes.
fn snapshot(dir: &Path) -> BTreeMap<PathBuf, Option<Vec<u8>>> {
    let mut out = BTreeMap::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).unwrap() {
            let p = e.unwrap().path();
            let rel = p.strip_prefix(dir).unwrap().to_path_buf();
            if p.is_dir() {
                stack.push(p);
                out.insert(rel, None);
            } else {
                out.insert(rel, Some(std::fs::read(&p).unwrap_or_default()));
            }
        }
    }
    out
}

/// Runs one case; the problem it shows, if any.
fn run_case(case: &Case, run: &Path, keys: &BTreeSet<String>) -> Option<String> {
    let dir = tempfile::tempdir().unwrap();
    let logs = tempfile::tempdir().unwrap();
    prepare(dir.path(), run, case);
    let before = snapshot(dir.path());
    let stdout = std::fs::File::create(logs.path().join("out")).unwrap();
    let stderr = std::fs::File::create(logs.path().join("err")).unwrap();
    let mut child = Command::new(bin())
        .args(&case.args)
        .current_dir(dir.path())
        .env("RUST_BACKTRACE", "0")
        .stdin(Stdio::null())
        .stdout(stdout)
        .stderr(stderr)
        .spawn()
        .unwrap();
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if start.elapsed() > CASE_TIMEOUT {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(10));
    };
    let err = std::fs::read_to_string(logs.path().join("err")).unwrap_or_default();
    let line = format!("(in {}) {}", dir.path().display(), shell_line(&case.args));
    let problem = |what: String| Some(format!("{line}\n    {what}\n    stderr: {}", err.trim()));
    let Some(status) = status else {
        return problem(format!("still running after {CASE_TIMEOUT:?}: killed"));
    };
    if err.contains("panicked") {
        return problem("panicked".into());
    }
    let Some(code) = status.code() else {
        return problem(format!("ended by a signal: {status}"));
    };
    if code == 0 {
        return None;
    }
    let named = case.names.iter().any(|n| err.contains(n.as_str()))
        || (case.any_setting && keys.iter().any(|k| err.contains(k.as_str())));
    if !case.names.is_empty() && !named {
        return problem(format!(
            "exit {code} without naming any of {:?}",
            case.names
        ));
    }
    // What was there is untouched, and nothing was added inside it; a new output folder that
    // a run got as far as creating is not a change to anything that existed.
    let after = snapshot(dir.path());
    let changed: Vec<_> = before
        .keys()
        .chain(after.keys())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .filter(|k| before.get(*k) != after.get(*k))
        .filter(|k| {
            before.contains_key(*k)
                || k.components().count() > 1
                    && k.components()
                        .next()
                        .is_some_and(|top| before.contains_key(Path::new(&top)))
        })
        .collect();
    if !changed.is_empty() {
        return problem(format!("exit {code} but changed {changed:?}"));
    }
    None
}

#[test]
fn every_setting_and_argument_at_its_edges() {
    let started = Instant::now();
    let base = tempfile::tempdir().unwrap();
    let mut args = vec!["pretrain".to_string()];
    args.extend(tiny_sets());
    args.extend(["--set".to_string(), "output.dir=\"run\"".to_string()]);
    let (code, _, err) = simclr(&args, base.path());
    assert_eq!(code, 0, "{}: {err}", shell_line(&args));
    let run = base.path().join("run");

    let keys = settings(base.path());
    let mut cases = config_cases(base.path(), &keys);
    let keys: BTreeSet<String> = keys.into_keys().collect();
    let settings_cases = cases.len();
    cases.extend(command_cases(base.path()));
    let known: BTreeMap<&str, &str> = KNOWN.iter().copied().collect();
    for k in known.keys() {
        assert!(
            cases.iter().any(|c| c.label == *k),
            "known exception `{k}` matches no case any more: remove it"
        );
    }
    let (skipped, cases): (Vec<Case>, Vec<Case>) = cases
        .into_iter()
        .partition(|c| known.contains_key(c.label.as_str()));
    println!(
        "{} edge cases ({settings_cases} of settings, {} of commands), {} known exceptions not run",
        cases.len() + skipped.len(),
        cases.len() + skipped.len() - settings_cases,
        skipped.len()
    );

    let next = AtomicUsize::new(0);
    let problems = Mutex::new(Vec::new());
    std::thread::scope(|s| {
        for _ in 0..PARALLEL {
            s.spawn(|| loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                let Some(case) = cases.get(i) else { break };
                if let Some(p) = run_case(case, &run, &keys) {
                    problems
                        .lock()
                        .unwrap()
                        .push(format!("[{}] {p}", case.label));
                }
            });
        }
    });
    let problems = problems.into_inner().unwrap();
    println!(
        "ran {} cases in {:.1} s: {} problems",
        cases.len(),
        started.elapsed().as_secs_f64(),
        problems.len()
    );
    assert!(
        problems.is_empty(),
        "{} of {} edge cases failed:\n\n{}",
        problems.len(),
        cases.len(),
        problems.join("\n\n")
    );
}
