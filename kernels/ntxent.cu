// Fused NT-Xent loss, forward and backward: the GPU twin of simclr_kernels::cpu::ntxent.
//
// z holds M = 2N rows of d values; the positive of row i is its partner in pairs of blocks of
// `half` rows (single GPU: half = N, so pos(i) = (i + N) mod M). With u_i = z_i / max(|z_i|, eps)
// and s_ik = u_i . u_k / tau:  loss_i = -s_{i,pos(i)} + log sum_{k != i} exp(s_ik).
//
// The M x M matrix never exists: blocks of 64 anchor rows sweep the columns in tiles of 64,
// keeping an online log-sum-exp per row (fixed max 1/tau where every exponent is within 80 of
// it, tau >= 0.025, as on the CPU). The backward pass recomputes each tile and uses the
// symmetry of S: the gradient of row t gathers (a_t P_tk + a_k P_kt) u_k, with
// P_kt = exp(s_tk - lse_k), so one sweep over the columns of row t gives its whole gradient,
// including the part that flows through the other anchors' softmax (no scatter, no atomics).
// a_i = 1 for the anchors [a0, a1) this launch owns; a data-parallel replica owns its rows and
// passes the gathered rows of all replicas as columns.
//
// Precision P: 0 = fp32 on CUDA cores, 1 = TF32 tensor cores, 2 = bf16 tensor cores. The rows
// are stored in the product's input format with d padded to a multiple of 32 (zeros).
//
// Launch shape: 128 threads (4 warps of 16 rows) per 64-row block; grid.y splits the columns
// into `splits` ranges whose partial results are merged by a second kernel.

#define NTX_BM 64
#define NTX_BN 64
#define NTX_BK 32
#define NTX_THREADS 128
#define NTX_EPS 1e-12f

template <int P> struct NtxStore { typedef float T; };
template <> struct NtxStore<2> { typedef bf16_t T; };

template <int P> struct NtxPitch { enum { A = NTX_BK + 4, V = NTX_BN + 4 }; };
template <> struct NtxPitch<2> { enum { A = NTX_BK + 8, V = NTX_BN + 8 }; };

__device__ __forceinline__ void ntx_store(float* p, float v) { *p = v; }
__device__ __forceinline__ void ntx_store(bf16_t* p, float v) { *p = f32_to_bf16(v); }
__device__ __forceinline__ float ntx_load(const float* p) { return *p; }
__device__ __forceinline__ float ntx_load(const bf16_t* p) { return bf16_to_f32(*p); }

__device__ __forceinline__ int ntx_partner(int i, int half) {
    int base = i - i % (2 * half);
    return base + (i - base + half) % (2 * half);
}

