//! Any bytes as a CIFAR-10 binary batch.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::{Cifar10, Dataset};

fuzz_target!(|data: &[u8]| {
    if let Ok(ds) = Cifar10::from_batches(&[(data, "fuzz")]) {
        for i in 0..ds.len().min(4) {
            let img = ds.image(i).unwrap();
            assert_eq!((img.width(), img.height()), (32, 32));
        }
    }
});
