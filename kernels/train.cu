// What a training step needs beyond cuDNN's convolutions and cuBLAS's products: the GPU twins
// of simclr_kernels::cpu::{eltwise, norm, pooling, optim}. Activations are NHWC, seen as
// [rows, channels] matrices.
//
// Batch norm is ours, not cuDNN's: SimCLR's global batch norm all-reduces the statistics between
// the reduction and the normalisation (and the gradient sums in the backward pass), which
// cuDNN's fused calls do not allow. The statistics are two-pass (mean, then centred squares),
// summed in f64 per fixed group of rows, as on the CPU.

#define RED_THREADS 256

// ---- element-wise ----

template <typename T>
__device__ __forceinline__ void relu_impl(const T* x, T* y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        store_elem(y, i, fmaxf(load_elem(x, i), 0.0f));
}
#define RELU(S, T) \
    extern "C" __global__ void relu_##S(const T* x, T* y, u64 n) { relu_impl(x, y, n); }
FOR_EACH_ELEM(RELU)

// dx = dy where the ReLU's output y > 0, else 0 (dx may alias dy).
template <typename T>
__device__ __forceinline__ void relu_backward_impl(const T* dy, const T* y, T* dx, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        dx[i] = load_elem(y, i) <= 0.0f ? (T)0 : dy[i];  // NaN in y keeps dy, as the CPU twin
}
#define RELU_BACKWARD(S, T)                                                                   \
    extern "C" __global__ void relu_backward_##S(const T* dy, const T* y, T* dx, u64 n) {   \
        relu_backward_impl(dy, y, dx, n);                                                     \
    }
FOR_EACH_ELEM(RELU_BACKWARD)

// a += b (the residual add), optionally followed by a ReLU.
template <typename T>
__device__ __forceinline__ void add_impl(T* a, const T* b, u64 n, int relu) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float v = load_elem(a, i) + load_elem(b, i);
        store_elem(a, i, relu ? fmaxf(v, 0.0f) : v);
    }
}
#define ADD(S, T) \
    extern "C" __global__ void add_##S(T* a, const T* b, u64 n, int relu) { add_impl(a, b, n, relu); }
FOR_EACH_ELEM(ADD)

extern "C" __global__ void cast_f32_bf16(const float* x, bf16_t* y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_bf16_f32(const bf16_t* x, float* y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void f64_to_f32(const double* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = (float)x[i];
}

// ---- reductions ----

// partials[b] = sum of the block's grid-stride share of x, in f64.
extern "C" __global__ void sum_partials_f32(const float* x, u64 n, double* partials) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        acc += (double)x[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) partials[blockIdx.x] = acc;
}

// out[0] = scale * sum of partials[0..n), one block, fixed order.
extern "C" __global__ void sum_finish(const double* partials, int n, double scale, double* out) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += partials[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) out[0] = acc * scale;
}

// ---- global average pooling, [n, hw, c] <-> [n, c] ----

// The pooled features are f32 whatever the activations' type (the head computes in f32).
template <typename T>
__device__ __forceinline__ void gap_forward_impl(const T* x, int n, int hw, int c, float* y) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n * c) return;
    int b = i / c, ch = i % c;
    const T* xb = x + (u64)b * hw * c + ch;
    float acc = 0.0f;
    for (int p = 0; p < hw; p++) acc += load_elem(xb, (u64)p * c);
    y[i] = acc * (1.0f / (float)hw);
}
#define GAP_FORWARD(S, T)                                                                       \
    extern "C" __global__ void gap_forward_##S(const T* x, int n, int hw, int c, float* y) {   \
        gap_forward_impl(x, n, hw, c, y);                                                       \
    }
FOR_EACH_ELEM(GAP_FORWARD)

template <typename T>
__device__ __forceinline__ void gap_backward_impl(const float* dy, int n, int hw, int c, T* dx) {
    u64 total = (u64)n * hw * c;
    float s = 1.0f / (float)hw;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        u64 b = i / ((u64)hw * c);
        int ch = (int)(i % c);
        store_elem(dx, i, dy[b * c + ch] * s);
    }
}
#define GAP_BACKWARD(S, T)                                                                      \
    extern "C" __global__ void gap_backward_##S(const float* dy, int n, int hw, int c, T* dx) {  \
        gap_backward_impl(dy, n, hw, c, dx);                                                    \
    }