// One warp per row: norms[i] = |z_i|, u_i = z_i / max(|z_i|, eps), zero-padded to dp.
template <typename T>
__device__ void ntx_normalize(const float* z, int rows, int d, int dp, T* u, float* norms) {
    int row = (int)((blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    const float* zr = z + (u64)row * d;
    // f64, as the CPU: no overflow for huge rows, no flush to zero for tiny ones.
    double ss = 0.0;
    for (int j = lane; j < d; j += 32) ss += (double)zr[j] * (double)zr[j];
    ss = warp_sum_f64(ss);
    float nrm = (float)sqrt(ss);
    float inv = 1.0f / fmaxf(nrm, NTX_EPS);
    for (int j = lane; j < dp; j += 32) ntx_store(u + (u64)row * dp + j, j < d ? zr[j] * inv : 0.0f);
    if (lane == 0) norms[row] = nrm;
}

// Stage rows [row0, row0 + 64) x columns [k0, k0 + BK) of u into dst (pitch NtxPitch<P>::A).
template <int P>
__device__ __forceinline__ void ntx_stage(typename NtxStore<P>::T* dst, const typename NtxStore<P>::T* u,
                                          int row0, int rows, int dp, int k0) {
    typedef typename NtxStore<P>::T T;
    const int EPV = 16 / sizeof(T);
    const int VPR = NTX_BK / EPV;
    for (int v = threadIdx.x; v < NTX_BM * VPR; v += NTX_THREADS) {
        int r = v / VPR, c = (v % VPR) * EPV;
        int gr = row0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (gr < rows) val = *reinterpret_cast<const uint4*>(u + (u64)gr * dp + k0 + c);
        *reinterpret_cast<uint4*>(dst + r * NtxPitch<P>::A + c) = val;
    }
}

// acc += A_w B^T over one staged k-chunk: the warp's 16 rows of As against the 64 rows of Bs.
// acc[nt][0..1] is row g, columns nt*8 + 2t + {0,1}; acc[nt][2..3] is row g + 8.
template <int P>
__device__ __forceinline__ void ntx_chunk(float acc[8][4], const typename NtxStore<P>::T* As,
                                          const typename NtxStore<P>::T* Bs, int warp, int g, int t) {
    const int PA = NtxPitch<P>::A;
    const typename NtxStore<P>::T* a = As + warp * 16 * PA;
    if (P == 2) {
        const bf16_t* ab = reinterpret_cast<const bf16_t*>(a);
        const bf16_t* bb = reinterpret_cast<const bf16_t*>(Bs);
#pragma unroll
        for (int kk = 0; kk < NTX_BK; kk += 16) {
            u32 af[4];
            af[0] = ld_u32(ab + g * PA + kk + 2 * t);
            af[1] = ld_u32(ab + (g + 8) * PA + kk + 2 * t);
            af[2] = ld_u32(ab + g * PA + kk + 8 + 2 * t);
            af[3] = ld_u32(ab + (g + 8) * PA + kk + 8 + 2 * t);
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const bf16_t* b = bb + (nt * 8 + g) * PA + kk;
                u32 bf[2] = {ld_u32(b + 2 * t), ld_u32(b + 8 + 2 * t)};
                mma_bf16_16816(acc[nt], af, bf);
            }
        }
    } else if (P == 1) {
        const float* af32 = reinterpret_cast<const float*>(a);
        const float* bf32 = reinterpret_cast<const float*>(Bs);
#pragma unroll
        for (int kk = 0; kk < NTX_BK; kk += 8) {
            u32 af[4];
            af[0] = to_tf32(af32[g * PA + kk + t]);
            af[1] = to_tf32(af32[(g + 8) * PA + kk + t]);
            af[2] = to_tf32(af32[g * PA + kk + t + 4]);
            af[3] = to_tf32(af32[(g + 8) * PA + kk + t + 4]);
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const float* b = bf32 + (nt * 8 + g) * PA + kk;
                u32 bf[2] = {to_tf32(b[t]), to_tf32(b[t + 4])};
                mma_tf32_1688(acc[nt], af, bf);
            }
        }
    } else {
        const float* af32 = reinterpret_cast<const float*>(a);
        const float* bf32 = reinterpret_cast<const float*>(Bs);
#pragma unroll 4
        for (int k = 0; k < NTX_BK; k++) {
            float a0 = af32[g * PA + k], a1 = af32[(g + 8) * PA + k];
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    float b = bf32[(nt * 8 + 2 * t + j) * PA + k];
                    acc[nt][j] = fmaf(a0, b, acc[nt][j]);
                    acc[nt][2 + j] = fmaf(a1, b, acc[nt][2 + j]);
                }
            }
        }
    }
}

// The warp's 16 x 64 tile of U_rows U_cols^T (unscaled dot products). Ends synchronised.
template <int P>
__device__ __forceinline__ void ntx_tile(float acc[8][4], typename NtxStore<P>::T* As,
                                         typename NtxStore<P>::T* Bs, const typename NtxStore<P>::T* u,
                                         int rows, int dp, int r0, int c0, int warp, int g, int t) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
    for (int k0 = 0; k0 < dp; k0 += NTX_BK) {
        ntx_stage<P>(As, u, r0, rows, dp, k0);
        ntx_stage<P>(Bs, u, c0, rows, dp, k0);
        __syncthreads();
        ntx_chunk<P>(acc, As, Bs, warp, g, t);
        __syncthreads();
    }
}

__device__ __forceinline__ float quad_max(float v) {
    v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 1));
    return fmaxf(v, __shfl_xor_sync(0xffffffffu, v, 2));
}
__device__ __forceinline__ float quad_sum(float v) {
    v += __shfl_xor_sync(0xffffffffu, v, 1);
    return v + __shfl_xor_sync(0xffffffffu, v, 2);
}

// One tile's update of the two rows' online log-sum-exp (running max m, sum l of exp(s - m) over
// k != i) and of the positive's logit sp. acc holds the tile's unscaled dot products in the
// mma accumulator layout; each row's 64 columns are spread over the 4 lanes of a quad.
__device__ __forceinline__ void ntx_update_stats(const float (&acc)[8][4], int c0, int rows, const int (&row)[2],
                                                 const int (&pos)[2], int t, float inv_tau, int fixed_max,
                                                 float (&m)[2], float (&l)[2], float (&sp)[2]) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (!fixed_max) {
            float mt = -SIMCLR_INF;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    int col = c0 + nt * 8 + 2 * t + j;
                    if (col < rows && col != row[h]) mt = fmaxf(mt, acc[nt][2 * h + j] * inv_tau);
                }
            mt = quad_max(mt);
            float mn = fmaxf(m[h], mt);
            if (mn > -SIMCLR_INF) {
                l[h] = m[h] == -SIMCLR_INF ? 0.0f : l[h] * __expf(m[h] - mn);
                m[h] = mn;
            }
        }
