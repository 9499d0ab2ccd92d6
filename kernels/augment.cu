// The colour stage of SimCLR's augmentation on a batch of u8 crops: the GPU twin of
// simclr_kernels::cpu::color::apply_color_stage followed by the normalisation.
//
// Input: V views of 3 x H x W planar u8 (the CPU did crop, resize, flip, rotation). Each view has
// its ViewParams (the struct of simclr_kernels::augment, same layout). Three kernels:
//   aug_color   one block per view: colour jitter in the view's sampled order (the contrast
//               mean is a block reduction of the gray image at that point), grayscale; writes
//               planar f32 in [0, 1].
//   aug_blur_h  one thread per element: the horizontal pass of the separable Gaussian blur
//               (reflect padding), or a copy for views without blur.
//   aug_finish  one thread per element: the vertical pass, cutout, Gaussian noise, then
//               (x - mean) / std, written as f32 or bf16, NCHW or NHWC.
// Sobel (an ablation-only transform) is not implemented on the GPU; the launcher rejects it.

struct ViewParams {
    u32 crop_x, crop_y, crop_w, crop_h, src_w, src_h, out_w, out_h, flip, rotation;
    float brightness, contrast, saturation, hue;
    u32 jitter_order, grayscale;
    float blur_sigma;
    u32 blur_kernel, sobel, cutout_x, cutout_y, cutout_w, cutout_h;
    float noise_std;
    u32 noise_seed;
    u32 reserved[3];
};

#define AUG_MAX_TAPS 511
#define LUMA_R 0.2989f
#define LUMA_G 0.587f
#define LUMA_B 0.114f

__device__ __forceinline__ float luma(float r, float g, float b) { return r * LUMA_R + g * LUMA_G + b * LUMA_B; }
__device__ __forceinline__ float clamp01(float v) { return fminf(fmaxf(v, 0.0f), 1.0f); }

// Rust's f32::rem_euclid(1.0).
__device__ __forceinline__ float rem_euclid1(float x) {
    float r = fmodf(x, 1.0f);
    return r < 0.0f ? r + 1.0f : r;
}

__device__ __forceinline__ void rgb_to_hsv(float r, float g, float b, float& h, float& s, float& v) {
    float maxc = fmaxf(fmaxf(r, g), b);
    float minc = fminf(fminf(r, g), b);
    bool eqc = maxc == minc;
    float cr = maxc - minc;
    s = cr / (eqc ? 1.0f : maxc);
    float div = eqc ? 1.0f : cr;
    float rc = (maxc - r) / div, gc = (maxc - g) / div, bc = (maxc - b) / div;
    float hh;
    if (maxc == r) hh = bc - gc;
    else if (maxc == g) hh = 2.0f + rc - bc;
    else hh = 4.0f + gc - rc;
    h = fmodf(hh * (1.0f / 6.0f) + 1.0f, 1.0f);
    v = maxc;
}

__device__ __forceinline__ void hsv_to_rgb(float h, float s, float v, float& r, float& g, float& b) {
    float h6 = h * 6.0f;
    float i = floorf(h6);
    float f = h6 - i;
    float sxf = s * f;
    float oms = 1.0f - s;
    float q = clamp01((1.0f - sxf) * v);
    float t = clamp01((sxf + oms) * v);
    float p = clamp01(oms * v);
    int sector = ((int)i % 6 + 6) % 6;
    switch (sector) {
        case 0: r = v; g = t; b = p; break;
        case 1: r = q; g = v; b = p; break;
        case 2: r = p; g = v; b = t; break;
        case 3: r = p; g = q; b = v; break;
        case 4: r = t; g = p; b = v; break;
        default: r = v; g = p; b = q; break;
    }
}

// One pointwise jitter op (contrast uses the precomputed mean of the gray image).
__device__ __forceinline__ void jitter_op(const ViewParams& p, u32 op, float mean, float& r, float& g, float& b) {
    if (op == 0 && p.brightness != 1.0f) {
        r = clamp01(r * p.brightness); g = clamp01(g * p.brightness); b = clamp01(b * p.brightness);
    } else if (op == 1 && p.contrast != 1.0f) {
        float m = (1.0f - p.contrast) * mean;
        r = clamp01(r * p.contrast + m); g = clamp01(g * p.contrast + m); b = clamp01(b * p.contrast + m);
    } else if (op == 2 && p.saturation != 1.0f) {
        float l = luma(r, g, b) * (1.0f - p.saturation);
        r = clamp01(r * p.saturation + l); g = clamp01(g * p.saturation + l); b = clamp01(b * p.saturation + l);
    } else if (op == 3 && p.hue != 0.0f) {
        float h, s, v;
        rgb_to_hsv(r, g, b, h, s, v);
        h = rem_euclid1(h + p.hue);
        hsv_to_rgb(h, s, v, r, g, b);
    }
}

__device__ __forceinline__ bool has_jitter(const ViewParams& p) {
    return p.brightness != 1.0f || p.contrast != 1.0f || p.saturation != 1.0f || p.hue != 0.0f;
}