FOR_EACH_ELEM(GAP_BACKWARD)

// ---- max pooling, NHWC, square window, implicit -inf padding ----

// One thread per output value; arg gets the flat input index of the first maximum (NaN wins,
// as in PyTorch and the CPU twin).
template <typename T>
__device__ __forceinline__ void maxpool_forward_impl(const T* x, int n, int h, int w, int c, int k, int stride,
                                                     int pad, int oh, int ow, T* y, u32* arg) {
    u64 total = (u64)n * oh * ow * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        u64 r = i / c;
        int ox = (int)(r % ow);
        r /= ow;
        int oy = (int)(r % oh);
        int b = (int)(r / oh);
        float best = __int_as_float(0xff800000);  // -inf
        u32 where = 0;
        for (int ky = 0; ky < k; ky++) {
            int iy = oy * stride + ky - pad;
            if (iy < 0 || iy >= h) continue;
            for (int kx = 0; kx < k; kx++) {
                int ix = ox * stride + kx - pad;
                if (ix < 0 || ix >= w) continue;
                u64 idx = (((u64)b * h + iy) * w + ix) * c + ch;
                float v = load_elem(x, idx);
                if (v > best || v != v) {
                    best = v;
                    where = (u32)idx;
                }
            }
        }
        store_elem(y, i, best);  // exact: best is one of x's values
        arg[i] = where;
    }
}
#define MAXPOOL_FORWARD(S, T)                                                                           \
    extern "C" __global__ void maxpool_forward_##S(const T* x, int n, int h, int w, int c, int k, int stride, \
                                                   int pad, int oh, int ow, T* y, u32* arg) {           \
        maxpool_forward_impl(x, n, h, w, c, k, stride, pad, oh, ow, y, arg);                            \
    }
FOR_EACH_ELEM(MAXPOOL_FORWARD)

// One thread per input value: gathers the gradients of the windows whose maximum it was, in
// ascending output order (the order in which the CPU twin scatters them), so no atomics and
// the same bits.
template <typename T>
__device__ __forceinline__ void maxpool_backward_impl(const T* dy, const u32* arg, int n, int h, int w, int c, int k,
                                                      int stride, int pad, int oh, int ow, T* dx) {
    u64 total = (u64)n * h * w * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        u64 r = i / c;
        int ix = (int)(r % w);
        r /= w;
        int iy = (int)(r % h);
        int b = (int)(r / h);
        // Output rows whose window [oy*stride - pad, oy*stride - pad + k) holds iy.
        int oy0 = max(0, (iy + pad - k + stride) / stride), oy1 = min(oh - 1, (iy + pad) / stride);
        int ox0 = max(0, (ix + pad - k + stride) / stride), ox1 = min(ow - 1, (ix + pad) / stride);
        float acc = 0.0f;
        for (int oy = oy0; oy <= oy1; oy++)
            for (int ox = ox0; ox <= ox1; ox++) {
                u64 o = (((u64)b * oh + oy) * ow + ox) * c + ch;
                if (arg[o] == (u32)i) acc += load_elem(dy, o);
            }
        store_elem(dx, i, acc);
    }
}
#define MAXPOOL_BACKWARD(S, T)                                                                              \
    extern "C" __global__ void maxpool_backward_##S(const T* dy, const u32* arg, int n, int h, int w, int c, int k, \
                                                    int stride, int pad, int oh, int ow, T* dx) {               \
        maxpool_backward_impl(dy, arg, n, h, w, c, k, stride, pad, oh, ow, dx);                                 \
    }
FOR_EACH_ELEM(MAXPOOL_BACKWARD)

// ---- layouts and the linear layer's bias ----

