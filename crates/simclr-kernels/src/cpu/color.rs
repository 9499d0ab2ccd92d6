//! The pixel operations of the CPU path, on planar RGB `f32` images (`3 x h x w`, red plane
//! first, values in \[0, 1\]).
//!
//! Each follows torchvision's float-tensor semantics (`torchvision.transforms.v2.functional`),
//! checked against values torchvision computed (`tests/fixtures/torchvision_ops.safetensors`); they
//! are also the reference of the GPU kernels, which apply the same
//! [`ViewParams`].

use crate::augment::{gaussian_kernel, noise_normal, JitterOp, ViewParams, LUMA};

/// Gray value (ITU-R 601-2 luma, torchvision's weights and order of operations).
#[inline(always)]
pub fn luma(r: f32, g: f32, b: f32) -> f32 {
    r * LUMA[0] + g * LUMA[1] + b * LUMA[2]
}

fn planes(img: &mut [f32]) -> (&mut [f32], &mut [f32], &mut [f32]) {
    let n = img.len() / 3;
    let (r, rest) = img.split_at_mut(n);
    let (g, b) = rest.split_at_mut(n);
    (r, g, &mut b[..n])
}

/// `x * factor`, clamped to \[0, 1\] (torchvision's `adjust_brightness`).
pub fn adjust_brightness(img: &mut [f32], factor: f32) {
    for v in img.iter_mut() {
        *v = (*v * factor).clamp(0.0, 1.0);
    }
}

/// Blend with the mean of the grayscale image: `factor * x + (1 - factor) * mean`, clamped
/// (torchvision's `adjust_contrast`).
pub fn adjust_contrast(img: &mut [f32], factor: f32) {
    let (r, g, b) = planes(img);
    let n = r.len();
    if n == 0 {
        return;
    }
    let mut sum = 0.0f64;
    for i in 0..n {
        sum += luma(r[i], g[i], b[i]) as f64;
    }
    let mean = (sum / n as f64) as f32;
    let m = (1.0 - factor) * mean;
    for v in img.iter_mut() {
        *v = (*v * factor + m).clamp(0.0, 1.0);
    }
}

/// Blend with the grayscale image: `factor * x + (1 - factor) * gray`, clamped (torchvision's
/// `adjust_saturation`).
pub fn adjust_saturation(img: &mut [f32], factor: f32) {
    let (r, g, b) = planes(img);
    let k = 1.0 - factor;
    for i in 0..r.len() {
        let l = luma(r[i], g[i], b[i]) * k;
        r[i] = (r[i] * factor + l).clamp(0.0, 1.0);
        g[i] = (g[i] * factor + l).clamp(0.0, 1.0);
        b[i] = (b[i] * factor + l).clamp(0.0, 1.0);
    }
}

/// RGB to HSV, as torchvision's `_rgb_to_hsv` (which follows Pillow); h in \[0, 1).
#[inline(always)]
pub fn rgb_to_hsv(r: f32, g: f32, b: f32) -> (f32, f32, f32) {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    let eqc = maxc == minc;
    let cr = maxc - minc;
    let s = cr / if eqc { 1.0 } else { maxc };
    let div = if eqc { 1.0 } else { cr };
    let rc = (maxc - r) / div;
    let gc = (maxc - g) / div;
    let bc = (maxc - b) / div;
    let h = if maxc == r {
        bc - gc
    } else if maxc == g {
        2.0 + rc - bc
    } else {
        4.0 + gc - rc
    };
    let h = (h * (1.0 / 6.0) + 1.0) % 1.0;
    (h, s, maxc)
}

/// HSV to RGB, as torchvision's `_hsv_to_rgb`.
#[inline(always)]
pub fn hsv_to_rgb(h: f32, s: f32, v: f32) -> (f32, f32, f32) {
    let h6 = h * 6.0;
    let i = h6.floor();
    let f = h6 - i;
    let sxf = s * f;
    let one_minus_s = 1.0 - s;
    let q = ((1.0 - sxf) * v).clamp(0.0, 1.0);
    let t = ((sxf + one_minus_s) * v).clamp(0.0, 1.0);
    let p = (one_minus_s * v).clamp(0.0, 1.0);
    match (i as i32).rem_euclid(6) {
        0 => (v, t, p),
        1 => (q, v, p),
        2 => (p, v, t),
        3 => (p, q, v),
        4 => (t, p, v),
        _ => (v, p, q),
    }
}

