// emu_ptx.h: the inline-PTX instructions the emulated CUDA device executes.
//
// Included by emu_runtime.h at its end, after it declares EmuOperand, __emu_warp_collective,
// __emu_lane_id and __emu_trap (see emu-contract.md section 3). C++17, header-only: every
// compiled module gets its own copy (and its own template cache, which dies with the module).
//
// Entry point: `bool __emu_ptx_exec(const char* tmpl, EmuOperand* ops, int n)`. The template is
// the text of a GCC-style `asm("...")` statement; `%N` names operand N (outputs first, then
// inputs, as compile.rs numbers them), `{...}` is a PTX vector operand. A template is parsed once
// per distinct pointer (and text) and cached. Anything not implemented here returns false; the
// runtime then traps naming the template.
//
// Implemented (PTX ISA 9.x section numbers; older ISAs number them 9.7.8.x / 9.7.13.x):
// - cvt{.rna,.rn,.rz}{.relu}{.satfinite}.tf32.f32 d, a;  (9.7.9.21 "cvt"; 5.2.3 tf32 format)
// - mma.sync.aligned.{m16n8k16,m16n8k8}.row.col.f32.{bf16,f16}.{bf16,f16}.f32
//   mma.sync.aligned.{m16n8k8,m16n8k4}.row.col.f32.tf32.tf32.f32
//   (9.7.14.5.14 "mma"; fragments 9.7.14.5.6 m16n8k4, 9.7.14.5.7 m16n8k8, 9.7.14.5.8 m16n8k16)
// - mov.{u32,b32,s32} d, %laneid;
//
// The layouts and compute functions are exposed under stable names (`__emu_mma_*`) so tests can
// call them without the fiber runtime.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <shared_mutex>
#include <string>
#include <unordered_map>
#include <vector>

// ------------------------------------------------------------------------------------------------
// Scalar formats.
// ------------------------------------------------------------------------------------------------

/// Rounding mode of a conversion to tf32 (PTX ISA 9.7.9.21 "cvt", Floating Point Notes).
enum EmuTf32Round { EMU_TF32_RNA = 0, EMU_TF32_RN = 1, EMU_TF32_RZ = 2 };

/// f32 -> tf32, returning the .b32 register bits.
///
/// The ISA (5.2.3 "Alternate Floating-Point Data Formats") only says tf32 has "the same range as
/// .f32 and reduced precision (>=10 bits)" and that "the internal layout of tf32 format is
/// implementation defined", held in a .b32 register. We use the layout real GPUs produce and
/// every tensor-core user relies on: the f32 bit pattern with the 13 low mantissa bits zero
/// (1 sign, 8 exponent, 10 mantissa bits), so the register read as an f32 is the tf32 value.
/// tf32 keeps f32's exponent range, so subnormals are rounded at the subnormal exponent (no
/// flush: cvt without .ftz supports subnormals, 9.7.9.21 "Subnormal numbers").
///
/// Rounding (9.7.9.21): .rna "rounding to nearest, with ties away from zero"; .rn ties to even;
/// .rz toward zero. A finite value that rounds past the largest tf32 (0x7f7fe000, i.e.
/// |x| >= 0x7f7ff000 under .rna) overflows to Inf, as round-to-nearest does in IEEE 754.
/// .satfinite (9.7.9.21): "if the input value is NaN, then the result is NaN ... If the absolute
/// value of input is greater than MAX_NORM ... the result is sign-preserved MAX_NORM" (so Inf and
/// values that would round to Inf give +-0x7f7fe000). .relu clamps negative results to +0.
/// NaN without .satfinite: the ISA says nothing; we return a quiet NaN of the same sign and high
/// payload (bits & 0xffffe000 | 0x00400000), so a NaN never becomes Inf by losing its payload.
inline uint32_t __emu_cvt_tf32_f32_bits(uint32_t x, int rnd, bool satfinite, bool relu) {
  const uint32_t sign = x & 0x80000000u;
  const uint32_t mag = x & 0x7fffffffu;
  const uint32_t max_norm = 0x7f7fe000u;
  if (mag > 0x7f800000u) {  // NaN
    return (x & 0xffffe000u) | 0x00400000u;
  }
  uint32_t r;
  if (mag == 0x7f800000u) {  // Inf
    r = satfinite ? max_norm : mag;
  } else {
    const uint32_t low = mag & 0x1fffu;
    r = mag & ~0x1fffu;
    bool up = false;
    if (rnd == EMU_TF32_RNA) {
      up = low >= 0x1000u;  // half an ulp or more: away from zero, ties included
    } else if (rnd == EMU_TF32_RN) {
      up = low > 0x1000u || (low == 0x1000u && (r & 0x2000u) != 0);
    }
    // Adding one ulp to the magnitude carries into the exponent when the mantissa is all ones,
    // which is the correctly rounded next binade (or 0x7f800000 = Inf past the top one).
    if (up) r += 0x2000u;
    if (satfinite && r > max_norm) r = max_norm;
  }
  if (relu && sign != 0) return 0;
  return sign | r;
}

