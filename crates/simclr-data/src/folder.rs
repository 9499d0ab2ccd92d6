//! Folders of image files: `root/<class>/*` (labelled) or a folder of images (unlabelled).

use std::path::{Path, PathBuf};

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