/// Shift the hue by `shift` (a fraction of the circle, in \[-0.5, 0.5\]) in HSV (torchvision's
/// `adjust_hue`).
pub fn adjust_hue(img: &mut [f32], shift: f32) {
    let (r, g, b) = planes(img);
    for i in 0..r.len() {
        let (h, s, v) = rgb_to_hsv(r[i], g[i], b[i]);
        let h = (h + shift).rem_euclid(1.0);
        // rem_euclid can round up to exactly 1.0 for tiny negative sums; torch's remainder
        // gives the same value, and hsv_to_rgb maps 6.0 to sector 0 like torch.
        let (nr, ng, nb) = hsv_to_rgb(h, s, v);
        r[i] = nr;
        g[i] = ng;
        b[i] = nb;
    }
}

/// Every channel set to the luma (torchvision's `rgb_to_grayscale` with 3 output channels).
pub fn to_grayscale(img: &mut [f32]) {
    let (r, g, b) = planes(img);
    for i in 0..r.len() {
        let l = luma(r[i], g[i], b[i]);
        r[i] = l;
        g[i] = l;
        b[i] = l;
    }
}

/// Index `i` reflected into `0..n` without repeating the edge (PyTorch's "reflect" padding),
/// folded again as often as needed for kernels wider than the image.
#[inline]
pub fn reflect(mut i: isize, n: usize) -> usize {
    let n = n as isize;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    i = i.rem_euclid(period);
    if i >= n {
        i = period - i;
    }
    i as usize
}

/// Separable Gaussian blur of each plane of a `w x h` image: `kernel` taps (odd), standard
/// deviation `sigma`, reflect padding (torchvision's `gaussian_blur`). `scratch` is resized as
/// needed.
pub fn gaussian_blur(
    img: &mut [f32],
    w: usize,
    h: usize,
    kernel: u32,
    sigma: f32,
    scratch: &mut Vec<f32>,
) {
    let full = gaussian_kernel(kernel, sigma);
    // Taps whose weight is below 1e-9 change no output by more than ~1e-8 (values are in
    // [0, 1]): leave them out (torchvision's normalisation over all taps is kept). For the
    // paper's sigma in [0.1, 2] and 23 taps this halves the work on average.
    let r_full = full.len() / 2;
    let r = (0..=r_full)
        .rev()
        .find(|&t| full[r_full + t] >= 1e-9)
        .unwrap_or(0);
    let k = &full[r_full - r..=r_full + r];
    let n = w * h;
    scratch.clear();
    scratch.resize(n + (w + 2 * r), 0.0);
    let (tmp, pad) = scratch.split_at_mut(n);
    let rows: Vec<usize> = (0..h + 2 * r)
        .map(|y| reflect(y as isize - r as isize, h))
        .collect();
    for plane in img.chunks_exact_mut(n) {
        // Horizontal pass: plane -> tmp.
        for y in 0..h {
            let row = &plane[y * w..(y + 1) * w];
            pad[r..r + w].copy_from_slice(row);
            for j in 0..r {
                pad[j] = row[reflect(j as isize - r as isize, w)];
                pad[r + w + j] = row[reflect((w + j) as isize, w)];
            }
            weighted_sum(&mut tmp[y * w..(y + 1) * w], k, |t| &pad[t..t + w]);
        }
        // Vertical pass: tmp -> plane.
        for y in 0..h {
            let tmp = &*tmp;
            weighted_sum(&mut plane[y * w..(y + 1) * w], k, |t| {
                let sy = rows[y + t];
                &tmp[sy * w..(sy + 1) * w]
            });
        }
    }
}

/// `out[x] = sum_t k[t] * src(t)[x]`, in blocks of 32 lanes held in registers.
#[inline(always)]
fn weighted_sum<'a>(out: &mut [f32], k: &[f32], src: impl Fn(usize) -> &'a [f32]) {
    const B: usize = 32;
    let w = out.len();
    let mut x0 = 0;
    while x0 + B <= w {
        let mut acc = [0.0f32; B];
        for (t, &wt) in k.iter().enumerate() {
            let s: &[f32; B] = src(t)[x0..x0 + B].try_into().unwrap();
            for i in 0..B {
                acc[i] += wt * s[i];
            }
        }
        out[x0..x0 + B].copy_from_slice(&acc);
        x0 += B;
    }
    if x0 < w {
        let out = &mut out[x0..];
        out.fill(0.0);
        for (t, &wt) in k.iter().enumerate() {
            let s = &src(t)[x0..];
            for (o, &v) in out.iter_mut().zip(s) {
                *o += wt * v;
            }
        }
    }
}

