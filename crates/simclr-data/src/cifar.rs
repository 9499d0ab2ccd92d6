//! CIFAR-10 in its official binary format (`cifar-10-batches-bin`).

use std::path::{Path, PathBuf};

use crate::dataset::check_index;
use crate::{DataError, Dataset, Image, Split};

/// CIFAR-10's class names, by label.
pub const CIFAR10_CLASSES: [&str; 10] = [
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
];

// The files `Cifar10::open` reads, for messages about a folder that lacks them.
const CIFAR10_LAYOUT: &str = "CIFAR-10 (binary version) expects data_batch_1.bin ... \
    data_batch_5.bin and test_batch.bin in the folder given, or in cifar-10-batches-bin/ under it";

/// Bytes of one record of a CIFAR-10 binary batch: a label byte and 3 x 32 x 32 planar pixels.
pub const CIFAR10_RECORD: usize = 1 + 3 * 32 * 32;

/// Parses one CIFAR-10 binary batch file (`data_batch_N.bin`, `test_batch.bin`): a sequence of
/// [`CIFAR10_RECORD`]-byte records. Returns (planar pixels, labels). A length that is not a
/// multiple of the record, an empty file, or a label above 9 is a [`DataError::Format`]
/// naming `name`.
pub fn parse_cifar10_batch(bytes: &[u8], name: &str) -> Result<(Vec<u8>, Vec<u8>), DataError> {
    if bytes.is_empty() || bytes.len() % CIFAR10_RECORD != 0 {
        return Err(DataError::format(
            name,
            format!(
                "a CIFAR-10 binary batch holds records of {CIFAR10_RECORD} bytes, but the file \
                 has {} bytes",
                bytes.len()
            ),
        ));
    }
    let n = bytes.len() / CIFAR10_RECORD;
    let mut pixels = Vec::with_capacity(n * (CIFAR10_RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, rec) in bytes.chunks_exact(CIFAR10_RECORD).enumerate() {
        if rec[0] >= 10 {
            return Err(DataError::format(
                name,
                format!("record {i} has label {}, CIFAR-10 has 10 classes", rec[0]),
            ));
        }
        labels.push(rec[0]);
        pixels.extend_from_slice(&rec[1..]);
    }
    Ok((pixels, labels))
}

/// CIFAR-10 read from the official binary batches, held in memory (150 MB for the training split).
#[derive(Clone, Debug)]
pub struct Cifar10 {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    classes: Vec<String>,
}

impl Cifar10 {
    /// Reads a split from `dir` (the folder holding `data_batch_1.bin` ... `data_batch_5.bin`
    /// and `test_batch.bin`, or its parent holding `cifar-10-batches-bin/`).
    pub fn open(dir: &Path, split: Split) -> Result<Cifar10, DataError> {
        let dir = if dir.join("cifar-10-batches-bin").is_dir() {
            dir.join("cifar-10-batches-bin")
        } else {
            dir.to_path_buf()
        };
        let files: Vec<PathBuf> = match split {
            Split::Train => (1..=5)
                .map(|i| dir.join(format!("data_batch_{i}.bin")))
                .collect(),
            Split::Test => vec![dir.join("test_batch.bin")],
            Split::Unlabelled => {
                return Err(DataError::Config("CIFAR-10 has no unlabelled split".into()))
            }
        };
        let mut out = Cifar10 {
            pixels: Vec::new(),
            labels: Vec::new(),
            classes: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        };
        for f in files {
            let bytes = std::fs::read(&f).map_err(|e| {
                // A missing batch usually means the wrong folder: say what belongs there.
                if e.kind() == std::io::ErrorKind::NotFound {
                    DataError::io(
                        &f,
                        std::io::Error::new(e.kind(), format!("{e}; {CIFAR10_LAYOUT}")),
                    )
                } else {
                    DataError::io(&f, e)
                }
            })?;
            let (p, l) = parse_cifar10_batch(&bytes, &f.display().to_string())?;
            out.pixels.extend_from_slice(&p);
            out.labels.extend_from_slice(&l);
        }
        Ok(out)
    }

    /// A data set from batch files already in memory (each as [`parse_cifar10_batch`] reads it).
    pub fn from_batches(batches: &[(&[u8], &str)]) -> Result<Cifar10, DataError> {
        let mut out = Cifar10 {
            pixels: Vec::new(),
            labels: Vec::new(),
            classes: CIFAR10_CLASSES.iter().map(|s| s.to_string()).collect(),
        };
        for (bytes, name) in batches {
            let (p, l) = parse_cifar10_batch(bytes, name)?;
            out.pixels.extend_from_slice(&p);
            out.labels.extend_from_slice(&l);
        }
        Ok(out)
    }
}

impl Dataset for Cifar10 {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.len())?;
        let n = CIFAR10_RECORD - 1;
        Image::from_planar(32, 32, &self.pixels[index * n..(index + 1) * n])
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.labels.get(index).map(|&l| l as u32)
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
}
