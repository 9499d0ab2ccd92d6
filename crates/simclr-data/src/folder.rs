//! Folders of image files: `root/<class>/*` (labelled) or a folder of images (unlabelled).

use std::io::BufReader;
use std::path::{Path, PathBuf};

use image::ImageReader;
use rayon::prelude::*;

use crate::dataset::check_index;
use crate::{read_image, DataError, Dataset, DecodeOptions, ErrorPolicy, Image};

/// File extensions (lower case) taken as images; others (a README, a `.DS_Store`) are ignored.
pub const IMAGE_EXTENSIONS: [&str; 9] = [
    "jpg", "jpeg", "png", "webp", "bmp", "gif", "tif", "tiff", "jfif",
];

/// How to open an image folder.
#[derive(Clone, Debug, Default)]
pub struct FolderOptions {
    /// Limits of the decoder.
    pub decode: DecodeOptions,
    /// With [`ErrorPolicy::Skip`], a class folder without images is kept as a class with no
    /// images (with a warning) instead of being an error.
    pub policy: ErrorPolicy,
}

/// Images in a folder, decoded on demand (by the loader's threads).
///
/// Labelled: `root/<class>/**/<file>`, classes sorted by name and numbered from 0 (as
/// torchvision's `ImageFolder`). Unlabelled: every image file under `root`. Files are sorted by
/// path, hidden files (`.name`) and files of other extensions ignored.
#[derive(Clone, Debug)]
pub struct ImageFolder {
    root: PathBuf,
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    classes: Vec<String>,
    decode: DecodeOptions,
    empty_classes: usize,
}

fn is_hidden(p: &Path) -> bool {
    p.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn is_image_file(p: &Path) -> bool {
    !is_hidden(p)
        && p.extension()
            .and_then(|e| e.to_str())
            .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

fn read_dir_sorted(dir: &Path) -> Result<Vec<PathBuf>, DataError> {
    let rd = std::fs::read_dir(dir).map_err(|e| DataError::io(dir, e))?;
    let mut out = Vec::new();
    for entry in rd {
        let entry = entry.map_err(|e| DataError::io(dir, e))?;
        out.push(entry.path());
    }
    out.sort();
    Ok(out)
}

/// Reads only the header of the image file at `path`: it must exist, be of a known format
/// and have a size within `opts`. The errors are those [`read_image`] gives for the same faults;
/// a file whose pixels are corrupt past the header passes.
fn check_header(path: &Path, opts: &DecodeOptions) -> Result<(), DataError> {
    let name = path.display().to_string();
    let decode_err = |message: String| DataError::Decode {
        file: name.clone(),
        message,
    };
    let file = std::fs::File::open(path).map_err(|e| DataError::io(path, e))?;
    let len = file.metadata().map_err(|e| DataError::io(path, e))?.len();
    if len == 0 {
        return Err(decode_err("the file is empty".into()));
    }
    // A decoder that panics on a malformed header must not take the caller down.
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let mut reader = ImageReader::new(BufReader::new(file))
            .with_guessed_format()
            .map_err(|e| DataError::io(path, e))?;
        if reader.format().is_none() {
            return Err(decode_err("not a known image format".into()));
        }
        // Our own limits are checked below, as `read_image` does.
        reader.no_limits();
        let (width, height) = reader
            .into_dimensions()
            .map_err(|e| decode_err(e.to_string()))?;
        crate::image::check_size(&name, width, height, opts)
    }));
    match result {
        Ok(r) => r,
        Err(_) => Err(decode_err("the decoder panicked on this input".into())),
    }
}

/// Every image file under `dir`, recursively, sorted.
fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), DataError> {
    for p in read_dir_sorted(dir)? {
        if is_hidden(&p) {
            continue;
        }
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if is_image_file(&p) {
            out.push(p);
        }
    }
    Ok(())
}

impl ImageFolder {
    /// Opens `root` as labelled when it has subfolders holding images, else as unlabelled.
    pub fn open(root: &Path, opts: &FolderOptions) -> Result<ImageFolder, DataError> {
        let has_class_dirs = read_dir_sorted(root)?
            .into_iter()
            .any(|p| p.is_dir() && !is_hidden(&p));
        if has_class_dirs {
            ImageFolder::labelled(root, opts)
        } else {
            ImageFolder::unlabelled(root, opts)
        }
    }