/// Replace the image by the Sobel gradient magnitude of its luma, `min(1, |grad| / 4)`, in
/// every channel (edge replication at the border). `scratch` is resized as needed.
pub fn sobel(img: &mut [f32], w: usize, h: usize, scratch: &mut Vec<f32>) {
    let n = w * h;
    scratch.clear();
    scratch.resize(n, 0.0);
    {
        let (r, g, b) = planes(img);
        for i in 0..n {
            scratch[i] = luma(r[i], g[i], b[i]);
        }
    }
    let at = |x: isize, y: isize| {
        let x = x.clamp(0, w as isize - 1) as usize;
        let y = y.clamp(0, h as isize - 1) as usize;
        scratch[y * w + x]
    };
    for y in 0..h as isize {
        for x in 0..w as isize {
            let gx = (at(x + 1, y - 1) + 2.0 * at(x + 1, y) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x - 1, y) + at(x - 1, y + 1));
            let gy = (at(x - 1, y + 1) + 2.0 * at(x, y + 1) + at(x + 1, y + 1))
                - (at(x - 1, y - 1) + 2.0 * at(x, y - 1) + at(x + 1, y - 1));
            let m = ((gx * gx + gy * gy).sqrt() * 0.25).min(1.0);
            let i = y as usize * w + x as usize;
            img[i] = m;
            img[n + i] = m;
            img[2 * n + i] = m;
        }
    }
}

/// Set the box (`x0`, `y0`, `bw`, `bh`) of every plane to 0 (clipped to the image).
pub fn cutout(img: &mut [f32], w: usize, h: usize, x0: usize, y0: usize, bw: usize, bh: usize) {
    let n = w * h;
    let (x1, y1) = ((x0 + bw).min(w), (y0 + bh).min(h));
    for plane in img.chunks_exact_mut(n) {
        for y in y0.min(h)..y1 {
            plane[y * w + x0.min(x1)..y * w + x1].fill(0.0);
        }
    }
}

/// Add `std * noise_normal(seed, i)` to element `i`, clamped to \[0, 1\].
pub fn add_noise(img: &mut [f32], std: f32, seed: u32) {
    for (i, v) in img.iter_mut().enumerate() {
        *v = (*v + std * noise_normal(seed, i as u32)).clamp(0.0, 1.0);
    }
}

/// Steps 4 to 9 (colour jitter, grayscale, blur, Sobel, cutout, noise) on a planar `f32` view
/// in \[0, 1\]: what the GPU colour path does after the CPU's geometry. `scratch` is a work
/// buffer.
pub fn apply_color_stage(planar: &mut [f32], p: &ViewParams, scratch: &mut Vec<f32>) {
    let (w, h) = (p.out_w as usize, p.out_h as usize);
    if p.has_jitter() {
        for op in p.jitter_ops() {
            match op {
                JitterOp::Brightness if p.brightness != 1.0 => {
                    adjust_brightness(planar, p.brightness)
                }
                JitterOp::Contrast if p.contrast != 1.0 => adjust_contrast(planar, p.contrast),
                JitterOp::Saturation if p.saturation != 1.0 => {
                    adjust_saturation(planar, p.saturation)
                }
                JitterOp::Hue if p.hue != 0.0 => adjust_hue(planar, p.hue),
                _ => {}
            }
        }
    }
    if p.grayscale != 0 {
        to_grayscale(planar);
    }
    if p.blur_sigma > 0.0 && p.blur_kernel > 1 {
        gaussian_blur(planar, w, h, p.blur_kernel, p.blur_sigma, scratch);
    }
    if p.sobel != 0 {
        sobel(planar, w, h, scratch);
    }
    if p.cutout_w > 0 && p.cutout_h > 0 {
        cutout(
            planar,
            w,
            h,
            p.cutout_x as usize,
            p.cutout_y as usize,
            p.cutout_w as usize,
            p.cutout_h as usize,
        );
    }
    if p.noise_std > 0.0 {
        add_noise(planar, p.noise_std, p.noise_seed);
    }
}
