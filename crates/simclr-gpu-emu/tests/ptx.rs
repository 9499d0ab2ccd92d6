//! Tests of `src/runtime/emu_ptx.h`, the emulated inline-PTX instructions.
//!
//! A C++ harness (below) is compiled at test time with the host compiler (`$CXX`, else `c++`,
//! `-std=c++17`) against emu_ptx.h alone, with minimal stand-ins for the runtime's `EmuOperand`,
//! `__emu_warp_collective`, `__emu_lane_id` and `__emu_trap`. Each Rust test runs one group of the
//! harness; the harness prints `PASS <group>` or the first mismatches and `FAIL <group>`, and
//! exits non-zero on failure.
//!
//! The harness writes the PTX ISA's fragment layouts out again, independently of the header, in
//! the case-by-case form of the ISA's tables (PTX ISA 9.7.14.5.6 "Matrix Fragments for
//! mma.m16n8k4", 9.7.14.5.7 "... mma.m16n8k8", 9.7.14.5.8 "... mma.m16n8k16 with floating point
//! type"), builds each lane's fragments from random A, B, C with them, runs the header's compute,
//! and compares every D element with a plain f64 matrix product.
//!
//! `end_to_end_mma_through_compile_and_emu_launch` goes through the whole emulator: a CUDA kernel
//! with inline `asm volatile("mma.sync...")`, compiled by `simclr_gpu_emu::compile::compile`,
//! dlopen'd and run with `emu_launch` on one warp.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

const HARNESS: &str = r#####"
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <cmath>
#include <random>
#include <string>
#include <thread>
#include <vector>

// ---- Stand-ins for what emu_runtime.h declares before including emu_ptx.h. ----
struct EmuOperand { char mod; char letter; void* ptr; unsigned long long bits; };
static unsigned g_lane = 0;
unsigned __emu_lane_id() { return g_lane; }
[[noreturn]] void __emu_trap(const char* why) { std::fprintf(stderr, "trap: %s\n", why); std::exit(3); }
void __emu_warp_collective(unsigned mask, const void* in, void* out,
                           void (*compute)(const void* const*, void* const*, unsigned, void*),
                           void* ctx, const char* what);

#include "emu_ptx.h"

// The stand-in collective runs a warp as two sequential passes over the lanes: pass 0 collects
// every lane's input and, at lane 31, runs compute; pass 1 hands each lane its output. It is only
// used for mma, so the buffers are EmuMmaLane / EmuMmaOut.
static int g_pass = 0;
static EmuMmaLane g_in[32];
static EmuMmaOut g_out[32];
static std::string g_what;
void __emu_warp_collective(unsigned mask, const void* in, void* out,
                           void (*compute)(const void* const*, void* const*, unsigned, void*),
                           void* ctx, const char* what) {
  g_what = what;
  if (g_pass == 0) {
    std::memcpy(&g_in[g_lane], in, sizeof(EmuMmaLane));
    std::memset(out, 0, sizeof(EmuMmaOut));
    if (g_lane == 31) {
      const void* ins[32];
      void* outs[32];
      for (int l = 0; l < 32; ++l) { ins[l] = &g_in[l]; outs[l] = &g_out[l]; }
      compute(ins, outs, mask, ctx);
    }
  } else {
    std::memcpy(out, &g_out[g_lane], sizeof(EmuMmaOut));
  }
}

static int g_failures = 0;
#define CHECK(cond, ...) do { if (!(cond)) { if (g_failures < 20) { std::printf("  mismatch: " __VA_ARGS__); std::printf("\n"); } ++g_failures; } } while (0)

