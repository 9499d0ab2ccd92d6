//! `simclr augment-preview`: a PNG grid of images and their augmented views, so a person sees
//! what the augmentations do.

use std::path::Path;

use image::{Rgb, RgbImage};
use simclr_data::{AugmentConfig, Augmentation, Crop, Dataset, ViewKey};

use crate::error::{io_err, CliError, Result};

/// The most rows (images) a preview shows.
pub const MAX_PREVIEW_IMAGES: usize = 64;
/// The most augmented views per image a preview shows.
pub const MAX_PREVIEW_VIEWS: usize = 32;

/// Renders `images` images of `ds` (spread over the set), each followed by `views` views
/// through `aug` (from `seed`), one image per row, every cell scaled up to at least 96
/// pixels, and writes the grid as a PNG.
pub fn augment_preview(
    ds: &dyn Dataset,
    aug: &Augmentation,
    images: usize,
    views: usize,
    seed: u64,
    out: &Path,
) -> Result<()> {
    // The grid is one image in memory: these bounds keep it to a few hundred MiB.
    if !(1..=MAX_PREVIEW_IMAGES).contains(&images) {
        return Err(CliError::Usage(format!(
            "augment-preview: --images {images}: the allowed range is 1..={MAX_PREVIEW_IMAGES}"
        )));
    }
    if !(1..=MAX_PREVIEW_VIEWS).contains(&views) {
        return Err(CliError::Usage(format!(
            "augment-preview: --views {views}: the allowed range is 1..={MAX_PREVIEW_VIEWS}"
        )));
    }
    let (w, h) = aug.output_size();
    let (w, h) = (w as usize, h as usize);
    let scale = 96usize.div_ceil(w.min(h)).max(1);
    let (cw, ch) = (w * scale, h * scale);
    let gap = 4;
    let images = images.clamp(1, ds.len().max(1));
    let cols = views + 1;
    let mut grid = RgbImage::from_pixel(
        (cols * (cw + gap) + gap) as u32,
        (images * (ch + gap) + gap) as u32,
        Rgb([255, 255, 255]),
    );
    let original = Augmentation::new(AugmentConfig {
        crop: Crop::Full,
        ..AugmentConfig::eval(w as u32, None)
    })?;
    let mut cell = vec![0u8; 3 * w * h];
    for row in 0..images {
        let index = row * ds.len() / images;
        let img = ds.image(index)?;
        for col in 0..cols {
            let key = ViewKey {
                seed,
                epoch: 0,
                index: index as u64,
                view: col.saturating_sub(1) as u32,
            };
            let which = if col == 0 { &original } else { aug };
            let p = which.draw(img.width(), img.height(), key);
            Augmentation::apply_u8(&img, &p, &mut cell)?;
            let (x0, y0) = (gap + col * (cw + gap), gap + row * (ch + gap));
            for y in 0..ch {
                for x in 0..cw {
                    let (sx, sy) = (x / scale, y / scale);
                    let at = |c: usize| cell[c * w * h + sy * w + sx];
                    grid.put_pixel((x0 + x) as u32, (y0 + y) as u32, Rgb([at(0), at(1), at(2)]));
                }
            }
        }
    }
    grid.save(out).map_err(|e| io_err(out, e))
}