#pragma unroll
        for (int nt = 0; nt < 8; nt++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int col = c0 + nt * 8 + 2 * t + j;
                float s = acc[nt][2 * h + j] * inv_tau;
                if (col < rows && col != row[h]) l[h] += __expf(s - m[h]);
                if (col == pos[h]) sp[h] += s;
            }
    }
}

// The quad-reduced partials (m, l, s_pos) of the two rows into part = [m | l | s_pos], each
// gridDim.y x (a1 - a0), at split blockIdx.y.
__device__ __forceinline__ void ntx_write_partials(const int (&row)[2], int a0, int a1, int t, const float (&m)[2],
                                                   const float (&l)[2], const float (&sp)[2], float* part) {
    int na = a1 - a0;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        float lt = quad_sum(l[h]);
        float st = quad_sum(sp[h]);
        if (t == 0 && row[h] < a1) {
            u64 o = (u64)blockIdx.y * na + (row[h] - a0);
            u64 stride = (u64)gridDim.y * na;
            part[o] = m[h];
            part[stride + o] = lt;
            part[2 * stride + o] = st;
        }
    }
}

// The two rows' anchor flags and weights: exp(1/tau - lse_t) with a fixed max (so that
// P_tk = exp(s - 1/tau) * weight), else lse_t; 0 for rows that are not anchors.
__device__ __forceinline__ void ntx_row_weights(const int (&row)[2], int a0, int a1, const float* lse, float inv_tau,
                                                int fixed_max, int (&ar)[2], float (&rw)[2]) {
#pragma unroll
    for (int h = 0; h < 2; h++) {
        ar[h] = row[h] >= a0 && row[h] < a1;
        float L = ar[h] ? lse[row[h] - a0] : 0.0f;
        rw[h] = fixed_max ? (ar[h] ? __expf(inv_tau - L) : 0.0f) : L;
    }
}

// Threads 0..63 stage the tile's column weights: exp(1/tau - lse_k) with a fixed max, else
// lse_k; 0 and a flag of 0 for columns that are not anchors.
__device__ __forceinline__ void ntx_stage_column_weights(int c0, int a0, int a1, const float* lse, float inv_tau,
                                                         int fixed_max, float* colw, int* cola) {
    if (threadIdx.x < NTX_BN) {
        int col = c0 + threadIdx.x;
        int a = col >= a0 && col < a1;
        float L = a ? lse[col - a0] : 0.0f;
        colw[threadIdx.x] = fixed_max ? (a ? __expf(inv_tau - L) : 0.0f) : L;
        cola[threadIdx.x] = a;
    }
}

// Replaces the tile's dot products in acc by the gradient coefficients
// c_tk = a_t P_tk + a_k P_kt - (a_t + a_k) [k = pos(t)] (0 for k = t and padding).
__device__ __forceinline__ void ntx_coefficients(float (&acc)[8][4], int c0, int rows, const int (&row)[2],
                                                 const int (&pos)[2], const int (&ar)[2], const float (&rw)[2],
                                                 const float* colw, const int* cola, int t, float inv_tau,
                                                 int fixed_max) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++)
#pragma unroll
        for (int j = 0; j < 2; j++) {
            int cl = nt * 8 + 2 * t + j;
            int col = c0 + cl;
            float cw = colw[cl];
            int ac = cola[cl];
#pragma unroll
            for (int h = 0; h < 2; h++) {
                float s = acc[nt][2 * h + j] * inv_tau;
                float c = 0.0f;
                if (col < rows && col != row[h] && row[h] < rows) {
                    if (fixed_max) {
                        c = __expf(s - inv_tau) * (rw[h] + cw);
                    } else {
                        c = (ar[h] ? __expf(s - rw[h]) : 0.0f) + (ac ? __expf(s - cw) : 0.0f);
                    }
                    if (col == pos[h]) c -= (float)(ar[h] + ac);
                }
                acc[nt][2 * h + j] = c;
            }
        }
}