static uint32_t f2b(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
static float b2f(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }

// ---- The ISA's fragment layouts, transcribed case by case from the tables. ----
// groupID = %laneid >> 2, threadID_in_group = %laneid % 4.
struct RC { int row, col; };
enum Frag { FA, FB, FC };
// Shapes: 0 m16n8k16 f16/bf16, 1 m16n8k8 f16/bf16, 2 m16n8k8 tf32, 3 m16n8k4 tf32.
static RC isa_layout(int shape, Frag f, int lane, int i) {
  const int groupID = lane >> 2, tig = lane % 4;
  if (f == FC) {
    // All four shapes (.f32 accumulators): "row = groupID for c0 and c1, groupID + 8 for c2 and
    // c3; col = (threadID_in_group * 2) + (i & 0x1) for ci where i = {0,..,3}".
    int row = (i == 0 || i == 1) ? groupID : groupID + 8;
    return {row, tig * 2 + (i & 0x1)};
  }
  switch (shape) {
    case 0:  // 9.7.14.5.8
      if (f == FA) {
        // "row = groupID for ai where 0 <= i < 2 || 4 <= i < 6, groupID + 8 Otherwise;
        //  col = (threadID_in_group * 2) + (i & 0x1) for ai where i < 4,
        //        (threadID_in_group * 2) + (i & 0x1) + 8 for ai where i >= 4"
        int row = ((0 <= i && i < 2) || (4 <= i && i < 6)) ? groupID : groupID + 8;
        int col = i < 4 ? tig * 2 + (i & 0x1) : tig * 2 + (i & 0x1) + 8;
        return {row, col};
      } else {
        // "row = (threadID_in_group * 2) + (i & 0x1) for bi where i < 2, ... + 8 for i >= 2;
        //  col = groupID"
        int row = i < 2 ? tig * 2 + (i & 0x1) : tig * 2 + (i & 0x1) + 8;
        return {row, groupID};
      }
    case 1:  // 9.7.14.5.7, .f16/.bf16
      if (f == FA) {
        // "row = groupID for a0 and a1, groupID + 8 for a2 and a3;
        //  col = threadID_in_group * 2 + (i & 0x1) for ai where i = {0,..,3}"
        int row = (i == 0 || i == 1) ? groupID : groupID + 8;
        return {row, tig * 2 + (i & 0x1)};
      } else {
        // "row = (threadID_in_group * 2) + i for bi where i = {0, 1}; col = groupID"
        return {tig * 2 + i, groupID};
      }
    case 2:  // 9.7.14.5.7, .tf32
      if (f == FA) {
        // "row = groupID for a0 and a2, groupID + 8 for a1 and a3;
        //  col = threadID_in_group for a0 and a1, threadID_in_group + 4 for a2 and a3"
        int row = (i == 0 || i == 2) ? groupID : groupID + 8;
        int col = (i == 0 || i == 1) ? tig : tig + 4;
        return {row, col};
      } else {
        // "row = threadID_in_group for b0, threadID_in_group + 4 for b1; col = groupID"
        return {i == 0 ? tig : tig + 4, groupID};
      }
    default:  // 3: 9.7.14.5.6, .tf32
      if (f == FA) {
        // "row = groupID for a0, groupID + 8 for a1; col = threadID_in_group"
        return {i == 0 ? groupID : groupID + 8, tig};
      } else {
        // "row = threadID_in_group; col = groupID"
        return {tig, groupID};
      }
  }
}

struct Case {
  const char* group;
  int layout_shape;   // index for isa_layout
  int K;
  int type;           // 0 bf16, 1 f16, 2 tf32
  void (*compute)(const EmuMmaLane*, EmuMmaOut*);
  EmuRC (*a_rc)(int, int);
  EmuRC (*b_rc)(int, int);
  const char* tmpl;   // the instruction as a kernel's asm would write it (d and c share %0..%3)
};

static const Case kCases[] = {
  {"mma_m16n8k16_bf16", 0, 16, 0, __emu_mma_m16n8k16_bf16_compute, __emu_mma_m16n8k16_f16_a_rc,
   __emu_mma_m16n8k16_f16_b_rc,
   "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"},
  {"mma_m16n8k16_f16", 0, 16, 1, __emu_mma_m16n8k16_f16_compute, __emu_mma_m16n8k16_f16_a_rc,
   __emu_mma_m16n8k16_f16_b_rc,
   "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32\n\t{%0, %1, %2, %3},\n\t{%4, %5, %6, %7},\n\t{%8, %9},\n\t{%0, %1, %2, %3};\n"},
  {"mma_m16n8k8_bf16", 1, 8, 0, __emu_mma_m16n8k8_bf16_compute, __emu_mma_m16n8k8_f16_a_rc,
   __emu_mma_m16n8k8_f16_b_rc,
   "mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"},
  {"mma_m16n8k8_f16", 1, 8, 1, __emu_mma_m16n8k8_f16_compute, __emu_mma_m16n8k8_f16_a_rc,
   __emu_mma_m16n8k8_f16_b_rc,
   "mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"},
  {"mma_m16n8k8_tf32", 2, 8, 2, __emu_mma_m16n8k8_tf32_compute, __emu_mma_m16n8k8_tf32_a_rc,
   __emu_mma_m16n8k8_tf32_b_rc,
   "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"},
  {"mma_m16n8k4_tf32", 3, 4, 2, __emu_mma_m16n8k4_tf32_compute, __emu_mma_m16n8k4_tf32_a_rc,
   __emu_mma_m16n8k4_tf32_b_rc,
   "mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 {%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"},
};

// A random element of the operand type, as (register bits of the element, exact value).
// tf32 elements are sometimes raw f32 bits (low 13 bits set): the emulator must use the
// truncated value, as the mma operand rule says.
static std::mt19937_64 rng(12345);
static double rand_elem(int type, uint32_t* bits) {
  std::uniform_real_distribution<float> u(-4.0f, 4.0f);
  float f = u(rng);
  if (rng() % 16 == 0) f = 0.0f;
  if (type == 0) {  // bf16: the high half of an f32
    uint16_t h = (uint16_t)(f2b(f) >> 16);
    *bits = h;
    return (double)b2f((uint32_t)h << 16);
  }
  if (type == 1) {  // f16: build from fields; exponent range [-14, 2], some subnormals
    int s = rng() & 1, e = (int)(rng() % 18), m = (int)(rng() % 1024);
    uint16_t h = (uint16_t)((s << 15) | (e << 10) | m);
    *bits = h;
    double v = e == 0 ? std::ldexp((double)m, -24) : std::ldexp((double)(m | 1024), e - 25);
    return s ? -v : v;
  }
  uint32_t b = f2b(f);
  *bits = b;
  return (double)b2f(b & 0xffffe000u);
}

// Runs one case: builds fragments with the ISA layouts, calls compute (directly, or through
// __emu_ptx_exec with the template when via_exec), compares with an f64 product.
static void run_mma_case(const Case& c, int trials, bool via_exec) {
  const int K = c.K;
  const int a_per_lane = 16 * K / 32, b_per_lane = K * 8 / 32;
  const int per_reg = c.type == 2 ? 1 : 2;
  for (int trial = 0; trial < trials; ++trial) {
    double A[16][16] = {}, B[16][8] = {}, C[16][8] = {};
    EmuMmaLane lanes[32];
    std::memset(lanes, 0, sizeof(lanes));
    uint32_t abits[16][16], bbits[16][8];
    for (int r = 0; r < 16; ++r) for (int k = 0; k < K; ++k) A[r][k] = rand_elem(c.type, &abits[r][k]);
    for (int k = 0; k < K; ++k) for (int n = 0; n < 8; ++n) B[k][n] = rand_elem(c.type, &bbits[k][n]);
    std::uniform_real_distribution<float> uc(-8.0f, 8.0f);
    for (int r = 0; r < 16; ++r) for (int n = 0; n < 8; ++n) C[r][n] = (double)uc(rng);
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < a_per_lane; ++i) {
        RC p = isa_layout(c.layout_shape, FA, lane, i);
        lanes[lane].a[i / per_reg] |= abits[p.row][p.col] << (per_reg == 2 ? 16 * (i % 2) : 0);
      }
      for (int i = 0; i < b_per_lane; ++i) {
        RC p = isa_layout(c.layout_shape, FB, lane, i);
        lanes[lane].b[i / per_reg] |= bbits[p.row][p.col] << (per_reg == 2 ? 16 * (i % 2) : 0);
      }
      for (int i = 0; i < 4; ++i) {
        RC p = isa_layout(c.layout_shape, FC, lane, i);
        lanes[lane].c[i] = (float)C[p.row][p.col];
      }
    }
    EmuMmaOut out[32];
    if (!via_exec) {
      c.compute(lanes, out);
    } else {
      // Each lane's operands as compile.rs passes them: "+f" d/c, then "r" a and b registers.
      const int na = a_per_lane / per_reg, nb = b_per_lane / per_reg;
      for (g_pass = 0; g_pass < 2; ++g_pass) {
        for (int lane = 0; lane < 32; ++lane) {
          g_lane = lane;
          float* d = g_pass == 0 ? lanes[lane].c : out[lane].d;
          if (g_pass == 1) std::memcpy(d, lanes[lane].c, 16);
          std::vector<EmuOperand> ops;
          float scratch[4];
          std::memcpy(scratch, lanes[lane].c, 16);
          for (int i = 0; i < 4; ++i) ops.push_back(EmuOperand{'+', 'f', &scratch[i], 0});
          for (int i = 0; i < na; ++i) ops.push_back(EmuOperand{0, 'r', nullptr, lanes[lane].a[i]});
          for (int i = 0; i < nb; ++i) ops.push_back(EmuOperand{0, 'r', nullptr, lanes[lane].b[i]});
          bool ok = __emu_ptx_exec(c.tmpl, ops.data(), (int)ops.size());
          CHECK(ok, "%s: __emu_ptx_exec returned false", c.group);
          if (g_pass == 1) std::memcpy(out[lane].d, scratch, 16);
        }
      }
      g_pass = 0;
      CHECK(g_what == __emu_mma_shape(0).name || g_what.rfind("mma.sync.aligned.", 0) == 0,
            "collective what = %s", g_what.c_str());
    }
    for (int lane = 0; lane < 32; ++lane) {
      for (int i = 0; i < 4; ++i) {
        RC p = isa_layout(c.layout_shape, FC, lane, i);
        double ref = (double)(float)C[p.row][p.col], mag = std::fabs(ref);
        for (int k = 0; k < K; ++k) {
          ref += A[p.row][k] * B[k][p.col];
          mag += std::fabs(A[p.row][k] * B[k][p.col]);
        }
        // ISA bound: products exact, accumulation "with at least single precision": at most
        // K+1 roundings of 2^-24 relative to the sum of magnitudes.
        double tol = (K + 1) * std::ldexp(mag, -24) + 1e-38;
        double got = (double)out[lane].d[i];
        CHECK(std::fabs(got - ref) <= tol, "%s trial %d lane %d d%d (row %d col %d): got %.9g want %.9g",
              c.group, trial, lane, i, p.row, p.col, got, ref);
      }
    }
  }
}