/// `cvt.rna.tf32.f32` on a float, as the register bits it writes.
inline uint32_t __emu_cvt_rna_tf32_f32(float x) {
  uint32_t b;
  std::memcpy(&b, &x, 4);
  return __emu_cvt_tf32_f32_bits(b, EMU_TF32_RNA, false, false);
}

inline float __emu_f32_from_bits(uint32_t b) {
  float f;
  std::memcpy(&f, &b, 4);
  return f;
}

/// A .tf32 mma operand register as the value the multiplier sees.
///
/// mma (9.7.14.5.14, "Precision and rounding": ".bf16 and .tf32 floating point operations:
/// Element-wise multiplication of matrix A and B is performed with specified precision") uses
/// tf32 precision; for wgmma the ISA spells out that ".tf32 will truncate lower 13 bits of the
/// 32-bit input data before multiplication". We do the same for mma, so a kernel that feeds raw
/// f32 bits without cvt.rna gets the truncated value, as on hardware. A NaN stays NaN.
inline double __emu_tf32_operand(uint32_t b) {
  if ((b & 0x7fffffffu) > 0x7f800000u) return std::nan("");
  return (double)__emu_f32_from_bits(b & 0xffffe000u);
}

/// A bf16 (5.2.3: 8 exponent, 7 mantissa bits, the high half of an f32) as a double; exact.
inline double __emu_bf16_value(uint16_t h) { return (double)__emu_f32_from_bits((uint32_t)h << 16); }

/// An IEEE binary16 as a double; exact (subnormals included).
inline double __emu_f16_value(uint16_t h) {
  const int s = h >> 15, e = (h >> 10) & 0x1f, m = h & 0x3ff;
  double v;
  if (e == 0x1f) {
    v = m ? std::nan("") : INFINITY;
  } else if (e == 0) {
    v = std::ldexp((double)m, -24);
  } else {
    v = std::ldexp((double)(m | 0x400), e - 25);
  }
  return s ? -v : v;
}

// ------------------------------------------------------------------------------------------------
// mma fragment layouts (PTX ISA 9.7.14.5.x, "Matrix Fragments for mma.m16n8kK").
// Every function maps (lane, element index i) to (row, col) of the matrix, where
//   groupID = %laneid >> 2, threadID_in_group = %laneid % 4,
// and elements are numbered as the ISA numbers them ("Elements (low to high)"): for 16-bit types
// register r holds elements 2r (low half) and 2r+1 (high half); for .tf32 register r holds
// element r.
// ------------------------------------------------------------------------------------------------

/// A (row, col) position in a fragment's matrix.
struct EmuRC {
  int row;
  int col;
};

