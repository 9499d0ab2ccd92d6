//! Any bytes as an IDX file, plain or gzip, and as an MNIST pair.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::{maybe_gunzip, parse_idx, Dataset, Mnist, MnistKind};

fuzz_target!(|data: &[u8]| {
    let Ok(bytes) = maybe_gunzip(data.to_vec(), "fuzz") else {
        return;
    };
    if let Ok(arr) = parse_idx(&bytes, "fuzz") {
        let n = arr.dims.first().copied().unwrap_or(0);
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