// Forward partials: for anchor rows [a0, a1) and the column tiles of split blockIdx.y, the
// running max m, the sum l of exp(s - m) over k != i, and the positive's logit. part holds
// 3 x splits x (a1 - a0) floats: [m | l | s_pos].
template <int P>
__device__ void ntx_forward(const typename NtxStore<P>::T* u, int rows, int dp, int a0, int a1, int half,
                            float inv_tau, int fixed_max, int tiles_per_split, float* part) {
    typedef typename NtxStore<P>::T T;
    __shared__ __align__(16) T As[NTX_BM * NtxPitch<P>::A];
    __shared__ __align__(16) T Bs[NTX_BN * NtxPitch<P>::A];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = a0 + blockIdx.x * NTX_BM;
    int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
    int pos[2] = {ntx_partner(row[0], half), ntx_partner(row[1], half)};
    float m[2], l[2] = {0.0f, 0.0f}, sp[2] = {0.0f, 0.0f};
    m[0] = m[1] = fixed_max ? inv_tau : -SIMCLR_INF;
    int n_tiles = (rows + NTX_BN - 1) / NTX_BN;
    int tile0 = blockIdx.y * tiles_per_split;
    int tile1 = min(n_tiles, tile0 + tiles_per_split);
    float acc[8][4];
    for (int tile = tile0; tile < tile1; tile++) {
        int c0 = tile * NTX_BN;
        ntx_tile<P>(acc, As, Bs, u, rows, dp, r0, c0, warp, g, t);
        ntx_update_stats(acc, c0, rows, row, pos, t, inv_tau, fixed_max, m, l, sp);
    }
    ntx_write_partials(row, a0, a1, t, m, l, sp, part);
}

// Merge the splits' partials: lse and loss of each anchor row, in split order.
__device__ void ntx_merge(const float* part, int na, int splits, float* lse, float* loss) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= na) return;
    u64 stride = (u64)splits * na;
    float m = -SIMCLR_INF;
    for (int s = 0; s < splits; s++) m = fmaxf(m, part[(u64)s * na + i]);
    float l = 0.0f, sp = 0.0f;
    for (int s = 0; s < splits; s++) {
        float ms = part[(u64)s * na + i];
        if (ms > -SIMCLR_INF) l += part[stride + (u64)s * na + i] * __expf(ms - m);
        sp += part[2 * stride + (u64)s * na + i];
    }
    float L = m + logf(l);
    lse[i] = L;
    loss[i] = L - sp;
}

