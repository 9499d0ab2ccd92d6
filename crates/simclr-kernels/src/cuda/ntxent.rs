//! The fused NT-Xent loss on the GPU (`kernels/ntxent.cu`), the twin of [`crate::cpu::ntxent`].
//!
//! [`NtXentGpu`] owns the workspace for one problem size (the normalised rows, per-row
//! statistics, the split partials and the gradient rows: `O(rows * dim)`, never `rows^2`), so a
//! training loop allocates nothing per step.
//!
//! The definition, the positive pairing and the data-parallel semantics are the CPU twin's: rows
//! `0..N` and `N..2N` are the two views; a replica owning the anchor rows `anchors` of the
//! gathered matrix gets the loss of its anchors divided by the global row count and the gradient
//! of that loss with respect to every row (sum the replicas' gradients to get the full one).

use std::ops::Range;

use cudarc::driver::{CudaSlice, LaunchConfig, PushKernelArg};

use super::{ensure, int, Gpu, GpuError, Module};

/// The arithmetic of the similarity products.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub enum Precision {
    /// fp32 on CUDA cores: the reference, closest to the CPU.
    F32,
    /// TF32 tensor cores (10-bit mantissa inputs, fp32 accumulation).
    Tf32,
    /// bf16 tensor cores (8-bit mantissa inputs, fp32 accumulation, fp32 softmax): the fastest.
    #[default]
    Bf16,
}

impl Precision {
    fn suffix(self) -> &'static str {
        match self {
            Precision::F32 => "f32",
            Precision::Tf32 => "tf32",
            Precision::Bf16 => "bf16",
        }
    }
    /// d-columns of the gradient per backward block (the kernel's `DC`).
    fn dc(self) -> usize {
        match self {
            Precision::Bf16 => 128,
            _ => 64,
        }
    }
}

const BLOCK_ROWS: usize = 64;
const THREADS: u32 = 128;
/// Below this temperature some exponents may underflow against the fixed maximum `1/tau`; the
/// kernels then keep a running maximum (as the CPU twin does).
const FIXED_MAX_MIN_TAU: f32 = 0.025;
/// Blocks of the forward kernel resident per SM (by its registers, see `cargo xtask
/// check-kernels`).
const FORWARD_BLOCKS_PER_SM: usize = 4;
/// Blocks of the backward kernel resident per SM (168 registers x 128 threads on sm_90).
const BACKWARD_BLOCKS_PER_SM: usize = 3;

enum Rows {
    F32(CudaSlice<f32>),
    Bf16(CudaSlice<u16>),
}

/// The workspace of the GPU NT-Xent loss for `rows x dim` embeddings at one precision.
pub struct NtXentGpu {
    rows: usize,
    dim: usize,
    dp: usize,
    precision: Precision,
    sms: usize,
    u: Rows,
    norms: CudaSlice<f32>,
    part: CudaSlice<f32>,
    lse: CudaSlice<f32>,
    loss_rows: CudaSlice<f32>,
    gu: CudaSlice<f32>,
    total: CudaSlice<f32>,
    anchors: Range<usize>,
}

impl std::fmt::Debug for NtXentGpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NtXentGpu")
            .field("rows", &self.rows)
            .field("dim", &self.dim)
            .field("precision", &self.precision)
            .finish()
    }
}

/// How a launch splits the column tiles so the grid fills the GPU in one wave: `slots` is how
/// many blocks of the kernel the GPU holds at once (SMs times resident blocks per SM, at most
/// 4 per SM, which the workspace is sized for). Returns (splits, column tiles per split).
fn splits_for(row_blocks: usize, col_tiles: usize, slots: usize) -> (usize, usize) {
    let want = slots.div_ceil(row_blocks.max(1)).clamp(1, col_tiles.max(1));
    let per = col_tiles.div_ceil(want).max(1);
    (col_tiles.div_ceil(per).max(1), per)
}

impl NtXentGpu {
    /// A workspace for `rows` embeddings (two views of `rows / 2` images) of `dim` values.
    pub fn new(gpu: &Gpu, rows: usize, dim: usize, precision: Precision) -> Result<Self, GpuError> {
        ensure(rows >= 2 && rows % 2 == 0, || {
            format!(
                "NT-Xent needs an even number of rows >= 2 (two views of each image), got {rows}"
            )
        })?;
        ensure(dim >= 1, || {
            "NT-Xent needs rows of dimension >= 1, got 0".into()
        })?;
        int(rows.saturating_mul(dim.div_ceil(32) * 32), "rows * dim")?;
        let dp = dim.div_ceil(32) * 32;
        let sms = gpu.multiprocessors() as usize;
        // splits * rows_in_launch <= 64 * (4 * sms + row_blocks) for any anchor or target range
        // (see `splits_for`): the partials and gradient rows are sized for the worst case.
        let cap = 256 * sms + rows + BLOCK_ROWS;
        let u = match precision {
            Precision::Bf16 => Rows::Bf16(gpu.zeros::<u16>(rows * dp)?),
            _ => Rows::F32(gpu.zeros::<f32>(rows * dp)?),
        };
        Ok(NtXentGpu {
            rows,
            dim,
            dp,
            precision,
            sms,
            u,
            norms: gpu.zeros(rows)?,
            part: gpu.zeros(3 * cap)?,
            lse: gpu.zeros(rows)?,
            loss_rows: gpu.zeros(rows)?,
            gu: gpu.zeros(cap * dp)?,
            total: gpu.zeros(1)?,
            anchors: 0..0,
        })
    }