// [n, c, hw] -> [n, hw, c].
extern "C" __global__ void nchw_to_nhwc_f32(const float* x, int n, int c, int hw, float* y) {
    u64 total = (u64)n * c * hw;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        u64 r = i / c;
        int p = (int)(r % hw);
        u64 b = r / hw;
        y[i] = x[(b * c + ch) * hw + p];
    }
}

// [n, hw, c] -> [n, c, hw].
extern "C" __global__ void nhwc_to_nchw_f32(const float* x, int n, int hw, int c, float* y) {
    u64 total = (u64)n * c * hw;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int p = (int)(i % hw);
        u64 r = i / hw;
        int ch = (int)(r % c);
        u64 b = r / c;
        y[i] = x[(b * hw + p) * c + ch];
    }
}

// y[r, j] = b[j] for every row (the bias a GEMM with beta = 1 then adds to).
extern "C" __global__ void broadcast_rows_f32(const float* b, u64 rows, int c, float* y) {
    u64 total = rows * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x)
        y[i] = b[i % c];
}

// out[j] (+)= sum over rows of x[r, j], in f32 and row order (as the CPU twin), one thread per
// column: the bias gradient of a linear layer.
extern "C" __global__ void column_sums_f32(const float* x, int rows, int c, int accumulate, float* out) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= c) return;
    float acc = 0.0f;
    for (int r = 0; r < rows; r++) acc += x[(u64)r * c + j];
    out[j] = accumulate ? out[j] + acc : acc;
}

// ---- batch norm over [rows, c] ----

// Per channel and per group of rows (blockIdx.y of gridDim.y groups), in f64:
//   mode 0: sum x;  mode 1: sum (x - center)^2;
//   mode 2: sum g and sum g * xhat with g = dy masked by relu_out > 0 (when given) and
//           xhat = (x - mean) * invstd; the second sum goes to partials[.., c + ch].
// Block: 32 channels x 8 row lanes. partials is [groups][width] with width c (modes 0, 1) or 2c.
template <typename T>
__device__ __forceinline__ void bn_partials_impl(const T* x, const T* dy, const T* relu_out, int rows, int c,
                                                 const double* center, const float* mean, const float* invstd,
                                                 int mode, double* partials) {
    __shared__ double s0[8][33];
    __shared__ double s1[8][33];
    int lc = threadIdx.x & 31, lr = threadIdx.x >> 5;
    int ch = blockIdx.x * 32 + lc;
    int groups = gridDim.y;
    int per = (rows + groups - 1) / groups;
    int r0 = blockIdx.y * per, r1 = min(rows, r0 + per);
    double a0 = 0.0, a1 = 0.0;
    if (ch < c) {
        for (int r = r0 + lr; r < r1; r += 8) {
            u64 o = (u64)r * c + ch;
            float v = load_elem(x, o);
            if (mode == 0) {
                a0 += (double)v;
            } else if (mode == 1) {
                double d = (double)v - center[ch];
                a0 += d * d;
            } else {
                float g = (relu_out != 0 && load_elem(relu_out, o) <= 0.0f) ? 0.0f : load_elem(dy, o);
                float xhat = (v - mean[ch]) * invstd[ch];
                a0 += (double)g;
                a1 += (double)g * (double)xhat;
            }
        }
    }
    s0[lr][lc] = a0;
    s1[lr][lc] = a1;
    __syncthreads();
    if (lr == 0 && ch < c) {
        double t0 = 0.0, t1 = 0.0;
        for (int j = 0; j < 8; j++) {
            t0 += s0[j][lc];
            t1 += s1[j][lc];
        }
        int width = mode == 2 ? 2 * c : c;
        partials[(u64)blockIdx.y * width + ch] = t0;
        if (mode == 2) partials[(u64)blockIdx.y * width + c + ch] = t1;
    }
}
#define BN_PARTIALS(S, T)                                                                                   \
    extern "C" __global__ void bn_partials_##S(const T* x, const T* dy, const T* relu_out, int rows, int c, \
                                               const double* center, const float* mean, const float* invstd, \
                                               int mode, double* partials) {                                \
        bn_partials_impl(x, dy, relu_out, rows, c, center, mean, invstd, mode, partials);                   \
    }