// Backward: for target rows [t0, t1), the d-columns [dc0, dc0 + DC) of blockIdx.y % dsplits and
// the column tiles of split blockIdx.y / dsplits, gu = scale * sum_k c_tk u_k with
// c_tk = a_t P_tk + a_k P_kt - (a_t + a_k) [k = pos(t)], over k != t. Written to
// gu[split][t - t0][dp] (the splits are summed by ntx_finish).
template <int P, int DC>
__device__ void ntx_backward(const typename NtxStore<P>::T* u, int rows, int dp, int a0, int a1, const float* lse,
                             int half, float inv_tau, int fixed_max, float scale, int t0, int t1, int dsplits,
                             int tiles_per_split, float* gu) {
    typedef typename NtxStore<P>::T T;
    const int PV = NtxPitch<P>::V;
    // As and Bs hold the k-chunks of the S tile; in fp32 mode they are reused for the C tile.
    __shared__ __align__(16) unsigned char ab_raw[(2 * NTX_BM * NtxPitch<P>::A * sizeof(T) > NTX_BM * (NTX_BN + 4) * 4)
                                                      ? 2 * NTX_BM * NtxPitch<P>::A * sizeof(T)
                                                      : NTX_BM * (NTX_BN + 4) * 4];
    __shared__ __align__(16) T Vt[DC * PV];
    __shared__ float colw[NTX_BN];
    __shared__ int cola[NTX_BN];
    T* As = reinterpret_cast<T*>(ab_raw);
    T* Bs = As + NTX_BM * NtxPitch<P>::A;
    float* Cs = reinterpret_cast<float*>(ab_raw);

    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = t0 + blockIdx.x * NTX_BM;
    int dc0 = (blockIdx.y % dsplits) * DC;
    int split = blockIdx.y / dsplits;
    int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
    int pos[2] = {ntx_partner(row[0], half), ntx_partner(row[1], half)};
    int ar[2];
    float rw[2];
    ntx_row_weights(row, a0, a1, lse, inv_tau, fixed_max, ar, rw);
    bool rows_any = r0 < a1 && r0 + NTX_BM > a0;

    float out[DC / 8][4];
#pragma unroll
    for (int nd = 0; nd < DC / 8; nd++) out[nd][0] = out[nd][1] = out[nd][2] = out[nd][3] = 0.0f;

    int n_tiles = (rows + NTX_BN - 1) / NTX_BN;
    int tile0 = split * tiles_per_split;
    int tile1 = min(n_tiles, tile0 + tiles_per_split);
    float acc[8][4];
    for (int tile = tile0; tile < tile1; tile++) {
        int c0 = tile * NTX_BN;
        bool cols_any = c0 < a1 && c0 + NTX_BN > a0;
        if (!rows_any && !cols_any) continue;
        ntx_tile<P>(acc, As, Bs, u, rows, dp, r0, c0, warp, g, t);
        // Column weights and the transposed value tile V^T[dd][c] = u[c0 + c][dc0 + dd].
        ntx_stage_column_weights(c0, a0, a1, lse, inv_tau, fixed_max, colw, cola);
        for (int idx = threadIdx.x; idx < NTX_BN * DC; idx += NTX_THREADS) {
            int r = idx / DC, dd = idx % DC;
            int gr = c0 + r, gd = dc0 + dd;
            T v = (T)0;
            if (gr < rows && gd < dp) v = u[(u64)gr * dp + gd];
            Vt[dd * PV + r] = v;
        }
        __syncthreads();
        ntx_coefficients(acc, c0, rows, row, pos, ar, rw, colw, cola, t, inv_tau, fixed_max);
        // out += C V over the tile's 64 columns.
        if (P == 2) {
            const bf16_t* vb = reinterpret_cast<const bf16_t*>(Vt);
#pragma unroll
            for (int kk = 0; kk < NTX_BN; kk += 16) {
                int nt = kk / 8;
                u32 af[4];
                af[0] = pack_bf16x2(acc[nt][0], acc[nt][1]);
                af[1] = pack_bf16x2(acc[nt][2], acc[nt][3]);
                af[2] = pack_bf16x2(acc[nt + 1][0], acc[nt + 1][1]);
                af[3] = pack_bf16x2(acc[nt + 1][2], acc[nt + 1][3]);
#pragma unroll
                for (int nd = 0; nd < DC / 8; nd++) {
                    const bf16_t* b = vb + (nd * 8 + g) * PV + kk;
                    u32 bf[2] = {ld_u32(b + 2 * t), ld_u32(b + 8 + 2 * t)};
                    mma_bf16_16816(out[nd], af, bf);
                }
            }
        } else if (P == 1) {
            const float* vf = reinterpret_cast<const float*>(Vt);
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                // The k index of this 8-wide step is permuted (logical t <-> column 2t,
                // logical t + 4 <-> column 2t + 1) so the accumulator is the A fragment.
                u32 af[4] = {to_tf32(acc[nt][0]), to_tf32(acc[nt][2]), to_tf32(acc[nt][1]), to_tf32(acc[nt][3])};
#pragma unroll
                for (int nd = 0; nd < DC / 8; nd++) {
                    const float* b = vf + (nd * 8 + g) * PV + nt * 8 + 2 * t;
                    u32 bf[2] = {to_tf32(b[0]), to_tf32(b[1])};
                    mma_tf32_1688(out[nd], af, bf);
                }
            }
        } else {
            const int PC = NTX_BN + 4;
            float* cw = Cs + warp * 16 * PC;
#pragma unroll
            for (int nt = 0; nt < 8; nt++)
#pragma unroll
                for (int j = 0; j < 2; j++) {
                    cw[g * PC + nt * 8 + 2 * t + j] = acc[nt][j];
                    cw[(g + 8) * PC + nt * 8 + 2 * t + j] = acc[nt][2 + j];
                }
            __syncwarp();
            const float* vf = reinterpret_cast<const float*>(Vt);
            for (int c = 0; c < NTX_BN; c++) {
                float c0v = cw[g * PC + c], c1v = cw[(g + 8) * PC + c];
#pragma unroll
                for (int nd = 0; nd < DC / 8; nd++)
#pragma unroll
                    for (int j = 0; j < 2; j++) {
                        float v = vf[(nd * 8 + 2 * t + j) * PV + c];
                        out[nd][j] = fmaf(c0v, v, out[nd][j]);
                        out[nd][2 + j] = fmaf(c1v, v, out[nd][2 + j]);
                    }
            }
        }
        __syncthreads();
    }
    int nt_rows = t1 - t0;
    float* gs = gu + (u64)split * nt_rows * dp;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (row[h] >= t1) continue;
        float* gr = gs + (u64)(row[h] - t0) * dp;