// The header's layout functions against the transcription above, and each a bijection.
static void run_layout(const Case& c) {
  const int K = c.K;
  const int a_per_lane = 16 * K / 32, b_per_lane = K * 8 / 32;
  std::vector<int> seen_a(16 * K, 0), seen_b(K * 8, 0), seen_c(128, 0);
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < a_per_lane; ++i) {
      RC p = isa_layout(c.layout_shape, FA, lane, i);
      EmuRC q = c.a_rc(lane, i);
      CHECK(p.row == q.row && p.col == q.col, "%s A lane %d a%d: header (%d,%d) ISA (%d,%d)",
            c.group, lane, i, q.row, q.col, p.row, p.col);
      seen_a[p.row * K + p.col]++;
    }
    for (int i = 0; i < b_per_lane; ++i) {
      RC p = isa_layout(c.layout_shape, FB, lane, i);
      EmuRC q = c.b_rc(lane, i);
      CHECK(p.row == q.row && p.col == q.col, "%s B lane %d b%d: header (%d,%d) ISA (%d,%d)",
            c.group, lane, i, q.row, q.col, p.row, p.col);
      seen_b[p.row * 8 + p.col]++;
    }
    for (int i = 0; i < 4; ++i) {
      RC p = isa_layout(c.layout_shape, FC, lane, i);
      EmuRC q = __emu_mma_m16n8_c_rc(lane, i);
      CHECK(p.row == q.row && p.col == q.col, "%s C lane %d c%d: header (%d,%d) ISA (%d,%d)",
            c.group, lane, i, q.row, q.col, p.row, p.col);
      seen_c[p.row * 8 + p.col]++;
    }
  }
  for (int v : seen_a) CHECK(v == 1, "%s: A element covered %d times", c.group, v);
  for (int v : seen_b) CHECK(v == 1, "%s: B element covered %d times", c.group, v);
  for (int v : seen_c) CHECK(v == 1, "%s: C element covered %d times", c.group, v);
}

