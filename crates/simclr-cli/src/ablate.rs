//! `simclr ablate`: the paper's ablations at a scale the user chooses (the base configuration),
//! each variant pre-trained into its own run folder and linear-evaluated, then written as a
//! Markdown table, JSON and a PNG figure. An interrupted study resumes its unfinished variants.

use std::path::{Path, PathBuf};

use crate::config::Config;
use crate::error::{io_err, Result};
use crate::evaluate::linear_eval;
use crate::features::Representation;
use crate::plot;
use crate::pretrain::{Control, StepRecord, Trainer};

/// The studies.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Study {
    /// Pairs of augmentations (the paper's figure 5): a heatmap of linear-eval top-1.
    AugmentPairs,
    /// Colour distortion strength s (table 1).
    ColorStrength,
    /// Projection head none / linear / MLP, evaluated on h and on z (figure 8).
    Head,
    /// NT-Xent temperature (table 5).
    Temperature,
    /// Batch size against training length (figure 9).
    BatchEpochs,
    /// NT-Xent against NT-Logistic and margin triplet with and without semi-hard negatives
    /// (table 2).
    Loss,
}

/// One variant's result.
#[derive(Clone, Debug, PartialEq, serde::Serialize)]
pub struct VariantResult {
    /// The variant's name.
    pub name: String,
    /// Its settings over the base configuration.
    pub overrides: Vec<String>,
    /// Linear evaluation top-1 on h.
    pub top1_h: f64,
    /// Linear evaluation top-1 on z (the head study only).
    pub top1_z: Option<f64>,
}

const TRANSFORMS: [&str; 7] = [
    "crop", "cutout", "color", "sobel", "noise", "blur", "rotate",
];

/// The overrides that turn on only `names` among the transforms.
fn only(names: &[&str]) -> Vec<String> {
    let on = |t: &str| names.contains(&t);
    let p = |t: &str, v: f64| if on(t) { v } else { 0.0 };
    vec![
        format!("augment.crop={}", on("crop")),
        "augment.flip=0.0".into(),
        format!("augment.cutout={:?}", p("cutout", 1.0)),
        format!("augment.jitter={:?}", p("color", 0.8)),
        format!("augment.grayscale={:?}", p("color", 0.2)),
        format!("augment.sobel={:?}", p("sobel", 1.0)),
        format!("augment.noise={:?}", p("noise", 1.0)),
        format!("augment.blur={:?}", p("blur", 1.0)),
        format!("augment.rotation={:?}", p("rotate", 1.0)),
    ]
}

/// The variants of `study`: (name, overrides).
pub fn variants(study: Study, base: &Config) -> Vec<(String, Vec<String>)> {
    match study {
        Study::AugmentPairs => {
            let mut v = Vec::new();
            for (i, a) in TRANSFORMS.iter().enumerate() {
                for b in &TRANSFORMS[i..] {
                    let name = if a == b {
                        a.to_string()
                    } else {
                        format!("{a}+{b}")
                    };
                    v.push((name, only(&[a, b])));
                }
            }
            v
        }
        Study::ColorStrength => [0.25, 0.5, 0.75, 1.0]
            .iter()
            .map(|s| (format!("s={s}"), vec![format!("augment.strength={s:?}")]))
            .collect(),
        Study::Head => ["none", "linear", "mlp"]
            .iter()
            .map(|h| (h.to_string(), vec![format!("model.head=\"{h}\"")]))
            .collect(),
        Study::Temperature => [0.05, 0.1, 0.2, 0.5, 1.0]
            .iter()
            .map(|t| (format!("t={t}"), vec![format!("train.temperature={t:?}")]))
            .collect(),
        Study::Loss => vec![
            ("nt-xent".into(), vec!["train.loss=\"nt-xent\"".into()]),
            (
                "nt-logistic".into(),
                vec!["train.loss=\"nt-logistic\"".into()],
            ),
            (
                "margin-triplet".into(),
                vec![
                    "train.loss=\"margin-triplet\"".into(),
                    "train.semi_hard=false".into(),
                ],
            ),
            (
                "margin-semi-hard".into(),
                vec![
                    "train.loss=\"margin-triplet\"".into(),
                    "train.semi_hard=true".into(),
                ],
            ),
        ],
        Study::BatchEpochs => {
            let b = base.train.batch_size.max(8);
            let e = base.train.epochs.max(2);
            let mut v = Vec::new();
            for batch in [b / 4, b / 2, b] {
                for epochs in [e / 2, e] {
                    v.push((
                        format!("b={batch},e={epochs}"),
                        vec![
                            format!("train.batch_size={batch}"),
                            format!("train.epochs={epochs}"),
                        ],
                    ));
                }
            }
            v
        }
    }
}

fn study_name(study: Study) -> &'static str {
    match study {
        Study::AugmentPairs => "augment-pairs",
        Study::ColorStrength => "color-strength",
        Study::Head => "head",
        Study::Temperature => "temperature",
        Study::BatchEpochs => "batch-epochs",
        Study::Loss => "loss",
    }
}