    /// The kernel of `pass` for this precision and width: bf16 rows of at most 128 values take
    /// the fast path (anchor rows held in registers, one staging per column tile).
    fn kernel_name(&self, pass: &str) -> String {
        if self.precision == Precision::Bf16 && self.dp <= 128 {
            format!("ntxent_{pass}_bf16_d128")
        } else {
            format!("ntxent_{pass}_{}", self.precision.suffix())
        }
    }

    /// Rows and dimension this workspace serves.
    pub fn shape(&self) -> (usize, usize) {
        (self.rows, self.dim)
    }

    /// Bytes of device memory held by the workspace.
    pub fn workspace_bytes(&self) -> usize {
        let u = match &self.u {
            Rows::F32(s) => s.num_bytes(),
            Rows::Bf16(s) => s.num_bytes(),
        };
        u + self.norms.num_bytes()
            + self.part.num_bytes()
            + self.lse.num_bytes()
            + self.loss_rows.num_bytes()
            + self.gu.num_bytes()
            + self.total.num_bytes()
    }

    fn check_z(&self, z: &CudaSlice<f32>, what: &str) -> Result<(), GpuError> {
        ensure(z.len() == self.rows * self.dim, || {
            format!(
                "{what} holds {} values, expected rows * dim = {}",
                z.len(),
                self.rows * self.dim
            )
        })
    }

    /// Forward pass of all rows: the mean loss. Keeps the per-row log-sum-exp for
    /// [`NtXentGpu::backward`].
    pub fn forward(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        temperature: f32,
    ) -> Result<f32, GpuError> {
        self.forward_anchors(gpu, z, 0..self.rows, temperature)
    }

    /// Forward pass of the anchor rows `anchors` against all rows of `z` (the rows gathered from
    /// every replica): the anchors' summed loss divided by the global row count.
    pub fn forward_anchors(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        anchors: Range<usize>,
        temperature: f32,
    ) -> Result<f32, GpuError> {
        self.enqueue_forward(gpu, z, anchors, temperature)?;
        Ok(gpu.download(&self.total)?[0])
    }