// Special values: Inf * 0 gives NaN (canonical), Inf propagates.
static void run_mma_specials() {
  EmuMmaLane lanes[32];
  std::memset(lanes, 0, sizeof(lanes));
  // A = 0 except A[0][0] = +Inf (bf16 0x7f80 in lane 0's a0 low half); B[0][0] = 1 (lane 0 b0).
  lanes[0].a[0] = 0x7f80u;
  lanes[0].b[0] = 0x3f80u;
  EmuMmaOut out[32];
  __emu_mma_m16n8k16_bf16_compute(lanes, out);
  CHECK(std::isinf(out[0].d[0]) && out[0].d[0] > 0, "Inf*1 gave %g", out[0].d[0]);
  // D[0][1] = Inf * B[0][1] (= 0) -> NaN, canonical 0x7fffffff.
  CHECK(f2b(out[0].d[1]) == 0x7fffffffu, "Inf*0 gave bits 0x%08x", f2b(out[0].d[1]));
  // Row 1 (lane 4 holds D[1][0]) does not see row 0's Inf.
  CHECK(out[4].d[0] == 0.0f, "D[1][0] is %g", out[4].d[0]);
}

// ---- cvt.rna.tf32.f32: a reference by arithmetic on doubles, not on bits. ----
// Rounds |x| to a multiple of the tf32 ulp at its binade (10 fraction bits; the subnormal
// binade's ulp below 2^-126), ties away from zero (.rna) / to even (.rn) / truncating (.rz).
static const uint32_t MAX_TF32 = 0x7f7fe000u;
static uint32_t ref_tf32(uint32_t bits, int rnd, bool satfinite) {
  float f = b2f(bits);
  const uint32_t sign = bits & 0x80000000u;
  if (std::isnan(f)) return 0xffffffffu;  // checked separately: any NaN of the same sign
  if (std::isinf(f)) return satfinite ? sign | MAX_TF32 : bits;
  double x = std::fabs((double)f);
  if (x == 0.0) return bits;
  int e;
  std::frexp(x, &e);                       // x = m * 2^e, m in [0.5, 1): leading bit 2^(e-1)
  int lead = std::max(e - 1, -126);
  double ulp = std::ldexp(1.0, lead - 10);
  double q = x / ulp;                      // exact: < 2^11, at most 24 significant bits
  double r = rnd == 0 ? std::floor(q + 0.5) : rnd == 1 ? std::nearbyint(q) : std::trunc(q);
  double y = r * ulp;
  if (y >= std::ldexp(1.0, 128)) return satfinite ? sign | MAX_TF32 : sign | 0x7f800000u;
  return sign | f2b((float)y);
}

static void check_cvt(uint32_t in, int rnd, bool sat) {
  uint32_t got = __emu_cvt_tf32_f32_bits(in, rnd, sat, false);
  uint32_t want = ref_tf32(in, rnd, sat);
  if (want == 0xffffffffu) {
    CHECK(std::isnan(b2f(got)) && (got & 0x80000000u) == (in & 0x80000000u) && (got & 0x1fffu) == 0,
          "cvt(rnd %d sat %d) of NaN 0x%08x gave 0x%08x", rnd, sat, in, got);
  } else {
    CHECK(got == want, "cvt(rnd %d sat %d) of 0x%08x (%.9g): got 0x%08x want 0x%08x", rnd, sat, in,
          b2f(in), got, want);
  }
}

