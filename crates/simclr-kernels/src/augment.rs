//! Per-view augmentation parameters, drawn on the CPU and applied by the CPU or GPU path.