    /// Enqueues the forward pass without waiting: the loss lands in [`NtXentGpu::loss_buffer`].
    pub fn enqueue_forward(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        anchors: Range<usize>,
        temperature: f32,
    ) -> Result<(), GpuError> {
        self.check_z(z, "z")?;
        ensure(temperature.is_finite() && temperature > 0.0, || {
            format!("the temperature must be finite and positive, got {temperature}")
        })?;
        ensure(
            anchors.start < anchors.end && anchors.end <= self.rows,
            || {
                format!(
                    "anchors {anchors:?} must be a non-empty range of 0..{}",
                    self.rows
                )
            },
        )?;
        let (rows, d, dp) = (
            int(self.rows, "rows")?,
            int(self.dim, "dim")?,
            int(self.dp, "dim")?,
        );
        let stream = gpu.stream().clone();
        // Normalise every row (a replica could normalise only its own before the gather; the
        // kernels take whatever rows they are given).
        let cfg_rows = LaunchConfig {
            grid_dim: ((self.rows * 32).div_ceil(256) as u32, 1, 1),
            block_dim: (256, 1, 1),
            shared_mem_bytes: 0,
        };
        let name = match &self.u {
            Rows::F32(_) => "ntxent_normalize_f32",
            Rows::Bf16(_) => "ntxent_normalize_bf16",
        };
        let f = gpu.function(Module::NtXent, name)?;
        {
            let mut b = stream.launch_builder(&f);
            b.arg(z).arg(&rows).arg(&d).arg(&dp);
            match &mut self.u {
                Rows::F32(u) => b.arg(u),
                Rows::Bf16(u) => b.arg(u),
            };
            b.arg(&mut self.norms);
            // SAFETY: ntxent_normalize_{f32,bf16}(const float*, int, int, int, T*, float*); z
            // holds rows * d floats, u rows * dp values of the kernel's type, norms rows.
            unsafe { b.launch(cfg_rows) }?;
        }
        let na = anchors.len();
        let row_blocks = na.div_ceil(BLOCK_ROWS);
        let col_tiles = self.rows.div_ceil(BLOCK_ROWS);
        let (splits, per) = splits_for(row_blocks, col_tiles, FORWARD_BLOCKS_PER_SM * self.sms);
        let fixed = i32::from(temperature >= FIXED_MAX_MIN_TAU);
        let inv_tau = 1.0 / temperature;
        let (a0, a1) = (int(anchors.start, "anchor")?, int(anchors.end, "anchor")?);
        let half = int(self.rows / 2, "rows")?;
        let per_i = int(per, "tiles")?;
        ensure(3 * splits * na <= self.part.len(), || {
            "partials workspace too small for this split".into()
        })?;
        let name = self.kernel_name("forward");
        let f = gpu.function(Module::NtXent, &name)?;
        let cfg = LaunchConfig {
            grid_dim: (row_blocks as u32, splits as u32, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        {
            let mut b = stream.launch_builder(&f);
            match &self.u {
                Rows::F32(u) => b.arg(u),
                Rows::Bf16(u) => b.arg(u),
            };
            b.arg(&rows)
                .arg(&dp)
                .arg(&a0)
                .arg(&a1)
                .arg(&half)
                .arg(&inv_tau)
                .arg(&fixed)
                .arg(&per_i)
                .arg(&mut self.part);
            // SAFETY: matches ntxent_forward_*; part holds 3 * splits * na floats (checked).
            unsafe { b.launch(cfg) }?;
        }
        let na_i = int(na, "anchors")?;
        let splits_i = int(splits, "splits")?;
        let f = gpu.function(Module::NtXent, "ntxent_merge")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.part)
            .arg(&na_i)
            .arg(&splits_i)
            .arg(&mut self.lse)
            .arg(&mut self.loss_rows);
        // SAFETY: ntxent_merge(const float*, int, int, float*, float*); lse and loss hold >= na.
        unsafe { b.launch(LaunchConfig::for_num_elems(na as u32)) }?;
        let scale = 1.0 / self.rows as f32;
        let f = gpu.function(Module::NtXent, "ntxent_sum")?;
        let mut b = stream.launch_builder(&f);
        b.arg(&self.loss_rows)
            .arg(&na_i)
            .arg(&scale)
            .arg(&mut self.total);
        // SAFETY: ntxent_sum(const float*, int, float, float*) with one block.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: (1, 1, 1),
                block_dim: (512, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        self.anchors = anchors;
        Ok(())
    }

    /// The device scalar the last forward pass wrote its loss to.
    pub fn loss_buffer(&self) -> &CudaSlice<f32> {
        &self.total
    }

    /// Per-anchor log-sum-exp of the last forward pass (downloaded).
    pub fn log_sum_exp(&self, gpu: &Gpu) -> Result<Vec<f32>, GpuError> {
        let mut v = gpu.download(&self.lse)?;
        v.truncate(self.anchors.len());
        Ok(v)
    }

    /// Backward pass of the last forward pass (same `z`, same temperature): writes
    /// `grad_output * d loss / d z` for every row into `grad` (`rows * dim`).
    pub fn backward(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        temperature: f32,
        grad_output: f32,
        grad: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.backward_rows(gpu, z, temperature, grad_output, 0..self.rows, grad)
    }

    /// Backward pass for the target rows `targets` only (the rest of `grad` is left as it is):
    /// a replica that gathered the log-sum-exp of every anchor needs only its own rows.
    pub fn backward_rows(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        temperature: f32,
        grad_output: f32,
        targets: Range<usize>,
        grad: &mut CudaSlice<f32>,
    ) -> Result<(), GpuError> {
        self.check_z(z, "z")?;
        self.check_z(grad, "grad")?;
        ensure(!self.anchors.is_empty(), || {
            "backward called before forward".into()
        })?;
        ensure(
            targets.start < targets.end && targets.end <= self.rows,
            || {
                format!(
                    "target rows {targets:?} must be a non-empty range of 0..{}",
                    self.rows
                )
            },
        )?;
        let stream = gpu.stream().clone();
        let (rows, d, dp) = (
            int(self.rows, "rows")?,
            int(self.dim, "dim")?,
            int(self.dp, "dim")?,
        );
        let nt = targets.len();
        let row_blocks = nt.div_ceil(BLOCK_ROWS);
        let col_tiles = self.rows.div_ceil(BLOCK_ROWS);
        let dsplits = self.dp.div_ceil(self.precision.dc());
        let (splits, per) = splits_for(
            row_blocks * dsplits,
            col_tiles,
            BACKWARD_BLOCKS_PER_SM * self.sms,
        );
        let fixed = i32::from(temperature >= FIXED_MAX_MIN_TAU);
        let inv_tau = 1.0 / temperature;
        let scale = grad_output / (self.rows as f32 * temperature);
        let (a0, a1) = (
            int(self.anchors.start, "anchor")?,
            int(self.anchors.end, "anchor")?,
        );
        let (t0, t1) = (int(targets.start, "target")?, int(targets.end, "target")?);
        let half = int(self.rows / 2, "rows")?;
        let (ds_i, per_i, splits_i) = (
            int(dsplits, "dsplits")?,
            int(per, "tiles")?,
            int(splits, "splits")?,
        );
        ensure(splits * nt * self.dp <= self.gu.len(), || {
            "gradient workspace too small for this split".into()
        })?;
        let name = self.kernel_name("backward");
        let f = gpu.function(Module::NtXent, &name)?;
        {
            let mut b = stream.launch_builder(&f);
            match &self.u {
                Rows::F32(u) => b.arg(u),
                Rows::Bf16(u) => b.arg(u),
            };
            b.arg(&rows)
                .arg(&dp)
                .arg(&a0)
                .arg(&a1)
                .arg(&self.lse)
                .arg(&half)
                .arg(&inv_tau)
                .arg(&fixed)
                .arg(&scale)
                .arg(&t0)
                .arg(&t1)
                .arg(&ds_i)
                .arg(&per_i)
                .arg(&mut self.gu);
            // SAFETY: matches ntxent_backward_*; gu holds splits * nt * dp floats (checked).
            unsafe {
                b.launch(LaunchConfig {
                    grid_dim: (row_blocks as u32, (dsplits * splits) as u32, 1),
                    block_dim: (THREADS, 1, 1),
                    shared_mem_bytes: 0,
                })
            }?;
        }
        let f = gpu.function(Module::NtXent, "ntxent_finish")?;
        let mut b = stream.launch_builder(&f);
        b.arg(z)
            .arg(&self.norms)
            .arg(&self.gu)
            .arg(&t0)
            .arg(&t1)
            .arg(&d)
            .arg(&dp)
            .arg(&splits_i)
            .arg(grad);
        // SAFETY: ntxent_finish(const float*, const float*, const float*, int, int, int, int,
        // int, float*); one warp per target row, z and grad hold rows * d.
        unsafe {
            b.launch(LaunchConfig {
                grid_dim: ((nt * 32).div_ceil(256) as u32, 1, 1),
                block_dim: (256, 1, 1),
                shared_mem_bytes: 0,
            })
        }?;
        Ok(())
    }

    /// Forward and backward of all rows: the mean loss, and its gradient in `grad`.
    pub fn forward_backward(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        temperature: f32,
        grad: &mut CudaSlice<f32>,
    ) -> Result<f32, GpuError> {
        self.enqueue_forward(gpu, z, 0..self.rows, temperature)?;
        self.backward(gpu, z, temperature, 1.0, grad)?;
        Ok(gpu.download(&self.total)?[0])
    }

    /// The data-parallel form: forward of the anchors `anchors`, then the gradient of their
    /// loss with respect to every row (as [`crate::cpu::nt_xent_forward_backward_anchors`]).
    pub fn forward_backward_anchors(
        &mut self,
        gpu: &Gpu,
        z: &CudaSlice<f32>,
        anchors: Range<usize>,
        temperature: f32,
        grad: &mut CudaSlice<f32>,
    ) -> Result<f32, GpuError> {
        self.enqueue_forward(gpu, z, anchors, temperature)?;
        self.backward(gpu, z, temperature, 1.0, grad)?;
        Ok(gpu.download(&self.total)?[0])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_fill_the_gpu_and_cover_every_tile() {
        for (rb, ct, slots) in [
            (128, 128, 528),
            (1024, 1024, 528),
            (8, 8, 528),
            (1, 1, 1),
            (3, 100, 64),
        ] {
            let (s, per) = splits_for(rb, ct, slots);
            assert!(s >= 1 && per >= 1);
            assert!(s * per >= ct, "{rb} {ct}: {s} x {per}");
            assert!((s - 1) * per < ct, "an empty split: {rb} {ct}: {s} x {per}");
        }
        // 2N = 65536 fills an H100 (132 SMs x 4) without splitting; 2N = 8192 splits in 4 or 5.
        assert_eq!(splits_for(1024, 1024, 528).0, 1);
        assert!(splits_for(128, 128, 528).0 >= 4);
        // The workspace bound: splits * rows in a launch <= 64 * (slots + row blocks).
        for rb in 1..300 {
            let (s, _) = splits_for(rb, 1024, 528);
            assert!(s * 64 * rb <= 64 * (528 + rb));
        }
    }
}