static void run_cvt() {
  // Edge cases with the expected .rna bits written out (as the ISA's rounding defines them).
  struct { uint32_t in, want; } fixed[] = {
    {0x3f800000u, 0x3f800000u},  // 1.0
    {0x3f801000u, 0x3f802000u},  // exactly half an ulp above 1.0: tie, away from zero
    {0x3f803000u, 0x3f804000u},  // tie above an odd mantissa
    {0x3f800fffu, 0x3f800000u},  // just below the tie
    {0xbf801000u, 0xbf802000u},  // negative tie: away from zero (more negative)
    {0x3fffffffu, 0x40000000u},  // mantissa all ones: carries into the exponent
    {0x7f7fefffu, 0x7f7fe000u},  // just below the top tie: max finite tf32
    {0x7f7ff000u, 0x7f800000u},  // top tie rounds away: overflows to +Inf
    {0x7f7fffffu, 0x7f800000u},  // FLT_MAX -> +Inf
    {0xff7fffffu, 0xff800000u},  // -FLT_MAX -> -Inf
    {0x7f800000u, 0x7f800000u},  // +Inf
    {0xff800000u, 0xff800000u},  // -Inf
    {0x00000000u, 0x00000000u},  // +0
    {0x80000000u, 0x80000000u},  // -0
    {0x00000001u, 0x00000000u},  // smallest subnormal: rounds to 0
    {0x00001000u, 0x00002000u},  // subnormal tie: away from zero
    {0x00000fffu, 0x00000000u},
    {0x007ff000u, 0x00800000u},  // largest subnormals round up into the smallest normal
    {0x807fffffu, 0x80800000u},
  };
  for (auto& t : fixed) {
    uint32_t got = __emu_cvt_tf32_f32_bits(t.in, EMU_TF32_RNA, false, false);
    CHECK(got == t.want, "cvt.rna 0x%08x: got 0x%08x want 0x%08x", t.in, got, t.want);
    CHECK(ref_tf32(t.in, 0, false) == t.want, "reference disagrees on 0x%08x", t.in);
    CHECK(__emu_cvt_rna_tf32_f32(b2f(t.in)) == t.want, "__emu_cvt_rna_tf32_f32 0x%08x", t.in);
  }
  // .rn ties to even, .rz truncates; .satfinite keeps +-MAX_NORM.
  CHECK(__emu_cvt_tf32_f32_bits(0x3f801000u, EMU_TF32_RN, false, false) == 0x3f800000u, "rn tie to even");
  CHECK(__emu_cvt_tf32_f32_bits(0x3f803000u, EMU_TF32_RN, false, false) == 0x3f804000u, "rn tie to even (odd)");
  CHECK(__emu_cvt_tf32_f32_bits(0x3f801fffu, EMU_TF32_RZ, false, false) == 0x3f800000u, "rz");
  CHECK(__emu_cvt_tf32_f32_bits(0x7f7fffffu, EMU_TF32_RNA, true, false) == MAX_TF32, "satfinite max");
  CHECK(__emu_cvt_tf32_f32_bits(0xff800000u, EMU_TF32_RNA, true, false) == (0x80000000u | MAX_TF32), "satfinite -inf");
  CHECK(__emu_cvt_tf32_f32_bits(0xbf800000u, EMU_TF32_RN, false, true) == 0u, "relu");
  // NaNs stay NaN (a payload only in the dropped bits must not turn into Inf), sign kept.
  for (uint32_t nan : {0x7fc00000u, 0x7f800001u, 0xffc00001u, 0x7fffffffu, 0xff801000u})
    for (int rnd = 0; rnd < 3; ++rnd)
      for (int sat = 0; sat < 2; ++sat) check_cvt(nan, rnd, sat);
  // Random bit patterns (all classes), every rounding mode.
  for (int i = 0; i < 300000; ++i) {
    uint32_t b = (uint32_t)rng();
    check_cvt(b, i % 3, (i / 3) % 2);
  }
  // Through the template, as compile.rs passes it: "=r"(out) : "f"(in).
  for (int i = 0; i < 1000; ++i) {
    uint32_t in = (uint32_t)rng(), out = 0xdeadbeefu;
    EmuOperand ops[2] = {{'=', 'r', &out, 0}, {0, 'f', nullptr, in}};
    CHECK(__emu_ptx_exec("cvt.rna.tf32.f32 %0, %1;", ops, 2), "exec cvt.rna");
    uint32_t want = __emu_cvt_tf32_f32_bits(in, EMU_TF32_RNA, false, false);
    CHECK(out == want, "exec cvt.rna 0x%08x: got 0x%08x want 0x%08x", in, out, want);
    EmuOperand ops2[2] = {{'=', 'r', &out, 0}, {0, 'f', nullptr, in}};
    CHECK(__emu_ptx_exec("cvt.rna.satfinite.tf32.f32 %0, %1;", ops2, 2), "exec satfinite");
    CHECK(out == __emu_cvt_tf32_f32_bits(in, EMU_TF32_RNA, true, false), "exec satfinite value");
  }
  // The cache from several host threads at once.
  std::vector<std::thread> threads;
  int bad[4] = {0, 0, 0, 0};
  for (int t = 0; t < 4; ++t)
    threads.emplace_back([t, &bad] {
      for (int i = 0; i < 20000; ++i) {
        uint32_t in = (uint32_t)(i * 2654435761u + t), out = 0;
        EmuOperand ops[2] = {{'=', 'r', &out, 0}, {0, 'f', nullptr, in}};
        static const char* tmpls[3] = {"cvt.rna.tf32.f32 %0, %1;", "cvt.rn.tf32.f32 %0, %1;",
                                       "cvt.rz.tf32.f32 %0, %1;"};
        if (!__emu_ptx_exec(tmpls[i % 3], ops, 2) ||
            out != __emu_cvt_tf32_f32_bits(in, i % 3, false, false)) bad[t]++;
      }
    });
  for (auto& th : threads) th.join();
  for (int t = 0; t < 4; ++t) CHECK(bad[t] == 0, "thread %d: %d bad conversions", t, bad[t]);
}

