//! Any bytes as STL-10 image and label files.
#![no_main]

use libfuzzer_sys::fuzz_target;
use simclr_data::{parse_stl10_labels, stl10_image, stl10_image_count, STL10_IMAGE_BYTES};

fuzz_target!(|data: &[u8]| {
    let _ = parse_stl10_labels(data, "fuzz");
    if let Ok(n) = stl10_image_count(data.len() as u64, "fuzz") {
        for rec in data.chunks_exact(STL10_IMAGE_BYTES).take(n.min(2)) {
            stl10_image(rec).unwrap();
        }
    }
});