/// 9.7.14.5.8, m16n8k16 .f16/.bf16 A (Figure "MMA .m16n8k16 fragment layout for matrix A"):
/// row = groupID for a0,a1,a4,a5, groupID+8 otherwise; col = threadID_in_group*2 + (i&1),
/// +8 for i >= 4.
inline EmuRC __emu_mma_m16n8k16_f16_a_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{g + (((i >> 1) & 1) ? 8 : 0), t * 2 + (i & 1) + (i >= 4 ? 8 : 0)};
}
/// 9.7.14.5.8, m16n8k16 .f16/.bf16 B: row = threadID_in_group*2 + (i&1), +8 for i >= 2;
/// col = groupID.
inline EmuRC __emu_mma_m16n8k16_f16_b_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{t * 2 + (i & 1) + (i >= 2 ? 8 : 0), g};
}
/// 9.7.14.5.7, m16n8k8 .f16/.bf16 A: row = groupID for a0,a1, groupID+8 for a2,a3;
/// col = threadID_in_group*2 + (i&1).
inline EmuRC __emu_mma_m16n8k8_f16_a_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{g + (i >= 2 ? 8 : 0), t * 2 + (i & 1)};
}
/// 9.7.14.5.7, m16n8k8 .f16/.bf16 B: row = threadID_in_group*2 + i; col = groupID.
inline EmuRC __emu_mma_m16n8k8_f16_b_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{t * 2 + i, g};
}
/// 9.7.14.5.7, m16n8k8 .tf32 A: row = groupID for a0,a2, groupID+8 for a1,a3;
/// col = threadID_in_group for a0,a1, threadID_in_group+4 for a2,a3.
inline EmuRC __emu_mma_m16n8k8_tf32_a_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{g + ((i & 1) ? 8 : 0), t + (i >= 2 ? 4 : 0)};
}
/// 9.7.14.5.7, m16n8k8 .tf32 B: row = threadID_in_group for b0, threadID_in_group+4 for b1;
/// col = groupID.
inline EmuRC __emu_mma_m16n8k8_tf32_b_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{t + (i ? 4 : 0), g};
}
/// 9.7.14.5.6, m16n8k4 .tf32 A: row = groupID for a0, groupID+8 for a1; col = threadID_in_group.
inline EmuRC __emu_mma_m16n8k4_tf32_a_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{g + (i ? 8 : 0), t};
}
/// 9.7.14.5.6, m16n8k4 .tf32 B: row = threadID_in_group; col = groupID (one element, b0).
inline EmuRC __emu_mma_m16n8k4_tf32_b_rc(int lane, int /*i*/) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{t, g};
}
/// Accumulators C/D with .f32 for m16n8k4 (9.7.14.5.6), m16n8k8 (9.7.14.5.7) and m16n8k16
/// (9.7.14.5.8), which the ISA gives identically: row = groupID for c0,c1, groupID+8 for c2,c3;
/// col = threadID_in_group*2 + (i&1).
inline EmuRC __emu_mma_m16n8_c_rc(int lane, int i) {
  const int g = lane >> 2, t = lane % 4;
  return EmuRC{g + (i >= 2 ? 8 : 0), t * 2 + (i & 1)};
}

// ------------------------------------------------------------------------------------------------
// mma compute.
// ------------------------------------------------------------------------------------------------

/// One lane's mma registers: a/b as .b32 register bits (packed pairs for 16-bit types), c as the
/// .f32 accumulators. Unused trailing registers are ignored.
struct EmuMmaLane {
  uint32_t a[4];
  uint32_t b[2];
  float c[4];
};

/// One lane's .f32 results d0..d3.
struct EmuMmaOut {
  float d[4];
};

/// Element type of the A and B operands.
enum EmuMmaType { EMU_MMA_BF16 = 0, EMU_MMA_F16 = 1, EMU_MMA_TF32 = 2 };

/// A supported `mma.sync.aligned.m16n8kK.row.col.f32.T.T.f32`.
struct EmuMmaShape {
  const char* name;  // the instruction, also the warp collective's `what`
  int k;
  EmuMmaType type;
  int a_regs;  // registers in the a vector operand
  int b_regs;
  EmuRC (*a_rc)(int lane, int i);
  EmuRC (*b_rc)(int lane, int i);
};