// Templates the emulator must refuse (the runtime then traps naming them).
static void run_unsupported() {
  float f = 0;
  uint32_t r = 0;
  EmuOperand ops[14];
  for (int i = 0; i < 4; ++i) ops[i] = EmuOperand{'+', 'f', &f, 0};
  for (int i = 4; i < 14; ++i) ops[i] = EmuOperand{0, 'r', nullptr, 0};
  const char* bad[] = {
    "ld.shared.b32 %0, [%1];",
    "mma.sync.aligned.m16n8k16.row.col.f16.f16.f16.f16 {%0,%1}, {%2,%3,%4,%5}, {%6,%7}, {%8,%9};",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6}, {%8,%9}, {%0,%1,%2,%3};",
    "mma.sync.aligned.m16n8k16.col.row.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};",
    "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%99};",
    "cvt.tf32.f32 %0, %4;",
    "cvt.rna.relu.tf32.f32 %0, %4;",
    "cvt.rna.tf32.f32 %4, %5;",     // destination is an input operand
    "cvt.rna.tf32.f32 %0, %4",      // no ';'
    "",
  };
  for (const char* t : bad) CHECK(!__emu_ptx_exec(t, ops, 14), "accepted: %s", t);
  EmuOperand lane_ops[1] = {{'=', 'r', &r, 0}};
  g_lane = 13;
  CHECK(__emu_ptx_exec("mov.u32 %0, %laneid;", lane_ops, 1) && r == 13, "mov %%laneid gave %u", r);
  g_lane = 0;
}

int main(int argc, char** argv) {
  std::string group = argc > 1 ? argv[1] : "all";
  bool any = false;
  auto run = [&](const std::string& name, auto fn) {
    if (group != "all" && group != name) return;
    any = true;
    int before = g_failures;
    fn();
    std::printf("%s %s\n", g_failures == before ? "PASS" : "FAIL", name.c_str());
  };
  for (const Case& c : kCases) {
    run(std::string(c.group) + "_layout", [&] { run_layout(c); });
    run(c.group, [&] { run_mma_case(c, 50, false); });
    run(std::string(c.group) + "_exec", [&] { run_mma_case(c, 5, true); });
  }
  run("mma_specials", run_mma_specials);
  run("cvt_rna_tf32", run_cvt);
  run("unsupported", run_unsupported);
  if (!any) { std::printf("no such group: %s\n", group.c_str()); return 2; }
  std::printf("SUMMARY failures=%d\n", g_failures);
  return g_failures == 0 ? 0 : 1;
}
"#####;

fn crate_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// Compiles the harness once per test process; returns the executable.
fn harness() -> &'static Path {
    static EXE: OnceLock<PathBuf> = OnceLock::new();
    EXE.get_or_init(|| {
        let dir =
            std::env::temp_dir().join(format!("simclr-gpu-emu-ptx-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        let src = dir.join("ptx_harness.cpp");
        std::fs::write(&src, HARNESS).expect("write harness");
        let exe = dir.join("ptx_harness");
        let cxx = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
        let out = Command::new(&cxx)
            .args([
                "-std=c++17",
                "-O1",
                "-g",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-pthread",
                "-I",
            ])
            .arg(crate_dir().join("src/runtime"))
            .arg(&src)
            .arg("-o")
            .arg(&exe)
            .output()
            .unwrap_or_else(|e| panic!("running {cxx}: {e}"));
        assert!(
            out.status.success(),
            "harness failed to compile:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        exe
    })
}

/// Runs one harness group and asserts it passed.
fn run_group(group: &str) {
    let out = Command::new(harness())
        .arg(group)
        .output()
        .expect("run harness");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stdout.lines().any(|l| l == format!("PASS {group}")),
        "harness group {group} failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
}

macro_rules! harness_tests {
    ($($name:ident),* $(,)?) => {
        $(
            #[test]
            fn $name() {
                run_group(stringify!($name));
            }
        )*
    };
}

harness_tests!(
    mma_m16n8k16_bf16_layout,
    mma_m16n8k16_bf16,
    mma_m16n8k16_bf16_exec,
    mma_m16n8k16_f16_layout,
    mma_m16n8k16_f16,
    mma_m16n8k16_f16_exec,
    mma_m16n8k8_bf16_layout,
    mma_m16n8k8_bf16,
    mma_m16n8k8_bf16_exec,
    mma_m16n8k8_f16_layout,
    mma_m16n8k8_f16,
    mma_m16n8k8_f16_exec,
    mma_m16n8k8_tf32_layout,
    mma_m16n8k8_tf32,
    mma_m16n8k8_tf32_exec,
    mma_m16n8k4_tf32_layout,
    mma_m16n8k4_tf32,
    mma_m16n8k4_tf32_exec,
    mma_specials,
    cvt_rna_tf32,
    unsupported,
);

// ------------------------------------------------------------------------------------------------
// End to end: compile::compile, dlopen, emu_launch on one warp.
// ------------------------------------------------------------------------------------------------

/// Two kernels whose lanes build their fragments with the ISA's layouts (written once more, in
/// CUDA), run the mma through inline asm, and scatter D back to row-major memory.
const E2E_SOURCE: &str = r#"#line 1 "ptx_e2e.cu"
// PTX ISA 9.7.14.5.8 (m16n8k16 .bf16) and 9.7.14.5.7 (m16n8k8 .tf32) fragment layouts.
__device__ unsigned pack_bf16(unsigned short lo, unsigned short hi) {
    return (unsigned)lo | ((unsigned)hi << 16);
}

extern "C" __global__ void mma_bf16_m16n8k16(const unsigned short* A, const unsigned short* B,
                                             const float* C, float* D) {
    unsigned lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
    unsigned short ae[8], be[4];
    for (int i = 0; i < 8; ++i) {
        int row = (i < 2 || (i >= 4 && i < 6)) ? g : g + 8;
        int col = t * 2 + (i & 1) + (i >= 4 ? 8 : 0);
        ae[i] = A[row * 16 + col];
    }
    for (int i = 0; i < 4; ++i) {
        int row = t * 2 + (i & 1) + (i >= 2 ? 8 : 0);
        be[i] = B[row * 8 + g];
    }
    float c[4], d[4];
    for (int i = 0; i < 4; ++i) c[i] = C[(g + (i >= 2 ? 8 : 0)) * 8 + t * 2 + (i & 1)];
    unsigned a0 = pack_bf16(ae[0], ae[1]), a1 = pack_bf16(ae[2], ae[3]);
    unsigned a2 = pack_bf16(ae[4], ae[5]), a3 = pack_bf16(ae[6], ae[7]);
    unsigned b0 = pack_bf16(be[0], be[1]), b1 = pack_bf16(be[2], be[3]);
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%10,%11,%12,%13};\n"
        : "=f"(d[0]), "=f"(d[1]), "=f"(d[2]), "=f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1),
          "f"(c[0]), "f"(c[1]), "f"(c[2]), "f"(c[3]));
    for (int i = 0; i < 4; ++i) D[(g + (i >= 2 ? 8 : 0)) * 8 + t * 2 + (i & 1)] = d[i];
}