#pragma unroll
        for (int nd = 0; nd < DC / 8; nd++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int dd = dc0 + nd * 8 + 2 * t + j;
                if (dd < dp) gr[dd] = out[nd][2 * h + j] * scale;
            }
    }
}

// dz for target rows [t0, t1): the splits' gu summed, then the chain rule through the
// normalisation: (g - u (u . g)) / |z| (g / eps where |z| < eps). One warp per row.
__device__ void ntx_finish(const float* z, const float* norms, const float* gu, int t0, int t1, int d, int dp,
                           int splits, float* dz) {
    int r = (int)((blockIdx.x * (u64)blockDim.x + threadIdx.x) >> 5);
    int lane = threadIdx.x & 31;
    int nt_rows = t1 - t0;
    if (r >= nt_rows) return;
    int row = t0 + r;
    const float* zr = z + (u64)row * d;
    float nrm = norms[row];
    double dot = 0.0;
    for (int j = lane; j < d; j += 32) {
        float gsum = 0.0f;
        for (int s = 0; s < splits; s++) gsum += gu[((u64)s * nt_rows + r) * dp + j];
        dot += (double)zr[j] * (double)gsum;
    }
    dot = warp_sum_f64(dot);
    float* out = dz + (u64)row * d;
    for (int j = lane; j < d; j += 32) {
        float gsum = 0.0f;
        for (int s = 0; s < splits; s++) gsum += gu[((u64)s * nt_rows + r) * dp + j];
        if (nrm >= NTX_EPS) {
            float inv = 1.0f / nrm;
            // u . g = (z . g) / |z|
            out[j] = (gsum - zr[j] * inv * (float)(dot * (double)inv)) * inv;
        } else {
            out[j] = gsum / NTX_EPS;
        }
    }
}

// total[0] = scale * sum of x[0..n), summed in a fixed order by one block.
__device__ void ntx_sum(const float* x, int n, float scale, float* total) {
    __shared__ double scratch[32];
    double acc = 0.0;
    for (int i = threadIdx.x; i < n; i += blockDim.x) acc += (double)x[i];
    acc = block_sum_f64(acc, scratch);
    if (threadIdx.x == 0) total[0] = (float)(acc * (double)scale);
}

extern "C" __global__ void ntxent_normalize_f32(const float* z, int rows, int d, int dp, float* u, float* norms) {
    ntx_normalize<float>(z, rows, d, dp, u, norms);
}
extern "C" __global__ void ntxent_normalize_bf16(const float* z, int rows, int d, int dp, bf16_t* u, float* norms) {
    ntx_normalize<bf16_t>(z, rows, d, dp, u, norms);
}

#define NTX_FWD(NAME, P)                                                                                        \
    extern "C" __global__ void __launch_bounds__(NTX_THREADS)                                                   \
        NAME(const NtxStore<P>::T* u, int rows, int dp, int a0, int a1, int half, float inv_tau, int fixed_max, \
             int tiles_per_split, float* part) {                                                                \
        ntx_forward<P>(u, rows, dp, a0, a1, half, inv_tau, fixed_max, tiles_per_split, part);                   \
    }
NTX_FWD(ntxent_forward_f32, 0)
NTX_FWD(ntxent_forward_tf32, 1)
NTX_FWD(ntxent_forward_bf16, 2)

#define NTX_BWD(NAME, P, DC)                                                                                       \
    extern "C" __global__ void __launch_bounds__(NTX_THREADS)                                                      \
        NAME(const NtxStore<P>::T* u, int rows, int dp, int a0, int a1, const float* lse, int half, float inv_tau, \
             int fixed_max, float scale, int t0, int t1, int dsplits, int tiles_per_split, float* gu) {            \
        ntx_backward<P, DC>(u, rows, dp, a0, a1, lse, half, inv_tau, fixed_max, scale, t0, t1, dsplits,            \
                            tiles_per_split, gu);                                                                  \
    }
NTX_BWD(ntxent_backward_f32, 0, 64)
NTX_BWD(ntxent_backward_tf32, 1, 64)
NTX_BWD(ntxent_backward_bf16, 2, 128)


// ---- bf16 with d <= 128: the fast path ----
//
// The warp's 16 anchor rows stay in registers as mma A fragments for the whole sweep (dp / 16 <= 8
// k-steps of 4 registers), each column tile is staged once (64 rows x dp), and the backward pass
// reads V from that same tile (no transposed copy): per tile one staging and two barriers.

#define NTX_FP 136  // pitch of a staged 64 x 128 bf16 tile (16-byte rows, conflict-free fragments)