inline const EmuMmaShape& __emu_mma_shape(int index) {
  static const EmuMmaShape shapes[] = {
      {"mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32", 16, EMU_MMA_BF16, 4, 2,
       __emu_mma_m16n8k16_f16_a_rc, __emu_mma_m16n8k16_f16_b_rc},
      {"mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32", 16, EMU_MMA_F16, 4, 2,
       __emu_mma_m16n8k16_f16_a_rc, __emu_mma_m16n8k16_f16_b_rc},
      {"mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32", 8, EMU_MMA_BF16, 2, 1,
       __emu_mma_m16n8k8_f16_a_rc, __emu_mma_m16n8k8_f16_b_rc},
      {"mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32", 8, EMU_MMA_F16, 2, 1,
       __emu_mma_m16n8k8_f16_a_rc, __emu_mma_m16n8k8_f16_b_rc},
      {"mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32", 8, EMU_MMA_TF32, 4, 2,
       __emu_mma_m16n8k8_tf32_a_rc, __emu_mma_m16n8k8_tf32_b_rc},
      {"mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32", 4, EMU_MMA_TF32, 2, 1,
       __emu_mma_m16n8k4_tf32_a_rc, __emu_mma_m16n8k4_tf32_b_rc},
  };
  return shapes[index];
}
inline constexpr int EMU_MMA_SHAPE_COUNT = 6;

/// Element `i` of a fragment whose registers are `regs`, as a double (exact).
inline double __emu_mma_element(const uint32_t* regs, int i, EmuMmaType type) {
  if (type == EMU_MMA_TF32) return __emu_tf32_operand(regs[i]);
  const uint16_t h = (uint16_t)(regs[i >> 1] >> ((i & 1) ? 16 : 0));
  return type == EMU_MMA_BF16 ? __emu_bf16_value(h) : __emu_f16_value(h);
}

/// D = A*B + C for one warp: `in[lane]` are the 32 lanes' registers, `out[lane]` receives them.
///
/// Numerics (9.7.14.5.14 "Precision and rounding"): for .bf16/.tf32 "element-wise
/// multiplication of matrix A and B is performed with specified precision. Accumulation of the
/// intermediate values is performed with at least single precision. The accumulation order,
/// rounding, and handling of subnormal inputs are unspecified"; for .f16 with .f32 accumulators,
/// multiplication and accumulation "with at least single precision", order/rounding/subnormals
/// likewise unspecified. Our choice where it is left open: every product is exact (f64 holds the
/// product of two <=11-bit significands with any f32 exponent), the sum c + p_0 + ... + p_{K-1}
/// is formed in f64 in the order k = 0..K-1 (exact unless the terms' magnitudes span more than
/// ~30 bits), and rounded once to f32, round to nearest even. Subnormal inputs are kept. This is
/// at least as accurate as a tensor core, which is a known difference: hardware accumulates with
/// narrower adders (truncating alignment), so results can differ from ours in the last bits, by
/// up to about K ulps of the largest term. A NaN result is the canonical f32 NaN 0x7fffffff.
/// Under --ftz=true the runtime sets MXCSR DAZ/FTZ while a kernel runs, so f32 subnormal inputs
/// and results are flushed here too (the ISA leaves subnormal handling unspecified).
inline void __emu_mma_compute(const EmuMmaShape& s, const EmuMmaLane* in, EmuMmaOut* out) {
  const int K = s.k;
  double A[16][16], B[16][8], C[16][8];
  const int a_elems = 16 * K / 32, b_elems = K * 8 / 32;
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < a_elems; ++i) {
      const EmuRC p = s.a_rc(lane, i);
      A[p.row][p.col] = __emu_mma_element(in[lane].a, i, s.type);
    }
    for (int i = 0; i < b_elems; ++i) {
      const EmuRC p = s.b_rc(lane, i);
      B[p.row][p.col] = __emu_mma_element(in[lane].b, i, s.type);
    }
    for (int i = 0; i < 4; ++i) {
      const EmuRC p = __emu_mma_m16n8_c_rc(lane, i);
      C[p.row][p.col] = (double)in[lane].c[i];
    }
  }
  for (int lane = 0; lane < 32; ++lane) {
    for (int i = 0; i < 4; ++i) {
      const EmuRC p = __emu_mma_m16n8_c_rc(lane, i);
      double acc = C[p.row][p.col];
      for (int k = 0; k < K; ++k) acc += A[p.row][k] * B[k][p.col];
      float d = (float)acc;
      if (d != d) d = __emu_f32_from_bits(0x7fffffffu);
      out[lane].d[i] = d;
    }
  }
}

/// mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 on a warp's registers.
inline void __emu_mma_m16n8k16_bf16_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(0), in, out);
}
/// mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 on a warp's registers.
inline void __emu_mma_m16n8k16_f16_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(1), in, out);
}
/// mma.sync.aligned.m16n8k8.row.col.f32.bf16.bf16.f32 on a warp's registers.
inline void __emu_mma_m16n8k8_bf16_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(2), in, out);
}
/// mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 on a warp's registers.
inline void __emu_mma_m16n8k8_f16_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(3), in, out);
}
/// mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 on a warp's registers.
inline void __emu_mma_m16n8k8_tf32_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(4), in, out);
}
/// mma.sync.aligned.m16n8k4.row.col.f32.tf32.tf32.f32 on a warp's registers.
inline void __emu_mma_m16n8k4_tf32_compute(const EmuMmaLane* in, EmuMmaOut* out) {
  __emu_mma_compute(__emu_mma_shape(5), in, out);
}

// The warp collective's compute callback: ins/outs point at each lane's EmuMmaLane/EmuMmaOut.
inline void __emu_mma_collective(const void* const* ins, void* const* outs, unsigned mask,
                                 void* ctx) {
  if (mask != 0xffffffffu) __emu_trap("mma.sync needs all 32 lanes of the warp (mask 0xffffffff)");
  EmuMmaLane in[32];
  EmuMmaOut out[32];
  for (int l = 0; l < 32; ++l) in[l] = *static_cast<const EmuMmaLane*>(ins[l]);
  __emu_mma_compute(*static_cast<const EmuMmaShape*>(ctx), in, out);
  for (int l = 0; l < 32; ++l) *static_cast<EmuMmaOut*>(outs[l]) = out[l];
}

// ------------------------------------------------------------------------------------------------
// Template parsing and execution.
// ------------------------------------------------------------------------------------------------