__device__ unsigned to_tf32(float f) {
    unsigned r;
    asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(f));
    return r;
}

extern "C" __global__ void mma_tf32_m16n8k8(const float* A, const float* B, float* CD) {
    unsigned lane = threadIdx.x % 32, g = lane >> 2, t = lane % 4;
    unsigned a[4], b[2];
    for (int i = 0; i < 4; ++i) {
        int row = (i == 0 || i == 2) ? g : g + 8;
        int col = (i < 2) ? t : t + 4;
        a[i] = to_tf32(A[row * 8 + col]);
    }
    for (int i = 0; i < 2; ++i) b[i] = to_tf32(B[(i == 0 ? t : t + 4) * 8 + g]);
    float d[4];
    for (int i = 0; i < 4; ++i) d[i] = CD[(g + (i >= 2 ? 8 : 0)) * 8 + t * 2 + (i & 1)];
    asm volatile(
        "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
        "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    for (int i = 0; i < 4; ++i) CD[(g + (i >= 2 ? 8 : 0)) * 8 + t * 2 + (i & 1)] = d[i];
}
"#;

/// A small deterministic generator (no dependency for the test).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// Uniform in [-4, 4).
    fn f32(&mut self) -> f32 {
        ((self.next() >> 40) as f32 / (1u64 << 24) as f32) * 8.0 - 4.0
    }
}

/// cvt.rna.tf32.f32 for finite inputs (PTX ISA 9.7.9.21: round to nearest, ties away from zero,
/// to 10 mantissa bits), as the value the tf32 register holds.
fn tf32_rna(x: f32) -> f64 {
    f32::from_bits(x.to_bits().wrapping_add(0x1000) & 0xffff_e000) as f64
}

type EmuLaunch = unsafe extern "C" fn(
    *const libc::c_char,
    *const u32,
    *const u32,
    u32,
    *mut *mut libc::c_void,
    *mut libc::c_char,
    u64,
) -> i32;

/// Launches `name` on one block of one warp; panics with the launch's message on failure.
fn launch_one_warp(launch: EmuLaunch, name: &str, params: &mut [*mut libc::c_void]) {
    let cname = std::ffi::CString::new(name).unwrap();
    let grid = [1u32, 1, 1];
    let block = [32u32, 1, 1];
    let mut msg = vec![0 as libc::c_char; 1024];
    // SAFETY: the kernel's parameters are pointers to live Vecs sized as the kernel indexes them;
    // msg has msg.len() bytes.
    let rc = unsafe {
        launch(
            cname.as_ptr(),
            grid.as_ptr(),
            block.as_ptr(),
            0,
            params.as_mut_ptr(),
            msg.as_mut_ptr(),
            msg.len() as u64,
        )
    };
    // SAFETY: emu_launch NUL-terminates msg within msg_cap.
    let text = unsafe { std::ffi::CStr::from_ptr(msg.as_ptr()) }
        .to_string_lossy()
        .into_owned();
    assert_eq!(rc, 0, "emu_launch({name}) failed: {text}");
}

