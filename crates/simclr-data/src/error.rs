//! The error type of the crate.

use std::path::PathBuf;

/// Everything that can go wrong while reading, decoding or augmenting data.
///
/// Every variant that concerns an input names it (a file path, or a data set entry such as
/// `data_batch_1.bin[image 17]`), so a bad file in a folder of a million is easy to find.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum DataError {
    /// A file or folder could not be read.
    #[error("{}: {err}", path.display())]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The underlying error.
        #[source]
        err: std::io::Error,
    },
    /// An image could not be decoded (truncated, corrupt, or an unknown format).
    #[error("{file}: cannot decode image: {message}")]
    Decode {
        /// The file (or entry) the image came from.
        file: String,
        /// What the decoder said.
        message: String,
    },
    /// An image is larger than the configured limit.
    #[error(
        "{file}: image of {width}x{height} pixels exceeds the limit of {max_pixels} pixels and \
         {max_side} pixels a side (DecodeOptions)"
    )]
    TooLarge {
        /// The file (or entry).
        file: String,
        /// Its width.
        width: u32,
        /// Its height.
        height: u32,
        /// The pixel limit in force.
        max_pixels: u64,
        /// The side limit in force.
        max_side: u32,
    },
    /// A binary data file (CIFAR, STL-10, IDX) is malformed: wrong length, bad magic number,
    /// label out of range, ...
    #[error("{file}: {message}")]
    Format {
        /// The file.
        file: String,
        /// What is wrong.
        message: String,
    },
    /// A folder holds no usable images (or a class folder holds none).
    #[error("{}: {message}", path.display())]
    Empty {
        /// The folder.
        path: PathBuf,
        /// What was looked for.
        message: String,
    },
    /// An index past the end of a data set.
    #[error("index {index} is out of range for a data set of {len} images")]
    OutOfRange {
        /// The index asked for.
        index: usize,
        /// The length of the data set.
        len: usize,
    },
    /// A configuration value is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A loader worker failed (it panicked or its thread could not start).
    #[error("loader worker failed: {0}")]
    Worker(String),
}

impl DataError {
    /// An [`DataError::Io`] for `path`.
    pub fn io(path: impl Into<PathBuf>, err: std::io::Error) -> DataError {
        DataError::Io {
            path: path.into(),
            err,
        }
    }

    /// A [`DataError::Format`] for `file`.
    pub fn format(file: impl std::fmt::Display, message: impl Into<String>) -> DataError {
        DataError::Format {
            file: file.to_string(),
            message: message.into(),
        }
    }

    /// Whether the error concerns one input item (a bad image or entry) rather than the whole
    /// data set or the configuration: these are the errors [`crate::ErrorPolicy::Skip`] skips.
    pub fn is_item_error(&self) -> bool {
        matches!(
            self,
            DataError::Decode { .. }
                | DataError::TooLarge { .. }
                | DataError::Format { .. }
                | DataError::Io { .. }
        )
    }
}