// Stage rows [row0, row0 + 64) x [0, dp) of u into dst (pitch NTX_FP); zero rows past `rows`.
__device__ __forceinline__ void ntx_stage_full(bf16_t* dst, const bf16_t* u, int row0, int rows, int dp) {
    int vpr = dp / 8;
    for (int v = threadIdx.x; v < NTX_BN * vpr; v += NTX_THREADS) {
        int r = v / vpr, c = (v % vpr) * 8;
        int gr = row0 + r;
        uint4 val = make_uint4(0u, 0u, 0u, 0u);
        if (gr < rows) val = *reinterpret_cast<const uint4*>(u + (u64)gr * dp + c);
        *reinterpret_cast<uint4*>(dst + r * NTX_FP + c) = val;
    }
}

// The warp's A fragments of rows [r0 + 16 warp, +16) for k-steps 0..dp/16, via the staged tile.
__device__ __forceinline__ void ntx_load_a(u32 af[8][4], bf16_t* Ts, const bf16_t* u, int rows, int dp, int r0,
                                           int warp, int g, int t) {
    ntx_stage_full(Ts, u, r0, rows, dp);
    __syncthreads();
    const bf16_t* a = Ts + warp * 16 * NTX_FP;
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
        if (ks * 16 < dp) {
            int kk = ks * 16;
            af[ks][0] = ld_u32(a + g * NTX_FP + kk + 2 * t);
            af[ks][1] = ld_u32(a + (g + 8) * NTX_FP + kk + 2 * t);
            af[ks][2] = ld_u32(a + g * NTX_FP + kk + 8 + 2 * t);
            af[ks][3] = ld_u32(a + (g + 8) * NTX_FP + kk + 8 + 2 * t);
        } else {
            af[ks][0] = af[ks][1] = af[ks][2] = af[ks][3] = 0u;
        }
    }
    __syncthreads();
}

