//! MNIST and Fashion-MNIST in the IDX format, plain or gzip-compressed.

use std::io::Read;
use std::path::{Path, PathBuf};

use crate::dataset::check_index;
use crate::{DataError, Dataset, Image, Split};

/// MNIST's class names.
pub const MNIST_CLASSES: [&str; 10] = ["0", "1", "2", "3", "4", "5", "6", "7", "8", "9"];

/// Fashion-MNIST's class names.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// Largest IDX payload read (after decompression): 4 GiB.
const MAX_IDX_BYTES: u64 = 4 << 30;

/// An IDX array of unsigned bytes (the only element type MNIST uses).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IdxArray {
    /// The dimensions, outermost first (images: count, rows, columns; labels: count).
    pub dims: Vec<usize>,
    /// The elements, row-major.
    pub data: Vec<u8>,
}

/// Parses an IDX file held in memory (already decompressed): the magic `00 00 08 n`, `n`
/// big-endian u32 dimensions, then the bytes. A bad magic, an element type other than
/// unsigned byte, or a length that does not match the dimensions is a [`DataError::Format`].
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray, DataError> {
    if bytes.len() < 4 || bytes[0] != 0 || bytes[1] != 0 {
        return Err(DataError::format(
            name,
            "not an IDX file (bad magic number)",
        ));
    }
    if bytes[2] != 0x08 {
        return Err(DataError::format(
            name,
            format!(
                "IDX element type 0x{:02x} is not supported (only unsigned bytes, 0x08)",
                bytes[2]
            ),
        ));
    }
    let ndims = bytes[3] as usize;
    if ndims == 0 {
        return Err(DataError::format(name, "IDX file with no dimension"));
    }
    let header = 4 + 4 * ndims;
    if bytes.len() < header {
        return Err(DataError::format(
            name,
            format!("truncated IDX header: {} bytes", bytes.len()),
        ));
    }
    let mut dims = Vec::with_capacity(ndims);
    let mut count: usize = 1;
    for d in 0..ndims {
        let o = 4 + 4 * d;
        let v = u32::from_be_bytes([bytes[o], bytes[o + 1], bytes[o + 2], bytes[o + 3]]) as usize;
        count = count
            .checked_mul(v)
            .ok_or_else(|| DataError::format(name, "IDX dimensions overflow"))?;
        dims.push(v);
    }
    let have = bytes.len() - header;
    if have != count {
        return Err(DataError::format(
            name,
            format!("IDX dimensions {dims:?} need {count} data bytes, the file has {have}"),
        ));
    }
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Decompresses `bytes` when they are gzip (by their magic number), else returns them as they are.
pub fn maybe_gunzip(bytes: Vec<u8>, name: &str) -> Result<Vec<u8>, DataError> {
    if bytes.len() >= 2 && bytes[0] == 0x1f && bytes[1] == 0x8b {
        let mut out = Vec::new();
        flate2::read::MultiGzDecoder::new(&bytes[..])
            .take(MAX_IDX_BYTES + 1)
            .read_to_end(&mut out)
            .map_err(|e| DataError::format(name, format!("bad gzip data: {e}")))?;
        if out.len() as u64 > MAX_IDX_BYTES {
            return Err(DataError::format(name, "decompresses to more than 4 GiB"));
        }
        Ok(out)
    } else {
        Ok(bytes)
    }
}

/// Reads an IDX file, plain or gzip-compressed.
pub fn read_idx(path: &Path) -> Result<IdxArray, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    let name = path.display().to_string();
    parse_idx(&maybe_gunzip(bytes, &name)?, &name)
}

/// Which of the MNIST-format data sets (their files are alike; the class names differ).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum MnistKind {
    /// Handwritten digits.
    Digits,
    /// Zalando's Fashion-MNIST.
    Fashion,
}

/// MNIST or Fashion-MNIST, held in memory as grayscale (each image is returned as RGB with
/// three equal channels).
#[derive(Clone, Debug)]
pub struct Mnist {
    pixels: Vec<u8>,
    labels: Vec<u8>,
    rows: u32,
    cols: u32,
    classes: Vec<String>,
}

