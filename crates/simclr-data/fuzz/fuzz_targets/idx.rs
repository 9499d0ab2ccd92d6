//! Any bytes as an IDX file, plain or gzip, and as an MNIST pair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::{maybe_gunzip, parse_idx, Dataset, Mnist, MnistKind};

/// More images than any IDX data set has (MNIST's training split has 60,000).
const MAX_LABELS: usize = 1 << 20;

fuzz_target!(|data: &[u8]| {
    let Ok(bytes) = maybe_gunzip(data.to_vec(), "fuzz") else {
        return;
    };
    if let Ok(arr) = parse_idx(&bytes, "fuzz") {
        let n = arr.dims.first().copied().unwrap_or(0);
        // Images of zero bytes make any count valid; the labels below are this harness's own
        // allocation, so a count beyond what a real file holds is not pursued.
        if n > MAX_LABELS {
            return;
        }
        let labels = simclr_data::IdxArray {
            dims: vec![n],
            data: vec![0; n],
        };
        if let Ok(m) = Mnist::from_idx(arr, labels, MnistKind::Digits, "i", "l") {
            for i in 0..m.len().min(4) {
                let _ = m.image(i);
            }
        }
    }
});
