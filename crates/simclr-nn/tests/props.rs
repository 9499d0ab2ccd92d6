//! Property tests: shapes and invariants of the layers over random geometries.

use proptest::prelude::*;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use simclr_nn::layers::{BatchNorm, Conv2d, Linear, MaxPool};
use simclr_nn::{Device, Tensor};

fn filled(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    Tensor::from_vec(
        shape,
        (0..n)
            .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
            .collect(),
    )
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(48))]

    /// A convolution's output has PyTorch's size and its backward returns the input's shape.
    #[test]
    fn conv_shapes(n in 1usize..3, h in 1usize..9, w in 1usize..9, cin in 1usize..5, cout in 1usize..5,
                   k in prop::sample::select(vec![1usize, 3, 5, 7]), stride in 1usize..3, seed in 0u64..1000) {
        let pad = k / 2;
        prop_assume!(h + 2 * pad >= k && w + 2 * pad >= k);
        let mut conv = Conv2d::new(cin, cout, k, stride, pad, &mut ChaCha8Rng::seed_from_u64(seed));
        let x = filled(&[n, h, w, cin], seed);
        let y = conv.forward(&x, true).unwrap();
        let (oh, ow) = ((h + 2 * pad - k) / stride + 1, (w + 2 * pad - k) / stride + 1);
        prop_assert_eq!(y.shape(), &[n, oh, ow, cout]);
        let dx = conv.backward(&filled(y.shape(), seed + 1), true).unwrap().unwrap();
        prop_assert_eq!(dx.shape(), x.shape());
        prop_assert_eq!(conv.weight.grad.shape(), conv.weight.value.shape());
    }

    /// Training-mode batch norm gives each channel mean 0 and variance 1 (before gamma/beta),
    /// whatever the input's scale and offset, and its input gradient sums to 0 per channel.
    #[test]
    fn batchnorm_normalises(rows in 2usize..40, c in 1usize..6, scale in 0.1f32..100.0, offset in -50.0f32..50.0, seed in 0u64..1000) {
        let mut bn = BatchNorm::new(c, false, Device::Cpu);
        let x0 = filled(&[rows, c], seed);
        let x = Tensor::from_vec(&[rows, c], x0.to_vec().iter().map(|v| v * scale + offset).collect()).unwrap();
        let y = bn.forward(&x, true).unwrap().to_vec();
        for ch in 0..c {
            let col: Vec<f64> = (0..rows).map(|r| y[r * c + ch] as f64).collect();
            let mean = col.iter().sum::<f64>() / rows as f64;
            let var = col.iter().map(|v| (v - mean).powi(2)).sum::<f64>() / rows as f64;
            let x_var: f64 = { let xc: Vec<f64> = (0..rows).map(|r| x.to_vec()[r * c + ch] as f64).collect();
                let m = xc.iter().sum::<f64>() / rows as f64; xc.iter().map(|v| (v - m).powi(2)).sum::<f64>() / rows as f64 };
            prop_assert!(mean.abs() < 1e-4, "mean {}", mean);
            if x_var > 1e-3 {
                prop_assert!((var - x_var / (x_var + 1e-5)).abs() < 1e-3, "var {} for input var {}", var, x_var);
            }
        }
        let dx = bn.backward(&filled(&[rows, c], seed + 7)).unwrap().to_vec();
        for ch in 0..c {
            let s: f64 = (0..rows).map(|r| dx[r * c + ch] as f64).sum();
            let a: f64 = (0..rows).map(|r| (dx[r * c + ch] as f64).abs()).sum();
            // Relative to the gradient's size: the batch mean is kept in f32, as PyTorch keeps
            // it, and with an offset far above the spread (36.7 +- 0.1) its rounding alone
            // leaves sum(x_hat) at ~1e-4 and the sum of dx at a few 1e-3 of sum |dx|. A
            // missing term of the formula would leave a sum of order sum |dx|.
            prop_assert!(s.abs() <= 1e-3 + 2e-2 * a, "sum of dx {} (sum of |dx| {})", s, a);
        }
    }

    /// Linear and max-pool backward passes return the input's shape.
    #[test]
    fn linear_and_pool_shapes(n in 1usize..5, i in 1usize..9, o in 1usize..9, h in 1usize..9, seed in 0u64..1000) {
        let mut lin = Linear::new(i, o, true, &mut ChaCha8Rng::seed_from_u64(seed));
        let y = lin.forward(&filled(&[n, i], seed), true).unwrap();
        prop_assert_eq!(y.shape(), &[n, o]);
        let dx = lin.backward(&y, true).unwrap().unwrap();
        prop_assert_eq!(dx.shape(), &[n, i]);
        let mut mp = MaxPool::new(3, 2, 1);
        let x = filled(&[n, h, h, 2], seed);
        let y = mp.forward(&x, true).unwrap();
        prop_assert_eq!(y.shape(), &[n, (h - 1) / 2 + 1, (h - 1) / 2 + 1, 2]);
        let dx = mp.backward(&y).unwrap();
        prop_assert_eq!(dx.shape(), x.shape());
    }
}

/// Shape errors are errors, not panics.
#[test]
fn bad_shapes_are_errors() {
    let mut conv = Conv2d::new(3, 4, 3, 1, 1, &mut ChaCha8Rng::seed_from_u64(0));
    assert!(conv.forward(&filled(&[1, 5, 5, 2], 0), true).is_err());
    assert!(conv.forward(&filled(&[5, 5, 3], 0), true).is_err());
    let mut conv7 = Conv2d::new(3, 4, 7, 1, 0, &mut ChaCha8Rng::seed_from_u64(0));
    assert!(conv7.forward(&filled(&[1, 3, 3, 3], 0), true).is_err());
    let mut bn = BatchNorm::new(4, true, Device::Cpu);
    assert!(bn.forward(&filled(&[2, 3], 0), true).is_err());
    assert!(
        bn.forward(&filled(&[1, 4], 0), true).is_err(),
        "one value per channel cannot train"
    );
    let mut lin = Linear::new(3, 2, true, &mut ChaCha8Rng::seed_from_u64(0));
    assert!(lin.forward(&filled(&[2, 4], 0), true).is_err());
    assert!(
        lin.backward(&filled(&[2, 2], 0), true).is_err(),
        "backward before forward"
    );
    assert!(Tensor::from_vec(&[2, 2], vec![0.0; 3]).is_err());
}