fn find_file(dir: &Path, stems: &[&str]) -> Result<PathBuf, DataError> {
    for stem in stems {
        for ext in ["", ".gz"] {
            let p = dir.join(format!("{stem}{ext}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::io(
        dir.join(format!("{}[.gz]", stems[0])),
        std::io::Error::new(std::io::ErrorKind::NotFound, "file not found"),
    ))
}

impl Mnist {
    /// Opens a split in `dir`, holding `train-images-idx3-ubyte[.gz]`,
    /// `train-labels-idx1-ubyte[.gz]`, `t10k-images-idx3-ubyte[.gz]` and
    /// `t10k-labels-idx1-ubyte[.gz]` (the `.`-separated spelling `train-images.idx3-ubyte` is
    /// found too).
    pub fn open(dir: &Path, split: Split, kind: MnistKind) -> Result<Mnist, DataError> {
        let prefix = match split {
            Split::Train => "train",
            Split::Test => "t10k",
            Split::Unlabelled => {
                return Err(DataError::Config("MNIST has no unlabelled split".into()))
            }
        };
        let images = find_file(
            dir,
            &[
                &format!("{prefix}-images-idx3-ubyte"),
                &format!("{prefix}-images.idx3-ubyte"),
            ],
        )?;
        let labels = find_file(
            dir,
            &[
                &format!("{prefix}-labels-idx1-ubyte"),
                &format!("{prefix}-labels.idx1-ubyte"),
            ],
        )?;
        let img = read_idx(&images)?;
        let lab = read_idx(&labels)?;
        Mnist::from_idx(
            img,
            lab,
            kind,
            &images.display().to_string(),
            &labels.display().to_string(),
        )
    }

    /// A data set from parsed IDX arrays (images `[n, rows, cols]`, labels `[n]`, each below
    /// 10); the names are used in errors.
    pub fn from_idx(
        images: IdxArray,
        labels: IdxArray,
        kind: MnistKind,
        images_name: &str,
        labels_name: &str,
    ) -> Result<Mnist, DataError> {
        if images.dims.len() != 3 || images.dims[1] == 0 || images.dims[2] == 0 {
            return Err(DataError::format(
                images_name,
                format!(
                    "images need 3 non-empty dimensions (count, rows, columns), got {:?}",
                    images.dims
                ),
            ));
        }
        if labels.dims.len() != 1 {
            return Err(DataError::format(
                labels_name,
                format!("labels need 1 dimension, got {:?}", labels.dims),
            ));
        }
        if labels.dims[0] != images.dims[0] {
            return Err(DataError::format(
                labels_name,
                format!(
                    "{} labels for {} images in {images_name}",
                    labels.dims[0], images.dims[0]
                ),
            ));
        }
        if let Some(i) = labels.data.iter().position(|&l| l >= 10) {
            return Err(DataError::format(
                labels_name,
                format!("label {i} is {}, expected 0 to 9", labels.data[i]),
            ));
        }
        let (rows, cols) = (images.dims[1], images.dims[2]);
        if rows > u16::MAX as usize || cols > u16::MAX as usize {
            return Err(DataError::format(
                images_name,
                format!("images of {rows}x{cols} are too large"),
            ));
        }
        let names: &[&str] = match kind {
            MnistKind::Digits => &MNIST_CLASSES,
            MnistKind::Fashion => &FASHION_MNIST_CLASSES,
        };
        Ok(Mnist {
            pixels: images.data,
            labels: labels.data,
            rows: rows as u32,
            cols: cols as u32,
            classes: names.iter().map(|s| s.to_string()).collect(),
        })
    }

    /// The grayscale pixels of image `index` (`rows x cols` bytes).
    pub fn gray(&self, index: usize) -> Option<&[u8]> {
        let n = (self.rows * self.cols) as usize;
        self.pixels.get(index * n..(index + 1) * n)
    }
}

impl Dataset for Mnist {
    fn len(&self) -> usize {
        self.labels.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.len())?;
        let g = self.gray(index).ok_or(DataError::OutOfRange {
            index,
            len: self.len(),
        })?;
        Image::from_gray(self.cols, self.rows, g)
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.labels.get(index).map(|&l| l as u32)
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
}