namespace emu_ptx_detail {

// One scalar PTX operand: `%N` (an asm operand), an immediate, or %laneid.
struct Arg {
  enum Kind { OPERAND, IMMEDIATE, LANEID } kind;
  int index;       // OPERAND
  uint64_t bits;   // IMMEDIATE
};

enum Op { CVT_TF32, MMA, MOV_LANEID };

struct Instr {
  Op op;
  std::vector<std::vector<Arg>> args;  // each argument: one scalar, or a {...} vector
  int rnd = 0;
  bool satfinite = false, relu = false;
  const EmuMmaShape* shape = nullptr;
};

struct Program {
  std::string text;
  bool ok = false;
  std::vector<Instr> instrs;
};

inline bool is_space(char c) { return c == ' ' || c == '\t' || c == '\n' || c == '\r'; }

inline std::vector<std::string> split_dots(const std::string& s) {
  std::vector<std::string> parts;
  size_t start = 0;
  for (;;) {
    size_t dot = s.find('.', start);
    parts.push_back(s.substr(start, dot == std::string::npos ? std::string::npos : dot - start));
    if (dot == std::string::npos) return parts;
    start = dot + 1;
  }
}

// Parses one scalar operand: %N, %laneid, 0fXXXXXXXX (f32 hex), or a decimal/hex integer.
inline bool parse_scalar(const std::string& t, Arg& a) {
  if (t.empty()) return false;
  if (t == "%laneid") {
    a = Arg{Arg::LANEID, 0, 0};
    return true;
  }
  if (t[0] == '%') {
    if (t.size() < 2) return false;
    int n = 0;
    for (size_t i = 1; i < t.size(); ++i) {
      if (t[i] < '0' || t[i] > '9') return false;
      n = n * 10 + (t[i] - '0');
      if (n > 100000) return false;
    }
    a = Arg{Arg::OPERAND, n, 0};
    return true;
  }
  char* end = nullptr;
  if (t.size() == 10 && (t[0] == '0') && (t[1] == 'f' || t[1] == 'F')) {
    uint64_t v = std::strtoull(t.c_str() + 2, &end, 16);
    if (*end != 0) return false;
    a = Arg{Arg::IMMEDIATE, 0, v};
    return true;
  }
  long long v = std::strtoll(t.c_str(), &end, 0);
  if (*end != 0) return false;
  a = Arg{Arg::IMMEDIATE, 0, (uint64_t)v};
  return true;
}

// Parses the operand list of one instruction ("{%0, %1}, %2, ...").
inline bool parse_args(const std::string& s, std::vector<std::vector<Arg>>& out) {
  size_t i = 0;
  auto skip = [&] {
    while (i < s.size() && is_space(s[i])) ++i;
  };
  auto token = [&](std::string& t) {
    skip();
    t.clear();
    while (i < s.size() && !is_space(s[i]) && s[i] != ',' && s[i] != '{' && s[i] != '}') t += s[i++];
    return !t.empty();
  };
  skip();
  if (i == s.size()) return true;
  for (;;) {
    skip();
    std::vector<Arg> group;
    std::string t;
    if (i < s.size() && s[i] == '{') {
      ++i;
      for (;;) {
        Arg a;
        if (!token(t) || !parse_scalar(t, a)) return false;
        group.push_back(a);
        skip();
        if (i < s.size() && s[i] == ',') {
          ++i;
          continue;
        }
        if (i < s.size() && s[i] == '}') {
          ++i;
          break;
        }
        return false;
      }
    } else {
      Arg a;
      if (!token(t) || !parse_scalar(t, a)) return false;
      group.push_back(a);
    }
    out.push_back(group);
    skip();
    if (i == s.size()) return true;
    if (s[i] != ',') return false;
    ++i;
  }
}

inline bool all_scalar(const Instr& in) {
  for (const auto& g : in.args)
    if (g.size() != 1) return false;
  return true;
}

// Recognises an opcode (with its operands already parsed) as an instruction we implement.
inline bool classify(const std::string& opcode, Instr& in) {
  const std::vector<std::string> p = split_dots(opcode);
  if (p.empty()) return false;
  if (p[0] == "cvt") {
    // cvt.rna{.satfinite}.tf32.f32 / cvt.{rn,rz}{.satfinite}{.relu}.tf32.f32 (9.7.9.21).
    if (p.size() < 4 || p[p.size() - 2] != "tf32" || p.back() != "f32") return false;
    bool have_rnd = false;
    for (size_t i = 1; i + 2 < p.size(); ++i) {
      if (!have_rnd && p[i] == "rna") {
        in.rnd = EMU_TF32_RNA;
        have_rnd = true;
      } else if (!have_rnd && p[i] == "rn") {
        in.rnd = EMU_TF32_RN;
        have_rnd = true;
      } else if (!have_rnd && p[i] == "rz") {
        in.rnd = EMU_TF32_RZ;
        have_rnd = true;
      } else if (p[i] == "satfinite" && !in.satfinite) {
        in.satfinite = true;
      } else if (p[i] == "relu" && !in.relu) {
        in.relu = true;
      } else {
        return false;
      }
    }
    // "Rounding modifier is mandatory ... [for] .tf32"; .relu is not defined with .rna.
    if (!have_rnd || (in.relu && in.rnd == EMU_TF32_RNA)) return false;
    in.op = CVT_TF32;
    return in.args.size() == 2 && all_scalar(in);
  }
  if (p[0] == "mma") {
    for (int i = 0; i < EMU_MMA_SHAPE_COUNT; ++i) {
      const EmuMmaShape& s = __emu_mma_shape(i);
      if (opcode == s.name) {
        in.op = MMA;
        in.shape = &s;
        return in.args.size() == 4 && in.args[0].size() == 4 &&
               (int)in.args[1].size() == s.a_regs && (int)in.args[2].size() == s.b_regs &&
               in.args[3].size() == 4;
      }
    }
    return false;
  }
  if (p[0] == "mov" && p.size() == 2 && (p[1] == "u32" || p[1] == "b32" || p[1] == "s32")) {
    if (in.args.size() != 2 || !all_scalar(in) || in.args[1][0].kind != Arg::LANEID) return false;
    in.op = MOV_LANEID;
    return true;
  }
  return false;
}

inline Program* parse(const char* tmpl) {
  Program* prog = new Program();
  prog->text = tmpl;
  const std::string& s = prog->text;
  size_t i = 0;
  for (;;) {
    // A statement: optional scope braces (a `{ ... }` block at statement level), the opcode,
    // its operands, ';'.
    while (i < s.size() && (is_space(s[i]) || s[i] == '{' || s[i] == '}')) ++i;
    if (i == s.size()) break;
    size_t semi = s.find(';', i);
    if (semi == std::string::npos) return prog;  // not ok
    std::string stmt = s.substr(i, semi - i);
    i = semi + 1;
    size_t j = 0;
    while (j < stmt.size() && !is_space(stmt[j])) ++j;
    Instr in;
    in.op = MMA;
    if (!parse_args(stmt.substr(j), in.args)) return prog;
    if (!classify(stmt.substr(0, j), in)) return prog;
    prog->instrs.push_back(in);
  }
  prog->ok = !prog->instrs.empty();
  return prog;
}

// Looks the template up by pointer (the literal's address in the module), checking the text so a
// reused address cannot alias another template; parses and caches it on a miss. Programs live
// as long as the module (never freed: a bounded set of literals).
inline const Program* lookup(const char* tmpl) {
  static std::shared_mutex mu;
  static std::unordered_map<const char*, Program*> cache;
  {
    std::shared_lock<std::shared_mutex> lock(mu);
    auto it = cache.find(tmpl);
    if (it != cache.end() && it->second->text == tmpl) return it->second;
  }
  Program* prog = parse(tmpl);
  std::unique_lock<std::shared_mutex> lock(mu);
  auto it = cache.find(tmpl);
  if (it != cache.end() && it->second->text == tmpl) {
    delete prog;
    return it->second;
  }
  cache[tmpl] = prog;  // a stale entry for a reused address is leaked, not freed under readers
  return prog;
}

inline int letter_bytes(char letter) {
  switch (letter) {
    case 'h': return 2;
    case 'c': return 1;
    case 'l':
    case 'd': return 8;
    default: return 4;  // 'r', 'f', 'n' read as 32-bit registers
  }
}

// Reads a scalar source operand's bits (zero-extended).
inline bool read_arg(const Arg& a, const EmuOperand* ops, int n, uint64_t& v) {
  if (a.kind == Arg::IMMEDIATE) {
    v = a.bits;
    return true;
  }
  if (a.kind == Arg::LANEID) {
    v = __emu_lane_id();
    return true;
  }
  if (a.index >= n) return false;
  const EmuOperand& op = ops[a.index];
  if (op.mod == 0) {
    v = op.bits;
    return true;
  }
  if (op.mod == '=' || op.ptr == nullptr) return false;  // write-only output read as a source
  v = 0;
  std::memcpy(&v, op.ptr, letter_bytes(op.letter));
  return true;
}

// Writes a destination operand (zero-extending into wider registers).
inline bool write_arg(const Arg& a, EmuOperand* ops, int n, uint64_t v) {
  if (a.kind != Arg::OPERAND || a.index >= n) return false;
  EmuOperand& op = ops[a.index];
  if ((op.mod != '=' && op.mod != '+') || op.ptr == nullptr) return false;
  std::memcpy(op.ptr, &v, letter_bytes(op.letter));  // x86-64 is little-endian
  return true;
}

// Checks every operand reference of a program against the statement's operands before running
// anything, so an instruction is never half executed.
inline bool check_operands(const Program& prog, const EmuOperand* ops, int n) {
  for (const Instr& in : prog.instrs) {
    for (size_t g = 0; g < in.args.size(); ++g) {
      for (const Arg& a : in.args[g]) {
        const bool dest = g == 0;
        if (dest) {
          if (a.kind != Arg::OPERAND || a.index >= n) return false;
          if ((ops[a.index].mod != '=' && ops[a.index].mod != '+') || !ops[a.index].ptr) return false;
        } else if (a.kind == Arg::OPERAND) {
          if (a.index >= n) return false;
          // A source may be an output register written by an earlier instruction of the same
          // template, or an in/out ('+') operand.
          if (ops[a.index].mod != 0 && !ops[a.index].ptr) return false;
        }
      }
    }
  }
  return true;
}

inline bool exec(const Instr& in, EmuOperand* ops, int n) {
  switch (in.op) {
    case CVT_TF32: {
      uint64_t a;
      if (!read_arg(in.args[1][0], ops, n, a)) return false;
      return write_arg(in.args[0][0], ops, n,
                       __emu_cvt_tf32_f32_bits((uint32_t)a, in.rnd, in.satfinite, in.relu));
    }
    case MOV_LANEID:
      return write_arg(in.args[0][0], ops, n, __emu_lane_id());
    case MMA: {
      EmuMmaLane lane{};
      uint64_t v;
      for (size_t r = 0; r < in.args[1].size(); ++r) {
        if (!read_arg(in.args[1][r], ops, n, v)) return false;
        lane.a[r] = (uint32_t)v;
      }
      for (size_t r = 0; r < in.args[2].size(); ++r) {
        if (!read_arg(in.args[2][r], ops, n, v)) return false;
        lane.b[r] = (uint32_t)v;
      }
      for (size_t r = 0; r < 4; ++r) {
        if (!read_arg(in.args[3][r], ops, n, v)) return false;
        lane.c[r] = __emu_f32_from_bits((uint32_t)v);
      }
      EmuMmaOut out{};
      // "The mandatory .sync qualifier indicates that mma instruction causes the executing
      // thread to wait until all threads in the warp execute the same mma instruction"
      // (9.7.14.5.14): a warp collective over all 32 lanes.
      __emu_warp_collective(0xffffffffu, &lane, &out, __emu_mma_collective,
                            const_cast<EmuMmaShape*>(in.shape), in.shape->name);
      for (size_t r = 0; r < 4; ++r) {
        uint32_t bits;
        std::memcpy(&bits, &out.d[r], 4);
        if (!write_arg(in.args[0][r], ops, n, bits)) return false;
      }
      return true;
    }
  }
  return false;
}

}  // namespace emu_ptx_detail

/// Executes an inline-PTX template with its operands; false if it is not implemented here.
// Not `inline`: emu_runtime.h declares it (hidden visibility) before including this header and
// calls it from __emu_asm; the header is compiled into exactly one translation unit per module.
bool __emu_ptx_exec(const char* tmpl, EmuOperand* ops, int n) {
  if (tmpl == nullptr) return false;
  const emu_ptx_detail::Program* prog = emu_ptx_detail::lookup(tmpl);
  if (!prog->ok || !emu_ptx_detail::check_operands(*prog, ops, n)) return false;
  for (const auto& in : prog->instrs)
    if (!emu_ptx_detail::exec(in, ops, n)) return false;
  return true;
}
