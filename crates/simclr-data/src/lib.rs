//! Data sets and augmentation of SimCLR.
