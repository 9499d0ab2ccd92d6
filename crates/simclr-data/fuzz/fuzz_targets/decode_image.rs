//! Any bytes through the image decoder (every format), then through the augmentation:
//! an error or an image, never a panic, a hang or a huge allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::{decode_image, AugmentConfig, Augmentation, DecodeOptions, ViewKey};

fuzz_target!(|data: &[u8]| {
    let opts = DecodeOptions {
        max_pixels: 1 << 22,
        max_side: 8192,
    };
    if let Ok(img) = decode_image(data, "fuzz", &opts) {
        let aug = Augmentation::new(AugmentConfig::simclr(16, 1.0, true)).unwrap();
        let key = ViewKey {
            seed: data.len() as u64,
            epoch: 0,
            index: 0,
            view: 0,
        };
        let (_, v) = aug.view_f32(&img, key).unwrap();
        assert!(v.iter().all(|x| x.is_finite()));
    }
});