extern "C" __global__ void aug_color(const unsigned char* src, const ViewParams* params, int h, int w, float* work) {
    __shared__ double scratch[32];
    __shared__ float mean_s;
    const ViewParams p = params[blockIdx.x];
    int n = h * w;
    const unsigned char* s = src + (u64)blockIdx.x * 3 * n;
    float* o = work + (u64)blockIdx.x * 3 * n;
    const float k = 1.0f / 255.0f;
    bool jit = has_jitter(p);
    // The ops applied before contrast decide the mean it blends with.
    int n_before = 4;
    if (jit && p.contrast != 1.0f) {
        for (int i = 0; i < 4; i++)
            if (((p.jitter_order >> (8 * i)) & 3u) == 1u) { n_before = i; break; }
        double acc = 0.0;
        for (int i = threadIdx.x; i < n; i += blockDim.x) {
            float r = s[i] * k, g = s[n + i] * k, b = s[2 * n + i] * k;
            for (int j = 0; j < n_before; j++) jitter_op(p, (p.jitter_order >> (8 * j)) & 3u, 0.0f, r, g, b);
            acc += (double)luma(r, g, b);
        }
        acc = block_sum_f64(acc, scratch);
        if (threadIdx.x == 0) mean_s = (float)(acc / (double)n);
        __syncthreads();
    }
    float mean = (jit && p.contrast != 1.0f) ? mean_s : 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float r = s[i] * k, g = s[n + i] * k, b = s[2 * n + i] * k;
        if (jit)
            for (int j = 0; j < 4; j++) jitter_op(p, (p.jitter_order >> (8 * j)) & 3u, mean, r, g, b);
        if (p.grayscale) {
            float l = luma(r, g, b);
            r = g = b = l;
        }
        o[i] = r;
        o[n + i] = g;
        o[2 * n + i] = b;
    }
}

// Index i reflected into 0..n without repeating the edge (PyTorch's "reflect" padding).
__device__ __forceinline__ int reflect_idx(int i, int n) {
    if (n == 1) return 0;
    int period = 2 * (n - 1);
    i %= period;
    if (i < 0) i += period;
    return i >= n ? period - i : i;
}

// The view's blur weights in shared memory (normalised over all taps, then trimmed to the taps
// >= 1e-9 as on the CPU); returns the radius in use, -1 when the view has no blur.
__device__ int blur_weights(const ViewParams& p, float* wts) {
    __shared__ int radius_s;
    if (!(p.blur_sigma > 0.0f && p.blur_kernel > 1u)) return -1;
    if (threadIdx.x == 0) {
        int taps = (int)p.blur_kernel;
        int rf = taps / 2;
        float sum = 0.0f;
        for (int t = -rf; t <= rf; t++) {
            float x = (float)t / p.blur_sigma;
            float v = expf(-0.5f * x * x);
            wts[t + rf] = v;
            sum += v;
        }
        for (int t = 0; t <= 2 * rf; t++) wts[t] /= sum;
        int r = 0;
        for (int t = rf; t >= 0; t--)
            if (wts[rf + t] >= 1e-9f) { r = t; break; }
        // Shift the kept taps to the front: wts[0..2r].
        for (int t = 0; t <= 2 * r; t++) wts[t] = wts[rf - r + t];
        radius_s = r;
    }
    __syncthreads();
    return radius_s;
}

extern "C" __global__ void aug_blur_h(const float* work, const ViewParams* params, int h, int w, float* tmp) {
    __shared__ float wts[AUG_MAX_TAPS];
    const ViewParams p = params[blockIdx.y];
    int r = blur_weights(p, wts);
    int n3 = 3 * h * w;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n3) return;
    const float* src = work + (u64)blockIdx.y * n3;
    float* dst = tmp + (u64)blockIdx.y * n3;
    if (r < 0) {
        dst[i] = src[i];
        return;
    }
    int x = i % w;
    const float* row = src + (i - x);
    float acc = 0.0f;
    for (int t = 0; t <= 2 * r; t++) acc += wts[t] * row[reflect_idx(x + t - r, w)];
    dst[i] = acc;
}

// The counter-based noise of simclr_kernels::augment::noise_normal.
__device__ __forceinline__ u32 hash32(u32 x) {
    x ^= x >> 16;
    x *= 0x7feb352du;
    x ^= x >> 15;
    x *= 0x846ca68bu;
    x ^= x >> 16;
    return x;
}
__device__ __forceinline__ float noise_normal(u32 seed, u32 index) {
    u32 a = hash32(index * 2u + hash32(seed));
    u32 b = hash32(a ^ 0x9e3779b9u);
    float u1 = ((float)(a >> 8) + 1.0f) * (1.0f / 16777216.0f);
    float u2 = (float)(b >> 8) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cosf(6.28318530717958647692f * u2);
}

// layout 0: NCHW, 1: NHWC; dtype 0: f32, 1: bf16.
extern "C" __global__ void aug_finish(const float* tmp, const ViewParams* params, int h, int w, const float* mean,
                                      const float* inv_std, int layout, int dtype, void* out) {
    __shared__ float wts[AUG_MAX_TAPS];
    const ViewParams p = params[blockIdx.y];
    int r = blur_weights(p, wts);
    int n = h * w, n3 = 3 * n;
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n3) return;
    const float* src = tmp + (u64)blockIdx.y * n3;
    int c = i / n, y = (i % n) / w, x = i % w;
    float v;
    if (r < 0) {
        v = src[i];
    } else {
        const float* plane = src + (u64)c * n;
        v = 0.0f;
        for (int t = 0; t <= 2 * r; t++) v += wts[t] * plane[reflect_idx(y + t - r, h) * w + x];
    }
    if (p.cutout_w > 0u && p.cutout_h > 0u && (u32)x >= p.cutout_x && (u32)x < p.cutout_x + p.cutout_w &&
        (u32)y >= p.cutout_y && (u32)y < p.cutout_y + p.cutout_h)
        v = 0.0f;
    if (p.noise_std > 0.0f) v = clamp01(v + p.noise_std * noise_normal(p.noise_seed, (u32)i));
    v = (v - mean[c]) * inv_std[c];
    u64 o = layout == 0 ? (u64)blockIdx.y * n3 + i : ((u64)blockIdx.y * n + (u64)y * w + x) * 3 + c;
    if (dtype == 0)
        reinterpret_cast<float*>(out)[o] = v;
    else
        reinterpret_cast<bf16_t*>(out)[o] = f32_to_bf16(v);
}