/// Runs `study` over the base configuration (built from `preset`, `file` and `overrides`),
/// writing everything under `out/<study>/`. `observe` sees every training step.
pub fn run_study(
    study: Study,
    preset: Option<&str>,
    file: Option<&Path>,
    overrides: &[String],
    out: &Path,
    observe: &mut dyn FnMut(&str, &StepRecord) -> Control,
) -> Result<(Vec<VariantResult>, PathBuf)> {
    let base = Config::build(preset, file, overrides)?;
    let dir = out.join(study_name(study));
    std::fs::create_dir_all(&dir).map_err(|e| io_err(&dir, e))?;
    let mut results = Vec::new();
    for (name, extra) in variants(study, &base) {
        let mut sets = overrides.to_vec();
        sets.extend(extra.iter().cloned());
        let run_dir = dir.join(name.replace(['=', '+', ','], "_"));
        sets.push(format!("output.dir={:?}", run_dir.display().to_string()));
        let cfg = Config::build(preset, file, &sets)?;
        let mut trainer = if crate::state::checkpoint_path(&run_dir).exists() {
            Trainer::resume(&run_dir, &sets)?
        } else {
            Trainer::new(cfg)?
        };
        trainer.run(&mut |r| observe(&name, r))?;
        let cfg = trainer.config().clone();
        let splits = trainer.splits().clone();
        let top1_h = linear_eval(trainer.model(), &splits, &cfg, Representation::H)?.top1;
        let top1_z = if study == Study::Head {
            Some(linear_eval(trainer.model(), &splits, &cfg, Representation::Z)?.top1)
        } else {
            None
        };
        results.push(VariantResult {
            name,
            overrides: extra,
            top1_h,
            top1_z,
        });
    }
    write_outputs(study, &results, &dir)?;
    Ok((results, dir))
}

fn write_outputs(study: Study, results: &[VariantResult], dir: &Path) -> Result<()> {
    let mut md = format!("# Ablation: {}\n\n", study_name(study));
    if study == Study::Head {
        md.push_str("| head | linear eval top-1 on h | on z |\n| --- | ---: | ---: |\n");
        for r in results {
            md.push_str(&format!(
                "| {} | {:.1}% | {:.1}% |\n",
                r.name,
                r.top1_h,
                r.top1_z.unwrap_or(f64::NAN)
            ));
        }
    } else {
        md.push_str("| variant | linear eval top-1 |\n| --- | ---: |\n");
        for r in results {
            md.push_str(&format!("| {} | {:.1}% |\n", r.name, r.top1_h));
        }
    }
    let write = |name: &str, text: &str| -> Result<()> {
        let p = dir.join(name);
        std::fs::write(&p, text).map_err(|e| io_err(&p, e))
    };
    write("results.md", &md)?;
    write(
        "results.json",
        &serde_json::to_string_pretty(results).expect("json"),
    )?;
    let figure = dir.join("figure.png");
    let title = format!("ablation: {}", study_name(study));
    match study {
        Study::AugmentPairs => {
            let names: Vec<String> = TRANSFORMS.iter().map(|s| s.to_string()).collect();
            let mut grid = vec![vec![f64::NAN; TRANSFORMS.len()]; TRANSFORMS.len()];
            for r in results {
                let parts: Vec<&str> = r.name.split('+').collect();
                let (a, b) = (parts[0], *parts.last().unwrap_or(&parts[0]));
                let (i, j) = (
                    TRANSFORMS.iter().position(|t| *t == a),
                    TRANSFORMS.iter().position(|t| *t == b),
                );
                if let (Some(i), Some(j)) = (i, j) {
                    grid[i][j] = r.top1_h;
                    grid[j][i] = r.top1_h;
                }
            }
            plot::heatmap(&title, &names, &names, &grid, &figure)
        }
        Study::Head => {
            let mut bars = Vec::new();
            for r in results {
                bars.push((format!("{} h", r.name), r.top1_h));
                bars.push((format!("{} z", r.name), r.top1_z.unwrap_or(0.0)));
            }
            plot::bar_chart(&title, "top-1 %", &bars, &figure)
        }
        Study::BatchEpochs => {
            let mut series: Vec<plot::Series> = Vec::new();
            for r in results {
                let batch = r.name.split(',').next().unwrap_or("").to_string();
                let epochs: f64 = r
                    .name
                    .split("e=")
                    .nth(1)
                    .and_then(|e| e.parse().ok())
                    .unwrap_or(f64::NAN);
                match series.iter_mut().find(|s| s.name == batch) {
                    Some(s) => s.points.push((epochs, r.top1_h)),
                    None => series.push(plot::Series {
                        name: batch,
                        points: vec![(epochs, r.top1_h)],
                    }),
                }
            }
            plot::line_chart(&title, "epochs", "top-1 %", &series, &figure)
        }
        Study::ColorStrength | Study::Temperature | Study::Loss => {
            let bars: Vec<(String, f64)> =
                results.iter().map(|r| (r.name.clone(), r.top1_h)).collect();
            plot::bar_chart(&title, "top-1 %", &bars, &figure)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn studies_have_their_variants() {
        let base = Config::build(Some("quickstart"), None, &[]).unwrap();
        assert_eq!(variants(Study::AugmentPairs, &base).len(), 28);
        assert_eq!(variants(Study::Head, &base).len(), 3);
        assert_eq!(variants(Study::BatchEpochs, &base).len(), 6);
        // Every variant's overrides make a valid configuration.
        for study in [
            Study::AugmentPairs,
            Study::ColorStrength,
            Study::Head,
            Study::Temperature,
            Study::BatchEpochs,
            Study::Loss,
        ] {
            for (name, sets) in variants(study, &base) {
                Config::build(Some("quickstart"), None, &sets)
                    .unwrap_or_else(|e| panic!("{name}: {e}"));
            }
        }
        let crop_only = only(&["crop"]);
        assert!(crop_only.contains(&"augment.crop=true".to_string()));
        assert!(crop_only.contains(&"augment.jitter=0.0".to_string()));
    }
}
