//! NCCL's data types (`ncclDataType_t`) and reduction operators (`ncclRedOp_t`) on host bytes,
//! as the NCCL API reference ("Types", "Reduction operation") defines them.
//!
//! Every rank reduces the contributions itself, in rank order (`((x0 op x1) op x2) ...`), so
//! every rank gets the same bits. Each step is rounded to the data type, as NCCL's kernels do
//! (an f32 sum is an f32 addition; f16 and bf16 are computed exactly in f64, then rounded to
//! nearest even, which is the correctly rounded half-precision operation). `ncclAvg` is NCCL's
//! "pre-multiplied sum" for floating types (each input times `1/nranks` rounded to the type,
//! then summed) and a sum divided by `nranks` (truncating) for integers. Integer sums and
//! products wrap. `ncclMax`/`ncclMin` on floats follow C's `fmax`/`fmin` (a NaN loses to a
//! number).

/// `ncclInt8`.
pub const NCCL_INT8: u32 = 0;
/// `ncclUint8`.
pub const NCCL_UINT8: u32 = 1;
/// `ncclInt32`.
pub const NCCL_INT32: u32 = 2;
/// `ncclUint32`.
pub const NCCL_UINT32: u32 = 3;
/// `ncclInt64`.
pub const NCCL_INT64: u32 = 4;
/// `ncclUint64`.
pub const NCCL_UINT64: u32 = 5;
/// `ncclFloat16`.
pub const NCCL_FLOAT16: u32 = 6;
/// `ncclFloat32` (`ncclFloat`).
pub const NCCL_FLOAT32: u32 = 7;
/// `ncclFloat64` (`ncclDouble`).
pub const NCCL_FLOAT64: u32 = 8;
/// `ncclBfloat16`.
pub const NCCL_BFLOAT16: u32 = 9;
/// `ncclFloat8e4m3` (moved, not reduced, here).
pub const NCCL_FLOAT8E4M3: u32 = 10;
/// `ncclFloat8e5m2` (moved, not reduced, here).
pub const NCCL_FLOAT8E5M2: u32 = 11;

/// `ncclSum`.
pub const NCCL_SUM: u32 = 0;
/// `ncclProd`.
pub const NCCL_PROD: u32 = 1;
/// `ncclMax`.
pub const NCCL_MAX: u32 = 2;
/// `ncclMin`.
pub const NCCL_MIN: u32 = 3;
/// `ncclAvg`.
pub const NCCL_AVG: u32 = 4;

/// The size in bytes of one element of `dtype`, or `None` for a value that is no type.
pub fn elem_size(dtype: u32) -> Option<usize> {
    match dtype {
        NCCL_INT8 | NCCL_UINT8 | NCCL_FLOAT8E4M3 | NCCL_FLOAT8E5M2 => Some(1),
        NCCL_FLOAT16 | NCCL_BFLOAT16 => Some(2),
        NCCL_INT32 | NCCL_UINT32 | NCCL_FLOAT32 => Some(4),
        NCCL_INT64 | NCCL_UINT64 | NCCL_FLOAT64 => Some(8),
        _ => None,
    }
}

/// Whether the emulator reduces `dtype` with `op` (fp8 reductions are not emulated).
pub fn reducible(dtype: u32, op: u32) -> bool {
    op <= NCCL_AVG && dtype < NCCL_FLOAT8E4M3
}

/// `inputs` (one per rank, in rank order, each `out.len()` bytes) reduced element-wise with
/// `op` into `out`.
pub fn reduce(dtype: u32, op: u32, inputs: &[&[u8]], out: &mut [u8]) {
    let n = inputs.len();
    macro_rules! int {
        ($t:ty) => {{
            fold::<$t, _>(
                inputs,
                out,
                |v| v,
                |a, b| match op {
                    NCCL_PROD => a.wrapping_mul(b),
                    NCCL_MAX => a.max(b),
                    NCCL_MIN => a.min(b),
                    _ => a.wrapping_add(b),
                },
            );
            if op == NCCL_AVG {
                for o in out.chunks_exact_mut(<$t as Elem>::SIZE) {
                    (<$t as Elem>::get(o) / (n as $t)).put(o);
                }
            }
        }};
    }
    match dtype {
        NCCL_INT8 => int!(i8),
        NCCL_UINT8 => int!(u8),
        NCCL_INT32 => int!(i32),
        NCCL_UINT32 => int!(u32),
        NCCL_INT64 => int!(i64),
        NCCL_UINT64 => int!(u64),
        NCCL_FLOAT32 => {
            let s = 1.0 / n as f32;
            float::<f32>(inputs, out, op, |v| v * s)
        }
        NCCL_FLOAT64 => {
            let s = 1.0 / n as f64;
            float::<f64>(inputs, out, op, |v| v * s)
        }
        NCCL_FLOAT16 => half::<F16>(inputs, out, op),
        NCCL_BFLOAT16 => half::<Bf16>(inputs, out, op),
        _ => unreachable!("checked at the call: {dtype}"),
    }
}