FOR_EACH_ELEM(BN_PARTIALS)

// out[i] = sum over groups of partials[g][i], i < width.
extern "C" __global__ void bn_reduce(const double* partials, int groups, int width, double* out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= width) return;
    double acc = 0.0;
    for (int g = 0; g < groups; g++) acc += partials[(u64)g * width + i];
    out[i] = acc;
}

// mean = sum / count (as f64 for the centred pass and f32 for the rest).
extern "C" __global__ void bn_mean(const double* sum, double count, int c, double* mean64, float* mean) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    double m = sum[i] / count;
    mean64[i] = m;
    mean[i] = (float)m;
}

// From the (all-reduced) centred squares: invstd, the folded affine (scale, shift) and the
// running statistics (momentum, unbiased variance), as simclr-nn's BatchNorm.
extern "C" __global__ void bn_finalize(const double* sq, double count, float eps, const float* mean, const float* gamma,
                                       const float* beta, float momentum, int c, float* invstd, float* scale,
                                       float* shift, float* running_mean, float* running_var) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= c) return;
    float var = (float)(sq[i] / count);
    float is = 1.0f / sqrtf(var + eps);
    invstd[i] = is;
    float sc = gamma[i] * is;
    scale[i] = sc;
    shift[i] = beta[i] - mean[i] * sc;
    float unbias = (float)count / (float)(count - 1.0);
    running_mean[i] = (1.0f - momentum) * running_mean[i] + momentum * mean[i];
    running_var[i] = (1.0f - momentum) * running_var[i] + momentum * var * unbias;
}

// y = x * scale + shift per channel, then ReLU when relu != 0.
template <typename T>
__device__ __forceinline__ void bn_apply_impl(const T* x, const float* scale, const float* shift, u64 rows, int c,
                                              int relu, T* y) {
    u64 total = rows * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        float v = load_elem(x, i) * scale[ch] + shift[ch];
        store_elem(y, i, relu ? fmaxf(v, 0.0f) : v);
    }
}
#define BN_APPLY(S, T)                                                                                     \
    extern "C" __global__ void bn_apply_##S(const T* x, const float* scale, const float* shift, u64 rows, \
                                            int c, int relu, T* y) {                                       \
        bn_apply_impl(x, scale, shift, rows, c, relu, y);                                                  \
    }
FOR_EACH_ELEM(BN_APPLY)

// dx = gamma invstd (g - dbeta / count - xhat dgamma / count), from the (all-reduced) sums
// sums = [dbeta | dgamma]; count is the global number of rows.
template <typename T>
__device__ __forceinline__ void bn_backward_apply_impl(const T* x, const T* dy, const T* relu_out, u64 rows, int c,
                                                       const float* mean, const float* invstd, const float* gamma,
                                                       const double* sums, double count, T* dx) {
    u64 total = rows * c;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < total; i += (u64)gridDim.x * blockDim.x) {
        int ch = (int)(i % c);
        float g = (relu_out != 0 && load_elem(relu_out, i) <= 0.0f) ? 0.0f : load_elem(dy, i);
        float xhat = (load_elem(x, i) - mean[ch]) * invstd[ch];
        float mb = (float)(sums[ch] / count);
        float mg = (float)(sums[c + ch] / count);
        store_elem(dx, i, gamma[ch] * invstd[ch] * (g - mb - xhat * mg));
    }
}
#define BN_BACKWARD_APPLY(S, T)                                                                                \
    extern "C" __global__ void bn_backward_apply_##S(const T* x, const T* dy, const T* relu_out, u64 rows,    \
                                                     int c, const float* mean, const float* invstd,           \
                                                     const float* gamma, const double* sums, double count,    \
                                                     T* dx) {                                                 \
        bn_backward_apply_impl(x, dy, relu_out, rows, c, mean, invstd, gamma, sums, count, dx);               \
    }
FOR_EACH_ELEM(BN_BACKWARD_APPLY)

// ---- optimisers ----

