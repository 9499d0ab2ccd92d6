//! STL-10 in its official binary format (`stl10_binary/`), with the unlabelled split.

use std::fs::File;
use std::path::{Path, PathBuf};

use crate::dataset::check_index;
use crate::{DataError, Dataset, Image, Split};

/// STL-10's class names, by label (the files number them 1 to 10; labels here are 0 to 9).
pub const STL10_CLASSES: [&str; 10] = [
    "airplane", "bird", "car", "cat", "deer", "dog", "horse", "monkey", "ship", "truck",
];

/// Side of an STL-10 image.
pub const STL10_SIDE: u32 = 96;

/// Bytes of one STL-10 image: 3 planes of 96 x 96, each stored column by column.
pub const STL10_IMAGE_BYTES: usize = 3 * 96 * 96;

/// Converts one STL-10 record (3 planes, column-major, as the files store them) to an image.
pub fn stl10_image(record: &[u8]) -> Result<Image, DataError> {
    if record.len() != STL10_IMAGE_BYTES {
        return Err(DataError::Config(format!(
            "an STL-10 image has {STL10_IMAGE_BYTES} bytes, got {}",
            record.len()
        )));
    }
    let s = STL10_SIDE as usize;
    let mut data = vec![0u8; STL10_IMAGE_BYTES];
    for c in 0..3 {
        let plane = &record[c * s * s..(c + 1) * s * s];
        for x in 0..s {
            for y in 0..s {
                data[3 * (y * s + x) + c] = plane[x * s + y];
            }
        }
    }
    Image::new(STL10_SIDE, STL10_SIDE, data)
}

/// Checks the length of an STL-10 image file (`*_X.bin`) of `len` bytes and returns how many
/// images it holds.
pub fn stl10_image_count(len: u64, name: &str) -> Result<usize, DataError> {
    if len == 0 || len % STL10_IMAGE_BYTES as u64 != 0 {
        return Err(DataError::format(
            name,
            format!(
                "an STL-10 image file holds images of {STL10_IMAGE_BYTES} bytes, but the file \
                 has {len} bytes"
            ),
        ));
    }
    Ok((len / STL10_IMAGE_BYTES as u64) as usize)
}

/// Parses an STL-10 label file (`*_y.bin`: one byte a label, 1 to 10) into labels 0 to 9.
pub fn parse_stl10_labels(bytes: &[u8], name: &str) -> Result<Vec<u8>, DataError> {
    if bytes.is_empty() {
        return Err(DataError::format(name, "the label file is empty"));
    }
    bytes
        .iter()
        .enumerate()
        .map(|(i, &b)| {
            if (1..=10).contains(&b) {
                Ok(b - 1)
            } else {
                Err(DataError::format(
                    name,
                    format!("label {i} is {b}; STL-10 labels are 1 to 10"),
                ))
            }
        })
        .collect()
}

/// STL-10 read lazily from the official binary files: the images stay on disk and are read on
/// demand (the unlabelled split is 2.7 GB); the labels are read at open.
#[derive(Debug)]
pub struct Stl10 {
    file: File,
    path: PathBuf,
    count: usize,
    labels: Option<Vec<u8>>,
    classes: Vec<String>,
}

impl Stl10 {
    /// Opens a split in `dir` (the folder holding `train_X.bin`, `train_y.bin`, `test_X.bin`,
    /// `test_y.bin`, `unlabeled_X.bin`, or its parent holding `stl10_binary/`). The image
    /// file's length must be a whole number of images and match the label count.
    pub fn open(dir: &Path, split: Split) -> Result<Stl10, DataError> {
        let dir = if dir.join("stl10_binary").is_dir() {
            dir.join("stl10_binary")
        } else {
            dir.to_path_buf()
        };
        let (x, y) = match split {
            Split::Train => ("train_X.bin", Some("train_y.bin")),
            Split::Test => ("test_X.bin", Some("test_y.bin")),
            Split::Unlabelled => ("unlabeled_X.bin", None),
        };
        let path = dir.join(x);
        let file = File::open(&path).map_err(|e| DataError::io(&path, e))?;
        let len = file.metadata().map_err(|e| DataError::io(&path, e))?.len();
        let count = stl10_image_count(len, &path.display().to_string())?;
        let labels = match y {
            Some(y) => {
                let lp = dir.join(y);
                let bytes = std::fs::read(&lp).map_err(|e| DataError::io(&lp, e))?;
                let labels = parse_stl10_labels(&bytes, &lp.display().to_string())?;
                if labels.len() != count {
                    return Err(DataError::format(
                        lp.display(),
                        format!("{} labels for {count} images in {x}", labels.len()),
                    ));
                }
                Some(labels)
            }
            None => None,
        };
        Ok(Stl10 {
            file,
            path,
            count,
            labels,
            classes: STL10_CLASSES.iter().map(|s| s.to_string()).collect(),
        })
    }

    fn read_record(&self, index: usize, buf: &mut [u8]) -> std::io::Result<()> {
        let offset = (index * STL10_IMAGE_BYTES) as u64;
        #[cfg(unix)]
        {
            use std::os::unix::fs::FileExt;
            self.file.read_exact_at(buf, offset)
        }
        #[cfg(not(unix))]
        {
            use std::io::{Read, Seek, SeekFrom};
            let mut f = File::open(&self.path)?;
            f.seek(SeekFrom::Start(offset))?;
            f.read_exact(buf)
        }
    }
}

impl Dataset for Stl10 {
    fn len(&self) -> usize {
        self.count
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.count)?;
        let mut buf = vec![0u8; STL10_IMAGE_BYTES];
        self.read_record(index, &mut buf)
            .map_err(|e| DataError::io(&self.path, e))?;
        stl10_image(&buf)
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.labels.as_ref()?.get(index).map(|&l| l as u32)
    }
    fn class_names(&self) -> &[String] {
        if self.labels.is_some() {
            &self.classes
        } else {
            &[]
        }
    }
    fn describe(&self, index: usize) -> String {
        format!("{}[image {index}]", self.path.display())
    }
}