/// A fixed-size element read from and written to little-endian bytes.
trait Elem: Copy {
    const SIZE: usize;
    fn get(b: &[u8]) -> Self;
    fn put(self, b: &mut [u8]);
}

macro_rules! elem {
    ($($t:ty)*) => {$(
        impl Elem for $t {
            const SIZE: usize = std::mem::size_of::<$t>();
            fn get(b: &[u8]) -> Self {
                <$t>::from_le_bytes(b.try_into().expect("element size"))
            }
            fn put(self, b: &mut [u8]) {
                b.copy_from_slice(&self.to_le_bytes())
            }
        }
    )*};
}
elem!(i8 u8 i32 u32 i64 u64 f32 f64 u16);

/// `out[i] = f(...f(f(pre(x0), pre(x1)), pre(x2))...)`: rank order, one element at a time.
fn fold<T: Elem, F: Fn(T, T) -> T>(inputs: &[&[u8]], out: &mut [u8], pre: impl Fn(T) -> T, f: F) {
    for (i, o) in out.chunks_exact_mut(T::SIZE).enumerate() {
        let at = i * T::SIZE..(i + 1) * T::SIZE;
        let mut acc = pre(T::get(&inputs[0][at.clone()]));
        for x in &inputs[1..] {
            acc = f(acc, pre(T::get(&x[at.clone()])));
        }
        acc.put(o);
    }
}

trait Float: Elem + std::ops::Add<Output = Self> + std::ops::Mul<Output = Self> {
    fn fmax(self, o: Self) -> Self;
    fn fmin(self, o: Self) -> Self;
}
impl Float for f32 {
    fn fmax(self, o: f32) -> f32 {
        self.max(o)
    }
    fn fmin(self, o: f32) -> f32 {
        self.min(o)
    }
}
impl Float for f64 {
    fn fmax(self, o: f64) -> f64 {
        self.max(o)
    }
    fn fmin(self, o: f64) -> f64 {
        self.min(o)
    }
}

fn float<T: Float>(inputs: &[&[u8]], out: &mut [u8], op: u32, avg_pre: impl Fn(T) -> T) {
    let id = |v: T| v;
    match op {
        NCCL_PROD => fold::<T, _>(inputs, out, id, |a, b| a * b),
        NCCL_MAX => fold::<T, _>(inputs, out, id, T::fmax),
        NCCL_MIN => fold::<T, _>(inputs, out, id, T::fmin),
        NCCL_AVG => fold::<T, _>(inputs, out, avg_pre, |a, b| a + b),
        _ => fold::<T, _>(inputs, out, id, |a, b| a + b),
    }
}

/// A 16-bit floating format: its bits to and from f64 (the f64 is exactly representable).
trait Half {
    fn value(b: u16) -> f64;
    fn bits(v: f64) -> u16;
    /// `v` rounded to the format (nearest, ties to even; overflow to infinity).
    fn round(v: f64) -> f64;
}

/// IEEE binary16 (`ncclFloat16`).
struct F16;
/// bfloat16 (`ncclBfloat16`).
struct Bf16;

/// `x` rounded to a binary format of `mant` fraction bits, least normal exponent `emin` and
/// largest finite value `max`: nearest, ties to even, subnormals kept, overflow to infinity.
fn round_float(x: f64, mant: i32, emin: i32, max: f64) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    let a = x.abs();
    let e = ((a.to_bits() >> 52) as i32) - 1023;
    let q = 2f64.powi(e.max(emin) - mant);
    let v = (a / q).round_ties_even() * q;
    let v = if v > max { f64::INFINITY } else { v };
    v.copysign(x)
}

