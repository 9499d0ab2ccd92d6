//! One SimCLR training step.

use crate::error::{NnError, Result};
use crate::loss::ContrastiveLoss;
use crate::model::SimClr;
use crate::optim::Optimizer;
use crate::param::Module;
use crate::tensor::Tensor;

/// What one step measured.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct StepStats {
    /// The contrastive loss before the update.
    pub loss: f32,
    /// The learning rate used.
    pub lr: f32,
}

/// Forward both views (`views` is `[2N, c, h, w]`, first views then second views, as one batch,
/// so batch norm sees all 2N), NT-Xent, backward, and one optimiser step. A non-finite loss or
/// gradient stops before the update, leaving the weights as they were.
pub fn train_step(
    model: &mut SimClr,
    views: &Tensor,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    temperature: f32,
) -> Result<StepStats> {
    let loss = ContrastiveLoss::NtXent { temperature };
    train_step_with_h(model, views, optimizer, lr, &loss).map(|(stats, _)| stats)
}

/// [`train_step`] with any of the contrastive losses, also returning the representations h of
/// the views (`[2N, features]`, from before the update), for an online linear probe trained on
/// them with stop-gradient.
pub fn train_step_with_h(
    model: &mut SimClr,
    views: &Tensor,
    optimizer: &mut dyn Optimizer,
    lr: f32,
    loss: &ContrastiveLoss,
) -> Result<(StepStats, Tensor)> {
    model.zero_grad();
    let (h, z) = model.forward(views, true)?;
    if !z.try_all_finite()? {
        return Err(NnError::NonFinite {
            what: "the projections z (the weights or the input overflow)".into(),
        });
    }
    let (loss, dz) = loss.forward_backward(&z)?;
    model.backward(&dz)?;
    check_finite_grads(model)?;
    optimizer.step(model, lr)?;
    crate::buffers::end_step();
    Ok((StepStats { loss, lr }, h))
}

/// An error naming the first parameter whose gradient holds NaN or infinity (the update must not
/// run: it would spread them into the weights).
pub(crate) fn check_finite_grads(model: &mut SimClr) -> Result<()> {
    let (mut names, mut grads) = (Vec::new(), Vec::new());
    model.for_each_param(&mut |name, p| {
        names.push(name.to_string());
        // Shares the storage for the check only: dropped before anything writes a gradient.
        grads.push(p.grad.clone());
    });
    let finite = crate::tensor::all_finite_each(&grads)?;
    drop(grads);
    match finite.iter().position(|f| !f) {
        Some(i) => Err(NnError::NonFinite {
            what: format!("gradient of {}", names[i]),
        }),
        None => Ok(()),
    }
}
