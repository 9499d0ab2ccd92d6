//! Per-parameter optimiser updates.

/// SGD with momentum as PyTorch's `torch.optim.SGD` (dampening 0): `g += wd * p`;
/// `buf = momentum * buf + g`; `p -= lr * (nesterov ? g + momentum * buf : buf)`.
pub fn sgd_update(
    p: &mut [f32],
    g: &[f32],
    buf: &mut [f32],
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    nesterov: bool,
) {
    for ((p, &g), b) in p.iter_mut().zip(g).zip(buf.iter_mut()) {
        let g = g + weight_decay * *p;
        *b = momentum * *b + g;
        let step = if nesterov { g + momentum * *b } else { *b };
        *p -= lr * step;
    }
}

/// L2 norm in f64.
pub fn norm(x: &[f32]) -> f64 {
    x.iter()
        .map(|&v| (v as f64) * (v as f64))
        .sum::<f64>()
        .sqrt()
}

/// LARS as SimCLR's LARSOptimizer: with `adapt`, `g += wd * p` and the learning rate is scaled by
/// the trust ratio `eta * |p| / |g|` (1 where either norm is 0); then `v = momentum * v + lr * g`,
/// `p -= v` (or the Nesterov form).
pub fn lars_update(
    p: &mut [f32],
    g: &[f32],
    v: &mut [f32],
    lr: f32,
    momentum: f32,
    weight_decay: f32,
    eta: f32,
    adapt: bool,
    nesterov: bool,
) {
    let scaled_lr = if adapt {
        let w_norm = norm(p);
        let g_norm = g
            .iter()
            .zip(p.iter())
            .map(|(&g, &p)| {
                let d = (g + weight_decay * p) as f64;
                d * d
            })
            .sum::<f64>()
            .sqrt();
        let trust = if w_norm > 0.0 && g_norm > 0.0 {
            eta as f64 * w_norm / g_norm
        } else {
            1.0
        };
        (lr as f64 * trust) as f32
    } else {
        lr
    };
    let wd = if adapt { weight_decay } else { 0.0 };
    for ((p, &g), v) in p.iter_mut().zip(g).zip(v.iter_mut()) {
        let g = g + wd * *p;
        *v = momentum * *v + scaled_lr * g;
        let step = if nesterov {
            momentum * *v + scaled_lr * g
        } else {
            *v
        };
        *p -= step;
    }
}