impl Half for F16 {
    fn value(b: u16) -> f64 {
        let sign = if b & 0x8000 != 0 { -1.0 } else { 1.0 };
        let e = ((b >> 10) & 0x1f) as i32;
        let m = (b & 0x3ff) as f64;
        sign * match e {
            0 => m * 2f64.powi(-24),
            31 if m == 0.0 => f64::INFINITY,
            31 => f64::NAN,
            _ => (1024.0 + m) * 2f64.powi(e - 25),
        }
    }
    fn bits(v: f64) -> u16 {
        let sign = if v.is_sign_negative() { 0x8000 } else { 0 };
        let a = v.abs();
        sign | if a.is_nan() {
            0x7e00
        } else if a.is_infinite() {
            0x7c00
        } else if a < 2f64.powi(-14) {
            (a * 2f64.powi(24)) as u16
        } else {
            let e = ((a.to_bits() >> 52) as i32) - 1023;
            let m = (a / 2f64.powi(e - 10)) as u16 - 1024;
            (((e + 15) as u16) << 10) | m
        }
    }
    fn round(v: f64) -> f64 {
        round_float(v, 10, -14, 65504.0)
    }
}

impl Half for Bf16 {
    fn value(b: u16) -> f64 {
        crate::numeric::bf16_to_f32(b) as f64
    }
    fn bits(v: f64) -> u16 {
        // Exact: `v` is a bfloat16 value, so an f32 one.
        crate::numeric::f32_to_bf16(v as f32)
    }
    fn round(v: f64) -> f64 {
        round_float(v, 7, -126, f32::from_bits(0x7f7f_0000) as f64)
    }
}

fn half<H: Half>(inputs: &[&[u8]], out: &mut [u8], op: u32) {
    let scale = H::round(1.0 / inputs.len() as f64);
    let pre = |v: u16| match op {
        NCCL_AVG => H::bits(H::round(H::value(v) * scale)),
        _ => v,
    };
    let step = |a: u16, b: u16| {
        let (x, y) = (H::value(a), H::value(b));
        H::bits(H::round(match op {
            NCCL_PROD => x * y,
            NCCL_MAX => x.max(y),
            NCCL_MIN => x.min(y),
            _ => x + y,
        }))
    };
    fold::<u16, _>(inputs, out, pre, step);
}

/// `v` rounded to IEEE binary16, as its bits (for tests' direct computations).
pub fn f16_bits(v: f64) -> u16 {
    F16::bits(F16::round(v))
}

/// The value of IEEE binary16 bits.
pub fn f16_value(b: u16) -> f64 {
    F16::value(b)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn half_rounding_is_to_nearest_even() {
        assert_eq!(f16_bits(1.0 + 2f64.powi(-11)), 0x3c00);
        assert_eq!(f16_bits(1.0 + 3.0 * 2f64.powi(-11)), 0x3c02);
        assert_eq!(f16_bits(65520.0), 0x7c00);
        assert_eq!(f16_bits(65519.0), 0x7bff);
        assert_eq!(f16_bits(2f64.powi(-24)), 0x0001);
        assert_eq!(f16_bits(-2.5), 0xc100);
        for b in [0x0001u16, 0x03ff, 0x0400, 0x3c00, 0x7bff, 0xc3ff] {
            assert_eq!(f16_bits(f16_value(b)), b);
        }
        assert_eq!(Bf16::bits(Bf16::round(1.0 + 2f64.powi(-8))), 0x3f80);
        assert_eq!(Bf16::bits(Bf16::round(1.0 + 3.0 * 2f64.powi(-8))), 0x3f82);
    }

    #[test]
    fn sums_are_in_rank_order_in_the_type() {
        let a = 1.0f32.to_le_bytes();
        let b = 1e-8f32.to_le_bytes();
        let c = (-1.0f32).to_le_bytes();
        let mut out = [0u8; 4];
        reduce(NCCL_FLOAT32, NCCL_SUM, &[&a, &b, &c], &mut out);
        assert_eq!(f32::from_le_bytes(out), (1.0f32 + 1e-8) - 1.0);
        let x = 7i32.to_le_bytes();
        let y = 2i32.to_le_bytes();
        reduce(NCCL_INT32, NCCL_AVG, &[&x, &y], &mut out);
        assert_eq!(i32::from_le_bytes(out), 4);
    }
}
