//! The weighted k-nearest-neighbour classifier (Wu et al., 2018) used to monitor
//! representations: cosine similarity to a labelled memory bank, the k nearest vote with
//! weights exp(sim / t).

use rayon::prelude::*;

use crate::classifier::Accuracy;
use crate::error::{CliError, Result};
use crate::features::Features;

fn normalised(f: &Features) -> Vec<f32> {
    let mut out = f.data.clone();
    out.par_chunks_mut(f.dim.max(1)).for_each(|r| {
        let norm = r.iter().map(|v| v * v).sum::<f32>().sqrt().max(1e-12);
        r.iter_mut().for_each(|v| *v /= norm);
    });
    out
}

/// Accuracy of k-NN classification of `test` against the memory bank `train`.
///
/// `k` must be at least 1 (a larger `k` than the bank holds uses the whole bank) and
/// `temperature` a finite number above 0; anything else is a [`CliError::Usage`] naming it.
pub fn knn_accuracy(
    train: &Features,
    test: &Features,
    classes: usize,
    k: usize,
    temperature: f32,
) -> Result<Accuracy> {
    if k == 0 {
        return Err(CliError::Usage(format!(
            "k-NN: --k (eval.knn_k) is 0; it must be at least 1 (the memory bank holds {} \
             images)",
            train.len()
        )));
    }
    if !(temperature.is_finite() && temperature > 0.0) {
        return Err(CliError::Usage(format!(
            "k-NN: eval.knn_temperature is {temperature}; it must be a finite number above 0"
        )));
    }
    if train.is_empty() || test.is_empty() {
        return Err(CliError::Usage(
            "k-NN needs training and test images".into(),
        ));
    }
    if train.dim != test.dim {
        return Err(CliError::Usage(format!(
            "k-NN: features of size {} against a bank of size {}",
            test.dim, train.dim
        )));
    }
    if train
        .labels
        .iter()
        .chain(&test.labels)
        .any(|&l| l as usize >= classes)
    {
        return Err(CliError::Usage("k-NN needs a label on every image".into()));
    }
    let bank = normalised(train);
    let queries = normalised(test);
    let d = train.dim;
    let k = k.min(train.len());
    let scores: Vec<Vec<f32>> = queries
        .par_chunks(d)
        .map(|q| {
            let mut sims: Vec<(f32, u32)> = bank
                .chunks(d)
                .zip(&train.labels)
                .map(|(b, &l)| (b.iter().zip(q).map(|(x, y)| x * y).sum::<f32>(), l))
                .collect();
            sims.select_nth_unstable_by(k - 1, |a, b| b.0.total_cmp(&a.0));
            let mut votes = vec![0.0f32; classes];
            for &(s, l) in &sims[..k] {
                votes[l as usize] += (s / temperature).exp();
            }
            votes
        })
        .collect();
    let flat: Vec<f32> = scores.into_iter().flatten().collect();
    Ok(crate::classifier::accuracy(&flat, classes, &test.labels))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nearest_neighbours_vote() {
        // Class 0 points along x, class 1 along y.
        let train = Features {
            data: vec![1.0, 0.1, 0.9, 0.0, 0.1, 1.0, 0.0, 0.8],
            dim: 2,
            labels: vec![0, 0, 1, 1],
        };
        let test = Features {
            data: vec![2.0, 0.3, 0.2, 3.0],
            dim: 2,
            labels: vec![0, 1],
        };
        let acc = knn_accuracy(&train, &test, 2, 2, 0.1).unwrap();
        assert_eq!(acc.top1, 100.0);
        // Wrong labels on the test points: 0%.
        let wrong = Features {
            labels: vec![1, 0],
            ..test
        };
        assert_eq!(knn_accuracy(&train, &wrong, 2, 2, 0.1).unwrap().top1, 0.0);
        // More neighbours than the bank holds: all of them vote.
        assert!(knn_accuracy(&train, &wrong, 2, 100, 0.1).is_ok());
    }

    #[test]
    fn bad_k_and_temperature_are_errors() {
        let train = Features {
            data: vec![1.0, 0.0, 0.0, 1.0],
            dim: 2,
            labels: vec![0, 1],
        };
        let e = knn_accuracy(&train, &train, 2, 0, 0.1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("--k") && e.contains('0'), "{e}");
        for t in [0.0, -0.5, f32::NAN, f32::INFINITY] {
            let e = knn_accuracy(&train, &train, 2, 1, t)
                .unwrap_err()
                .to_string();
            assert!(
                e.contains("knn_temperature") && e.contains(&t.to_string()),
                "{e}"
            );
        }
    }
}