    /// Opens `root/<class>/**` as a labelled data set. A root without class folders or without
    /// any image is a [`DataError::Empty`]; so is a class folder without images, unless
    /// `opts.policy` is [`ErrorPolicy::Skip`].
    pub fn labelled(root: &Path, opts: &FolderOptions) -> Result<ImageFolder, DataError> {
        let class_dirs: Vec<PathBuf> = read_dir_sorted(root)?
            .into_iter()
            .filter(|p| p.is_dir() && !is_hidden(p))
            .collect();
        if class_dirs.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                message: "no class folders (expected root/<class>/<image files>)".into(),
            });
        }
        let mut files = Vec::new();
        let mut labels = Vec::new();
        let mut classes = Vec::new();
        let mut empty_classes = 0;
        for (label, dir) in class_dirs.iter().enumerate() {
            let before = files.len();
            collect_images(dir, &mut files)?;
            if files.len() == before {
                if opts.policy == ErrorPolicy::Skip {
                    tracing::warn!("class folder {} has no images", dir.display());
                    empty_classes += 1;
                } else {
                    return Err(DataError::Empty {
                        path: dir.clone(),
                        message: "class folder without image files".into(),
                    });
                }
            }
            labels.resize(files.len(), label as u32);
            classes.push(
                dir.file_name()
                    .map(|n| n.to_string_lossy().into_owned())
                    .unwrap_or_default(),
            );
        }
        if files.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                message: "no image files in any class folder".into(),
            });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
            labels: Some(labels),
            classes,
            decode: opts.decode,
            empty_classes,
        })
    }

    /// Opens every image file under `root` (recursively) as an unlabelled data set. No image
    /// is a [`DataError::Empty`].
    pub fn unlabelled(root: &Path, opts: &FolderOptions) -> Result<ImageFolder, DataError> {
        let mut files = Vec::new();
        collect_images(root, &mut files)?;
        if files.is_empty() {
            return Err(DataError::Empty {
                path: root.to_path_buf(),
                message: format!("no image files ({})", IMAGE_EXTENSIONS.join(", ")),
            });
        }
        Ok(ImageFolder {
            root: root.to_path_buf(),
            files,
            labels: None,
            classes: Vec::new(),
            decode: opts.decode,
            empty_classes: 0,
        })
    }

    /// The folder.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// The image files, in data set order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    /// Checks, on `threads` threads (0: one per core), that every file exists and has a readable
    /// image header within the decoder's limits, without decoding pixels: cheap enough for
    /// folders of millions of images, so a bad file is found before any work depends on it.
    /// Returns the index and error of each file that fails, in data set order (empty: all
    /// passed). A file corrupt past its header is only found when it is decoded.
    pub fn check(&self, threads: usize) -> Result<Vec<(usize, DataError)>, DataError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("simclr-check-{i}"))
            .build()
            .map_err(|e| DataError::Worker(format!("cannot start the checking threads: {e}")))?;
        Ok(pool.install(|| {
            self.files
                .par_iter()
                .enumerate()
                .filter_map(|(i, p)| check_header(p, &self.decode).err().map(|e| (i, e)))
                .collect()
        }))
    }

    /// The same folder without the images at `indices` (as [`ImageFolder::check`] returns
    /// them): classes and labels stay as they were. Leaving no image is a
    /// [`DataError::Empty`] naming the folder.
    pub fn without(&self, indices: &[usize]) -> Result<ImageFolder, DataError> {
        let drop: std::collections::HashSet<usize> = indices.iter().copied().collect();
        let keep = |i: &usize| !drop.contains(i);
        let files: Vec<PathBuf> = (0..self.files.len())
            .filter(keep)
            .map(|i| self.files[i].clone())
            .collect();
        if files.is_empty() {
            return Err(DataError::Empty {
                path: self.root.clone(),
                message: format!(
                    "none of its {} image files can be read; fix or replace them, or point the \
                     data set at another folder",
                    self.files.len()
                ),
            });
        }
        let labels = self
            .labels
            .as_ref()
            .map(|l| (0..l.len()).filter(keep).map(|i| l[i]).collect());
        Ok(ImageFolder {
            root: self.root.clone(),
            files,
            labels,
            classes: self.classes.clone(),
            decode: self.decode,
            empty_classes: self.empty_classes,
        })
    }

    /// Number of class folders without images that were kept (with [`ErrorPolicy::Skip`]).
    pub fn empty_classes(&self) -> usize {
        self.empty_classes
    }
}

impl Dataset for ImageFolder {
    fn len(&self) -> usize {
        self.files.len()
    }
    fn image(&self, index: usize) -> Result<Image, DataError> {
        check_index(index, self.files.len())?;
        read_image(&self.files[index], &self.decode)
    }
    fn label(&self, index: usize) -> Option<u32> {
        self.labels.as_ref()?.get(index).copied()
    }
    fn class_names(&self) -> &[String] {
        &self.classes
    }
    fn describe(&self, index: usize) -> String {
        match self.files.get(index) {
            Some(p) => p.display().to_string(),
            None => format!("image {index}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn png(path: &Path) -> Vec<u8> {
        let img = image::RgbImage::from_fn(8, 8, |x, y| image::Rgb([x as u8 * 30, y as u8, 7]));
        let mut out = std::io::Cursor::new(Vec::new());
        img.write_to(&mut out, image::ImageFormat::Png).unwrap();
        let bytes = out.into_inner();
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        std::fs::write(path, &bytes).unwrap();
        bytes
    }

    #[test]
    fn check_finds_bad_headers_and_without_leaves_them_out() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path();
        let bytes = png(&root.join("a/0.png"));
        png(&root.join("b/1.png"));
        std::fs::write(root.join("a/2.png"), b"not an image at all").unwrap();
        std::fs::write(root.join("b/3.png"), b"").unwrap();
        // Corrupt past its header: the header check lets it through.
        std::fs::write(root.join("b/4.png"), &bytes[..bytes.len() / 2]).unwrap();
        let ds = ImageFolder::labelled(root, &FolderOptions::default()).unwrap();
        let bad = ds.check(2).unwrap();
        let idx: Vec<usize> = bad.iter().map(|(i, _)| *i).collect();
        assert_eq!(idx, [1, 3]);
        assert!(bad[0].1.to_string().contains("2.png"), "{}", bad[0].1);
        assert!(bad[1].1.to_string().contains("empty"), "{}", bad[1].1);
        let good = ds.without(&idx).unwrap();
        assert_eq!(good.len(), 3);
        assert_eq!(good.label(1), Some(1));
        assert_eq!(good.class_names(), ds.class_names());
        let e = ds.without(&[0, 1, 2, 3, 4]).unwrap_err();
        assert!(matches!(e, DataError::Empty { .. }), "{e}");
        assert!(e.to_string().contains("none of its 5"), "{e}");
    }
}