/// Checks d against the f64 reference c + sum_k a*b, with the ISA's accumulation bound.
fn check_product(what: &str, k: usize, a: &[f64], b: &[f64], c: &[f64], d: &[f32]) {
    for r in 0..16 {
        for n in 0..8 {
            let mut want = c[r * 8 + n];
            let mut mag = want.abs();
            for kk in 0..k {
                let p = a[r * k + kk] * b[kk * 8 + n];
                want += p;
                mag += p.abs();
            }
            let tol = (k as f64 + 1.0) * mag * 2f64.powi(-24) + 1e-38;
            let got = d[r * 8 + n] as f64;
            assert!(
                (got - want).abs() <= tol,
                "{what}: D[{r}][{n}] = {got}, want {want}"
            );
        }
    }
}

#[test]
fn end_to_end_mma_through_compile_and_emu_launch() {
    let compiled = match simclr_gpu_emu::compile::compile(
        E2E_SOURCE,
        "ptx_e2e.cu",
        &[],
        &["--gpu-architecture=sm_80".to_string()],
    ) {
        Ok(c) => c,
        Err(simclr_gpu_emu::compile::CompileError::Compilation(log)) => panic!("compile:\n{log}"),
        Err(simclr_gpu_emu::compile::CompileError::InvalidOption(m)) => panic!("option: {m}"),
    };
    assert!(
        compiled.kernels.iter().any(|k| k == "mma_bf16_m16n8k16"),
        "{:?}",
        compiled.kernels
    );
    assert!(
        compiled.kernels.iter().any(|k| k == "mma_tf32_m16n8k8"),
        "{:?}",
        compiled.kernels
    );
    let path = std::ffi::CString::new(compiled.object.to_str().unwrap()).unwrap();
    // SAFETY: dlopen/dlsym on the object compile() just built; the handle is never closed, so
    // the symbol stays valid.
    let launch: EmuLaunch = unsafe {
        let handle = libc::dlopen(path.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        assert!(!handle.is_null(), "dlopen {}", compiled.object.display());
        let sym = libc::dlsym(handle, c"emu_launch".as_ptr());
        assert!(
            !sym.is_null(),
            "no emu_launch in {}",
            compiled.object.display()
        );
        std::mem::transmute::<*mut libc::c_void, EmuLaunch>(sym)
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);

    // m16n8k16 bf16: A 16x16, B 16x8 as bf16 bits (the high half of an f32), C 16x8.
    for trial in 0..3 {
        let a_bits: Vec<u16> = (0..256)
            .map(|_| (rng.f32().to_bits() >> 16) as u16)
            .collect();
        let b_bits: Vec<u16> = (0..128)
            .map(|_| (rng.f32().to_bits() >> 16) as u16)
            .collect();
        let c: Vec<f32> = (0..128).map(|_| rng.f32() * 2.0).collect();
        let mut d = vec![f32::NAN; 128];
        let mut pa = a_bits.as_ptr();
        let mut pb = b_bits.as_ptr();
        let mut pc = c.as_ptr();
        let mut pd = d.as_mut_ptr();
        let mut params: Vec<*mut libc::c_void> = vec![
            (&mut pa) as *mut _ as *mut libc::c_void,
            (&mut pb) as *mut _ as *mut libc::c_void,
            (&mut pc) as *mut _ as *mut libc::c_void,
            (&mut pd) as *mut _ as *mut libc::c_void,
        ];
        launch_one_warp(launch, "mma_bf16_m16n8k16", &mut params);
        let a: Vec<f64> = a_bits
            .iter()
            .map(|&h| f32::from_bits((h as u32) << 16) as f64)
            .collect();
        let b: Vec<f64> = b_bits
            .iter()
            .map(|&h| f32::from_bits((h as u32) << 16) as f64)
            .collect();
        let c64: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        check_product(
            &format!("bf16 m16n8k16 trial {trial}"),
            16,
            &a,
            &b,
            &c64,
            &d,
        );
    }

    // m16n8k8 tf32: A 16x8, B 8x8 as f32 (rounded in the kernel by cvt.rna), C/D in place.
    for trial in 0..3 {
        let a: Vec<f32> = (0..128).map(|_| rng.f32()).collect();
        let b: Vec<f32> = (0..64).map(|_| rng.f32()).collect();
        let c: Vec<f32> = (0..128).map(|_| rng.f32() * 2.0).collect();
        let mut cd = c.clone();
        let mut pa = a.as_ptr();
        let mut pb = b.as_ptr();
        let mut pcd = cd.as_mut_ptr();
        let mut params: Vec<*mut libc::c_void> = vec![
            (&mut pa) as *mut _ as *mut libc::c_void,
            (&mut pb) as *mut _ as *mut libc::c_void,
            (&mut pcd) as *mut _ as *mut libc::c_void,
        ];
        launch_one_warp(launch, "mma_tf32_m16n8k8", &mut params);
        let a64: Vec<f64> = a.iter().map(|&x| tf32_rna(x)).collect();
        let b64: Vec<f64> = b.iter().map(|&x| tf32_rna(x)).collect();
        let c64: Vec<f64> = c.iter().map(|&x| x as f64).collect();
        check_product(
            &format!("tf32 m16n8k8 trial {trial}"),
            8,
            &a64,
            &b64,
            &c64,
            &cd,
        );
    }
}