// torch.optim.SGD (dampening 0): g += wd p; buf = momentum buf + g; p -= lr (nesterov ? g +
// momentum buf : buf).
extern "C" __global__ void sgd_update(float* p, const float* g, float* buf, u64 n, float lr, float momentum, float wd,
                                      int nesterov) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float gi = g[i] + wd * p[i];
        float b = momentum * buf[i] + gi;
        buf[i] = b;
        p[i] -= lr * (nesterov ? gi + momentum * b : b);
    }
}

// LARS over many tensors in two launches. Tensor k has len[k] elements at p[k], g[k], v[k]
// (device addresses), adapt[k] = 0 for the excluded ones (biases, batch-norm parameters: no
// trust ratio, no weight decay), and owns blocks first[k] .. first[k + 1] of LARS_CHUNK
// elements each.
#define LARS_CHUNK 4096

__device__ __forceinline__ int lars_tensor(const int* first, int tensors, int block) {
    int lo = 0, hi = tensors - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (first[mid] <= block) lo = mid;
        else hi = mid - 1;
    }
    return lo;
}

// partials[2 b] = sum p^2, partials[2 b + 1] = sum (g + wd p)^2 over block b's chunk.
extern "C" __global__ void lars_norms(const u64* pp, const u64* gp, const u64* lens, const int* first, int tensors,
                                      float wd, double* partials) {
    __shared__ double scratch[32];
    int k = lars_tensor(first, tensors, blockIdx.x);
    const float* p = reinterpret_cast<const float*>(pp[k]);
    const float* g = reinterpret_cast<const float*>(gp[k]);
    u64 start = (u64)(blockIdx.x - first[k]) * LARS_CHUNK;
    u64 end = min((u64)lens[k], start + LARS_CHUNK);
    double w2 = 0.0, g2 = 0.0;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        double pv = p[i];
        double d = (double)(g[i] + wd * p[i]);
        w2 += pv * pv;
        g2 += d * d;
    }
    w2 = block_sum_f64(w2, scratch);
    g2 = block_sum_f64(g2, scratch);
    if (threadIdx.x == 0) {
        partials[2 * blockIdx.x] = w2;
        partials[2 * blockIdx.x + 1] = g2;
    }
}

// The trust ratio eta |p| / |g + wd p| (1 where a norm is 0) scales lr for the adapted tensors;
// v = momentum v + lr' (g + wd' p); p -= (nesterov ? momentum v + lr' (g + wd' p) : v).
extern "C" __global__ void lars_update(const u64* pp, const u64* gp, const u64* vp, const u64* lens, const int* first,
                                       const int* adapt, int tensors, const double* partials, float lr, float momentum,
                                       float wd, float eta, int nesterov) {
    __shared__ float slr_s;
    int k = lars_tensor(first, tensors, blockIdx.x);
    float* p = reinterpret_cast<float*>(pp[k]);
    const float* g = reinterpret_cast<const float*>(gp[k]);
    float* v = reinterpret_cast<float*>(vp[k]);
    if (threadIdx.x == 0) {
        float slr = lr;
        if (adapt[k]) {
            double w2 = 0.0, g2 = 0.0;
            for (int b = first[k]; b < first[k + 1]; b++) {
                w2 += partials[2 * b];
                g2 += partials[2 * b + 1];
            }
            double wn = sqrt(w2), gn = sqrt(g2);
            double trust = (wn > 0.0 && gn > 0.0) ? (double)eta * wn / gn : 1.0;
            slr = (float)((double)lr * trust);
        }
        slr_s = slr;
    }
    __syncthreads();
    float slr = slr_s;
    float wdk = adapt[k] ? wd : 0.0f;
    u64 start = (u64)(blockIdx.x - first[k]) * LARS_CHUNK;
    u64 end = min((u64)lens[k], start + LARS_CHUNK);
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float gi = g[i] + wdk * p[i];
        float vi = momentum * v[i] + slr * gi;
        v[i] = vi;
        p[i] -= nesterov ? momentum * vi + slr * gi : vi;
    }
}
