//! Learning-rate schedules and batch-size scaling.

/// How the base learning rate grows with the batch size.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LrScaling {
    /// `lr = base * batch / 256` (the paper's 0.3 x B/256).
    Linear,
    /// `lr = base * sqrt(batch)` (the paper's 0.075 x sqrt(B), better for small batches).
    Sqrt,
    /// `lr = base`.
    None,
}

impl LrScaling {
    /// The peak learning rate for `base` at `batch`.
    pub fn scale(self, base: f32, batch: usize) -> f32 {
        match self {
            LrScaling::Linear => base * batch as f32 / 256.0,
            LrScaling::Sqrt => base * (batch as f32).sqrt(),
            LrScaling::None => base,
        }
    }
}

/// Linear warm-up from 0 to `peak` over `warmup_steps`, then cosine decay to 0 at `total_steps`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct WarmupCosine {
    /// The learning rate at the end of the warm-up.
    pub peak: f32,
    /// Steps of linear warm-up.
    pub warmup_steps: u64,
    /// Steps in the whole run.
    pub total_steps: u64,
}

impl WarmupCosine {
    /// The learning rate for step `step` (0-based), as SimCLR's schedule: during warm-up
    /// `peak * (step + 1) / warmup`, then `peak * 0.5 * (1 + cos(pi * t))` with `t` the fraction of
    /// the decay done.
    pub fn lr(&self, step: u64) -> f32 {
        if step < self.warmup_steps {
            return self.peak * (step + 1) as f32 / self.warmup_steps as f32;
        }
        let decay = self.total_steps.saturating_sub(self.warmup_steps).max(1);
        let t = ((step - self.warmup_steps) as f64 / decay as f64).min(1.0);
        (self.peak as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_cosine() {
        let s = WarmupCosine {
            peak: 1.0,
            warmup_steps: 10,
            total_steps: 110,
        };
        assert!((s.lr(0) - 0.1).abs() < 1e-6);
        assert!((s.lr(9) - 1.0).abs() < 1e-6);
        assert!((s.lr(10) - 1.0).abs() < 1e-6);
        assert!((s.lr(60) - 0.5).abs() < 1e-6);
        assert!(s.lr(110).abs() < 1e-6);
        assert!(s.lr(500).abs() < 1e-6);
        for step in 10..110 {
            assert!(s.lr(step + 1) <= s.lr(step));
        }
    }

    #[test]
    fn batch_scaling() {
        assert!((LrScaling::Linear.scale(0.3, 4096) - 4.8).abs() < 1e-5);
        assert!((LrScaling::Sqrt.scale(0.075, 4096) - 4.8).abs() < 1e-5);
        assert_eq!(LrScaling::None.scale(0.5, 512), 0.5);
    }
}