// acc = A_w B^T for the staged column tile Bs (pitch NTX_FP).
__device__ __forceinline__ void ntx_tile_regs(float acc[8][4], const u32 af[8][4], const bf16_t* Bs, int dp, int g,
                                              int t) {
#pragma unroll
    for (int nt = 0; nt < 8; nt++) acc[nt][0] = acc[nt][1] = acc[nt][2] = acc[nt][3] = 0.0f;
#pragma unroll
    for (int ks = 0; ks < 8; ks++) {
        if (ks * 16 < dp) {
#pragma unroll
            for (int nt = 0; nt < 8; nt++) {
                const bf16_t* b = Bs + (nt * 8 + g) * NTX_FP + ks * 16;
                u32 bf[2] = {ld_u32(b + 2 * t), ld_u32(b + 8 + 2 * t)};
                mma_bf16_16816(acc[nt], af[ks], bf);
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(NTX_THREADS)
    ntxent_forward_bf16_d128(const bf16_t* u, int rows, int dp, int a0, int a1, int half, float inv_tau,
                             int fixed_max, int tiles_per_split, float* part) {
    __shared__ __align__(16) bf16_t Bs[NTX_BN * NTX_FP];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = a0 + blockIdx.x * NTX_BM;
    int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
    int pos[2] = {ntx_partner(row[0], half), ntx_partner(row[1], half)};
    u32 af[8][4];
    ntx_load_a(af, Bs, u, rows, dp, r0, warp, g, t);
    float m[2], l[2] = {0.0f, 0.0f}, sp[2] = {0.0f, 0.0f};
    m[0] = m[1] = fixed_max ? inv_tau : -SIMCLR_INF;
    int n_tiles = (rows + NTX_BN - 1) / NTX_BN;
    int tile0 = blockIdx.y * tiles_per_split;
    int tile1 = min(n_tiles, tile0 + tiles_per_split);
    float acc[8][4];
    for (int tile = tile0; tile < tile1; tile++) {
        int c0 = tile * NTX_BN;
        ntx_stage_full(Bs, u, c0, rows, dp);
        __syncthreads();
        ntx_tile_regs(acc, af, Bs, dp, g, t);
        __syncthreads();
        ntx_update_stats(acc, c0, rows, row, pos, t, inv_tau, fixed_max, m, l, sp);
    }
    ntx_write_partials(row, a0, a1, t, m, l, sp, part);
}

// The backward pass of the fast path: as ntx_backward with DC = dp (one d-split), V taken from
// the staged column tile: each register of the B fragment {V[2t][g], V[2t+1][g]} of C V is built from
// two 16-bit loads of consecutive tile rows.
extern "C" __global__ void __launch_bounds__(NTX_THREADS)
    ntxent_backward_bf16_d128(const bf16_t* u, int rows, int dp, int a0, int a1, const float* lse, int half,
                              float inv_tau, int fixed_max, float scale, int t0, int t1, int dsplits,
                              int tiles_per_split, float* gu) {
    __shared__ __align__(16) bf16_t Bs[NTX_BN * NTX_FP];
    __shared__ float colw[NTX_BN];
    __shared__ int cola[NTX_BN];
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, g = lane >> 2, t = lane & 3;
    int r0 = t0 + blockIdx.x * NTX_BM;
    int split = blockIdx.y / dsplits;
    int row[2] = {r0 + warp * 16 + g, r0 + warp * 16 + g + 8};
    int pos[2] = {ntx_partner(row[0], half), ntx_partner(row[1], half)};
    int ar[2];
    float rw[2];
    ntx_row_weights(row, a0, a1, lse, inv_tau, fixed_max, ar, rw);
    bool rows_any = r0 < a1 && r0 + NTX_BM > a0;
    u32 af[8][4];
    ntx_load_a(af, Bs, u, rows, dp, r0, warp, g, t);

    float out[16][4];
#pragma unroll
    for (int nd = 0; nd < 16; nd++) out[nd][0] = out[nd][1] = out[nd][2] = out[nd][3] = 0.0f;

    int n_tiles = (rows + NTX_BN - 1) / NTX_BN;
    int tile0 = split * tiles_per_split;
    int tile1 = min(n_tiles, tile0 + tiles_per_split);
    float acc[8][4];
    for (int tile = tile0; tile < tile1; tile++) {
        int c0 = tile * NTX_BN;
        bool cols_any = c0 < a1 && c0 + NTX_BN > a0;
        if (!rows_any && !cols_any) continue;
        ntx_stage_full(Bs, u, c0, rows, dp);
        ntx_stage_column_weights(c0, a0, a1, lse, inv_tau, fixed_max, colw, cola);
        __syncthreads();
        ntx_tile_regs(acc, af, Bs, dp, g, t);
        ntx_coefficients(acc, c0, rows, row, pos, ar, rw, colw, cola, t, inv_tau, fixed_max);
        // out += C V, V[k][n] = tile row k, column n.
#pragma unroll
        for (int kk = 0; kk < NTX_BN; kk += 16) {
            int nt = kk / 8;
            u32 a4[4];
            a4[0] = pack_bf16x2(acc[nt][0], acc[nt][1]);
            a4[1] = pack_bf16x2(acc[nt][2], acc[nt][3]);
            a4[2] = pack_bf16x2(acc[nt + 1][0], acc[nt + 1][1]);
            a4[3] = pack_bf16x2(acc[nt + 1][2], acc[nt + 1][3]);
            const bf16_t* v0 = Bs + (kk + 2 * t) * NTX_FP + g;
#pragma unroll
            for (int nd = 0; nd < 16; nd++) {
                if (nd * 8 < dp) {
                    const bf16_t* v = v0 + nd * 8;
                    u32 bf[2] = {(u32)v[0] | ((u32)v[NTX_FP] << 16),
                                 (u32)v[8 * NTX_FP] | ((u32)v[9 * NTX_FP] << 16)};
                    mma_bf16_16816(out[nd], a4, bf);
                }
            }
        }
        __syncthreads();
    }
    int nt_rows = t1 - t0;
    float* gs = gu + (u64)split * nt_rows * dp;
#pragma unroll
    for (int h = 0; h < 2; h++) {
        if (row[h] >= t1) continue;
        float* gr = gs + (u64)(row[h] - t0) * dp;
#pragma unroll
        for (int nd = 0; nd < 16; nd++)
#pragma unroll
            for (int j = 0; j < 2; j++) {
                int dd = nd * 8 + 2 * t + j;
                if (dd < dp) gr[dd] = out[nd][2 * h + j] * scale;
            }
    }
}

extern "C" __global__ void ntxent_merge(const float* part, int na, int splits, float* lse, float* loss) {
    ntx_merge(part, na, splits, lse, loss);
}
extern "C" __global__ void ntxent_finish(const float* z, const float* norms, const float* gu, int t0, int t1, int d,
                                         int dp, int splits, float* dz) {
    ntx_finish(z, norms, gu, t0, t1, d, dp, splits, dz);
}
extern "C" __global__ void ntxent_sum(const float* x, int n, float scale, float* total) { ntx_sum(x, n, scale, total); }
