//! The binary readers (CIFAR-10, STL-10, IDX), the image decoder and image folders, on small
//! files written here in the official formats, and on bad input of every kind.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use image::{ImageBuffer, ImageFormat, Luma, Rgb, Rgba};
use proptest::prelude::*;
use simclr_data::*;

fn write(path: &Path, bytes: &[u8]) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, bytes).unwrap();
}

/// `n` CIFAR records: label `(first + i) % 10`, pixel (c, y, x) = (i + 3c + y + 2x) % 256.
fn cifar_records(n: usize, first: usize) -> Vec<u8> {
    let mut out = Vec::new();
    for i in 0..n {
        out.push(((first + i) % 10) as u8);
        for c in 0..3 {
            for y in 0..32 {
                for x in 0..32 {
                    out.push(((i + 3 * c + y + 2 * x) % 256) as u8);
                }
            }
        }
    }
    out
}

#[test]
fn cifar10_binary_batches_read_with_labels_and_pixels() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cifar-10-batches-bin");
    for b in 1..=5 {
        write(
            &root.join(format!("data_batch_{b}.bin")),
            &cifar_records(7, b * 7),
        );
    }
    write(&root.join("test_batch.bin"), &cifar_records(4, 0));
    let train = Cifar10::open(dir.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 35);
    assert_eq!(train.label(0), Some(7));
    assert_eq!(train.label(34), Some((35 + 6) % 10));
    assert_eq!(train.class_names()[9], "truck");
    let test = Cifar10::open(&root, Split::Test).unwrap();
    assert_eq!(test.len(), 4);
    let img = test.image(2).unwrap();
    assert_eq!((img.width(), img.height()), (32, 32));
    // (x, y) = (5, 1) of record 2: red 2 + 1 + 10, green + 3, blue + 6.
    assert_eq!(img.pixel(5, 1), [13, 16, 19]);
    assert!(matches!(test.image(4), Err(DataError::OutOfRange { .. })));
}

#[test]
fn cifar10_bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let mut short = cifar_records(3, 0);
    short.pop();
    let p = dir.path().join("test_batch.bin");
    write(&p, &short);
    let e = Cifar10::open(dir.path(), Split::Test).unwrap_err();
    assert!(matches!(e, DataError::Format { .. }), "{e}");
    assert!(
        e.to_string().contains("test_batch.bin") && e.to_string().contains("3073"),
        "{e}"
    );
    let mut bad_label = cifar_records(2, 0);
    bad_label[3073] = 10;
    write(&p, &bad_label);
    let e = Cifar10::open(dir.path(), Split::Test).unwrap_err();
    assert!(e.to_string().contains("label 10"), "{e}");
    write(&p, &[]);
    assert!(Cifar10::open(dir.path(), Split::Test).is_err());
    // The training files are missing.
    let e = Cifar10::open(dir.path(), Split::Train).unwrap_err();
    assert!(
        matches!(e, DataError::Io { .. }) && e.to_string().contains("data_batch_1.bin"),
        "{e}"
    );
    assert!(Cifar10::open(dir.path(), Split::Unlabelled).is_err());
}

/// An STL-10 record: plane c holds, at column-major index x * 96 + y, (c * 50 + x + 2 y) % 256.
fn stl_record(shift: usize) -> Vec<u8> {
    let mut r = vec![0u8; STL10_IMAGE_BYTES];
    for c in 0..3 {
        for x in 0..96 {
            for y in 0..96 {
                r[c * 9216 + x * 96 + y] = ((shift + c * 50 + x + 2 * y) % 256) as u8;
            }
        }
    }
    r
}

#[test]
fn stl10_binary_reads_column_major_images_labels_and_unlabelled_split() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("stl10_binary");
    let x: Vec<u8> = (0..3).flat_map(stl_record).collect();
    write(&root.join("train_X.bin"), &x);
    write(&root.join("train_y.bin"), &[1, 10, 4]);
    write(&root.join("unlabeled_X.bin"), &stl_record(9).repeat(2));
    let train = Stl10::open(dir.path(), Split::Train).unwrap();
    assert_eq!(train.len(), 3);
    assert_eq!(
        (train.label(0), train.label(1), train.label(2)),
        (Some(0), Some(9), Some(3))
    );
    assert_eq!(train.class_names()[2], "car");
    let img = train.image(1).unwrap();
    assert_eq!((img.width(), img.height()), (96, 96));
    // (x, y) = (10, 3) of image 1: red 1 + 10 + 6, green + 50, blue + 100.
    assert_eq!(img.pixel(10, 3), [17, 67, 117]);
    let unl = Stl10::open(&root, Split::Unlabelled).unwrap();
    assert_eq!(unl.len(), 2);
    assert_eq!(unl.label(0), None);
    assert_eq!(unl.num_classes(), 0);
    assert_eq!(unl.image(1).unwrap().pixel(0, 0), [9, 59, 109]);
}

#[test]
fn stl10_bad_files_are_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    write(
        &dir.path().join("train_X.bin"),
        &vec![0u8; STL10_IMAGE_BYTES + 5],
    );
    write(&dir.path().join("train_y.bin"), &[1]);
    let e = Stl10::open(dir.path(), Split::Train).unwrap_err();
    assert!(e.to_string().contains("train_X.bin"), "{e}");
    write(
        &dir.path().join("train_X.bin"),
        &vec![0u8; 2 * STL10_IMAGE_BYTES],
    );
    let e = Stl10::open(dir.path(), Split::Train).unwrap_err();
    assert!(
        e.to_string().contains("train_y.bin") && e.to_string().contains("1 labels"),
        "{e}"
    );
    write(&dir.path().join("train_y.bin"), &[1, 11]);
    let e = Stl10::open(dir.path(), Split::Train).unwrap_err();
    assert!(e.to_string().contains("11"), "{e}");
    let e = Stl10::open(dir.path(), Split::Test).unwrap_err();
    assert!(e.to_string().contains("test_X.bin"), "{e}");
}

fn idx(magic3: u8, dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut v = vec![0, 0, magic3, dims.len() as u8];
    for d in dims {
        v.extend_from_slice(&d.to_be_bytes());
    }
    v.extend_from_slice(data);
    v
}

fn gz(bytes: &[u8]) -> Vec<u8> {
    let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    e.write_all(bytes).unwrap();
    e.finish().unwrap()
}

#[test]
fn mnist_idx_plain_and_gzip() {
    let dir = tempfile::tempdir().unwrap();
    let pixels: Vec<u8> = (0..5 * 4 * 3).map(|i| i as u8 * 4).collect();
    write(
        &dir.path().join("train-images-idx3-ubyte.gz"),
        &gz(&idx(8, &[5, 4, 3], &pixels)),
    );
    write(
        &dir.path().join("train-labels-idx1-ubyte"),
        &idx(8, &[5], &[3, 1, 4, 1, 5]),
    );
    write(
        &dir.path().join("t10k-images.idx3-ubyte"),
        &idx(8, &[1, 4, 3], &pixels[..12]),
    );
    write(
        &dir.path().join("t10k-labels.idx1-ubyte.gz"),
        &gz(&idx(8, &[1], &[9])),
    );
    let train = Mnist::open(dir.path(), Split::Train, MnistKind::Fashion).unwrap();
    assert_eq!(train.len(), 5);
    assert_eq!(train.label(2), Some(4));
    assert_eq!(train.class_names()[9], "Ankle boot");
    let img = train.image(1).unwrap();
    assert_eq!((img.width(), img.height()), (3, 4));
    // Image 1, (x, y) = (2, 3): element 12 + 3 * 3 + 2 = 23, times 4, gray in all channels.
    assert_eq!(img.pixel(2, 3), [92, 92, 92]);
    let test = Mnist::open(dir.path(), Split::Test, MnistKind::Digits).unwrap();
    assert_eq!((test.len(), test.label(0)), (1, Some(9)));
    assert_eq!(test.class_names()[9], "9");
}

#[test]
fn idx_bad_input_is_an_error_naming_the_file() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (vec![], "magic"),
        (vec![1, 2, 8, 1], "magic"),
        (idx(0x0d, &[2], &[0; 8]), "0x0d"),
        (idx(8, &[4], &[0; 3]), "need 4"),
        (idx(8, &[4], &[0; 5]), "need 4"),
        (vec![0, 0, 8, 3, 0, 0], "truncated"),
        (
            idx(8, &[0xffff_ffff, 0xffff_ffff, 0xffff_ffff], &[]),
            "overflow",
        ),
    ];
    for (bytes, want) in cases {
        let e = parse_idx(&bytes, "some.idx").unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("some.idx") && msg.contains(want),
            "{msg} should contain {want}"
        );
    }
    let mut broken = gz(&idx(8, &[3], &[1, 2, 3]));
    broken.truncate(broken.len() - 6);
    assert!(maybe_gunzip(broken, "x.gz").is_err());
    // Labels that do not match the images, or out of range.
    let images = parse_idx(&idx(8, &[2, 2, 2], &[0; 8]), "i").unwrap();
    let labels = parse_idx(&idx(8, &[3], &[0; 3]), "l").unwrap();
    assert!(Mnist::from_idx(images.clone(), labels, MnistKind::Digits, "i", "l").is_err());
    let labels = parse_idx(&idx(8, &[2], &[0, 10]), "l").unwrap();
    assert!(Mnist::from_idx(images, labels, MnistKind::Digits, "i", "l").is_err());
}

fn encode(img: image::DynamicImage, fmt: ImageFormat) -> Vec<u8> {
    let mut c = std::io::Cursor::new(Vec::new());
    img.write_to(&mut c, fmt).unwrap();
    c.into_inner()
}

#[test]
fn decoder_converts_every_format_and_colour_type_to_rgb() {
    let opts = DecodeOptions::default();
    let rgb = ImageBuffer::from_fn(6, 4, |x, y| Rgb([x as u8 * 40, y as u8 * 60, 7]));
    for fmt in [
        ImageFormat::Png,
        ImageFormat::Bmp,
        ImageFormat::Tiff,
        ImageFormat::WebP,
    ] {
        let bytes = encode(image::DynamicImage::ImageRgb8(rgb.clone()), fmt);
        let img = decode_image(&bytes, "x", &opts).unwrap();
        assert_eq!((img.width(), img.height()), (6, 4), "{fmt:?}");
        assert_eq!(img.pixel(3, 2), [120, 120, 7], "{fmt:?} is lossless");
    }
    let jpeg = encode(
        image::DynamicImage::ImageRgb8(rgb.clone()),
        ImageFormat::Jpeg,
    );
    let img = decode_image(&jpeg, "x.jpg", &opts).unwrap();
    assert_eq!((img.width(), img.height()), (6, 4));
    let gif = encode(
        image::DynamicImage::ImageRgba8(image::DynamicImage::ImageRgb8(rgb).to_rgba8()),
        ImageFormat::Gif,
    );
    assert_eq!(decode_image(&gif, "x.gif", &opts).unwrap().width(), 6);
    // Grayscale: copied to three channels.
    let gray = ImageBuffer::from_fn(3, 3, |x, _| Luma([x as u8 * 100]));
    let img = decode_image(&encode(gray.into(), ImageFormat::Png), "g.png", &opts).unwrap();
    assert_eq!(img.pixel(2, 0), [200, 200, 200]);
    // RGBA: alpha dropped.
    let rgba = ImageBuffer::from_fn(2, 2, |_, _| Rgba([10u8, 20, 30, 0]));
    let img = decode_image(&encode(rgba.into(), ImageFormat::Png), "a.png", &opts).unwrap();
    assert_eq!(img.pixel(1, 1), [10, 20, 30]);
    // 16-bit: scaled to 8 bits.
    let deep = ImageBuffer::from_fn(2, 2, |_, _| Rgb([65535u16, 32896, 0]));
    let img = decode_image(
        &encode(image::DynamicImage::ImageRgb16(deep), ImageFormat::Png),
        "d.png",
        &opts,
    )
    .unwrap();
    assert_eq!(img.pixel(0, 0), [255, 128, 0]);
    // CMYK JPEG (written by Pillow): left half red, right half blue.
    let cmyk = std::fs::read(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/cmyk.jpg"
    ))
    .unwrap();
    let img = decode_image(&cmyk, "cmyk.jpg", &opts).unwrap();
    assert_eq!((img.width(), img.height()), (16, 8));
    let [r, g, b] = img.pixel(2, 4);
    assert!(r > 200 && g < 60 && b < 60, "left {r} {g} {b}");
    let [r, g, b] = img.pixel(13, 4);
    assert!(r < 60 && g < 60 && b > 200, "right {r} {g} {b}");
}

/// A PNG header claiming `w x h` and no pixel data.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    let mut v = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = b"IHDR".to_vec();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    v.extend_from_slice(&13u32.to_be_bytes());
    v.extend_from_slice(&ihdr);
    let mut crc = flate2::Crc::new();
    crc.update(&ihdr);
    v.extend_from_slice(&crc.sum().to_be_bytes());
    // A short IDAT (a few bytes of a zlib stream) and IEND, so the header is complete.
    for (kind, data) in [
        (&b"IDAT"[..], &[0x78u8, 0x9c, 0x63, 0x00][..]),
        (&b"IEND"[..], &[][..]),
    ] {
        v.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut chunk = kind.to_vec();
        chunk.extend_from_slice(data);
        let mut crc = flate2::Crc::new();
        crc.update(&chunk);
        v.extend_from_slice(&chunk);
        v.extend_from_slice(&crc.sum().to_be_bytes());
    }
    v
}

#[test]
fn bad_images_are_clear_errors_not_panics() {
    let opts = DecodeOptions::default();
    let rgb = ImageBuffer::from_fn(64, 48, |x, y| Rgb([x as u8, y as u8, 0]));
    let jpeg = encode(
        image::DynamicImage::ImageRgb8(rgb.clone()),
        ImageFormat::Jpeg,
    );
    let png = encode(image::DynamicImage::ImageRgb8(rgb), ImageFormat::Png);
    for (bytes, name) in [
        (jpeg[..jpeg.len() / 2].to_vec(), "half.jpg"),
        (png[..png.len() - 30].to_vec(), "cut.png"),
        (jpeg[..20].to_vec(), "header.jpg"),
        (b"hello, not an image".to_vec(), "text.jpg"),
        (Vec::new(), "empty.png"),
    ] {
        let e = decode_image(&bytes, name, &opts).unwrap_err();
        assert!(e.to_string().contains(name), "{e}");
        assert!(matches!(e, DataError::Decode { .. }), "{e}");
    }
    // Corrupt bytes in the middle: an error or (JPEG is forgiving) a picture, never a panic.
    let mut corrupt = jpeg.clone();
    for i in (200..corrupt.len() - 10).step_by(7) {
        corrupt[i] ^= 0x5a;
    }
    let _ = decode_image(&corrupt, "corrupt.jpg", &opts);
    // 20000 x 20000: refused from the header, before any allocation.
    let e = decode_image(&png_header(20000, 20000), "huge.png", &opts).unwrap_err();
    assert!(
        matches!(
            e,
            DataError::TooLarge {
                width: 20000,
                height: 20000,
                ..
            }
        ),
        "{e}"
    );
    assert!(e.to_string().contains("huge.png"));
    // Under a larger limit the same header is a decode error (no pixel data), not a panic.
    let big = DecodeOptions {
        max_pixels: 1 << 40,
        max_side: 1 << 20,
    };
    assert!(decode_image(&png_header(5000, 5000), "big.png", &big).is_err());
    // 1 x 1 is a fine image.
    let one = encode(
        image::DynamicImage::ImageRgb8(ImageBuffer::from_pixel(1, 1, Rgb([1, 2, 3]))),
        ImageFormat::Png,
    );
    assert_eq!(
        decode_image(&one, "one.png", &opts).unwrap().pixel(0, 0),
        [1, 2, 3]
    );
    // Unreadable paths.
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("missing.jpg");
    let e = read_image(&missing, &opts).unwrap_err();
    assert!(matches!(e, DataError::Io { .. }) && e.to_string().contains("missing.jpg"));
    std::fs::create_dir(dir.path().join("dir.jpg")).unwrap();
    assert!(read_image(&dir.path().join("dir.jpg"), &opts).is_err());
}

fn png_bytes(v: u8) -> Vec<u8> {
    encode(
        image::DynamicImage::ImageRgb8(ImageBuffer::from_pixel(5, 4, Rgb([v, v, v]))),
        ImageFormat::Png,
    )
}

#[test]
fn image_folder_labelled_unlabelled_and_bad_layouts() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("data");
    write(&root.join("cat/b.png"), &png_bytes(10));
    write(&root.join("cat/a.PNG"), &png_bytes(20));
    write(&root.join("cat/notes.txt"), b"not an image");
    write(&root.join("cat/.hidden.png"), &png_bytes(0));
    write(
        &root.join("ant/x.jpg"),
        &encode(
            image::DynamicImage::ImageRgb8(ImageBuffer::from_pixel(3, 3, Rgb([9, 9, 9]))),
            ImageFormat::Jpeg,
        ),
    );
    write(
        &root.join("dog/sub/deep.bmp"),
        &encode(
            image::DynamicImage::ImageRgb8(ImageBuffer::from_pixel(2, 2, Rgb([1, 2, 3]))),
            ImageFormat::Bmp,
        ),
    );
    let opts = FolderOptions::default();
    let f = ImageFolder::open(&root, &opts).unwrap();
    assert_eq!(f.class_names(), &["ant", "cat", "dog"]);
    assert_eq!(f.len(), 4);
    assert_eq!(
        (0..4).map(|i| f.label(i).unwrap()).collect::<Vec<_>>(),
        vec![0, 1, 1, 2]
    );
    assert!(f.describe(1).ends_with("a.PNG"));
    assert_eq!(f.image(1).unwrap().pixel(0, 0), [20, 20, 20]);
    assert_eq!(f.image(3).unwrap().pixel(1, 1), [1, 2, 3]);
    assert_eq!(class_counts(&f), vec![1, 2, 1]);
    // Unlabelled: every image, recursively.
    let u = ImageFolder::unlabelled(&root, &opts).unwrap();
    assert_eq!((u.len(), u.num_classes(), u.label(0)), (4, 0, None));
    let flat = ImageFolder::open(&root.join("cat"), &opts).unwrap();
    assert_eq!((flat.len(), flat.num_classes()), (2, 0));

    // An empty folder.
    std::fs::create_dir_all(dir.path().join("empty")).unwrap();
    for r in [
        ImageFolder::open(&dir.path().join("empty"), &opts),
        ImageFolder::labelled(&dir.path().join("empty"), &opts),
    ] {
        let e = r.unwrap_err();
        assert!(
            matches!(e, DataError::Empty { .. }) && e.to_string().contains("empty"),
            "{e}"
        );
    }
    // A class folder without images: an error naming it, or with Skip a class of 0 images.
    std::fs::create_dir_all(root.join("eel")).unwrap();
    write(&root.join("eel/readme.md"), b"nothing");
    let e = ImageFolder::labelled(&root, &opts).unwrap_err();
    assert!(e.to_string().contains("eel"), "{e}");
    let skip = FolderOptions {
        policy: ErrorPolicy::Skip,
        ..FolderOptions::default()
    };
    let f = ImageFolder::labelled(&root, &skip).unwrap();
    assert_eq!((f.num_classes(), f.empty_classes(), f.len()), (4, 1, 4));
    // A missing folder.
    assert!(matches!(
        ImageFolder::open(&dir.path().join("nope"), &opts),
        Err(DataError::Io { .. })
    ));
}

#[test]
fn corrupt_files_in_a_folder_fail_or_are_skipped_and_counted() {
    let dir = tempfile::tempdir().unwrap();
    write(&dir.path().join("a/1.png"), &png_bytes(1));
    write(&dir.path().join("a/2.png"), &png_bytes(2)[..30]);
    write(&dir.path().join("b/3.png"), &png_bytes(3));
    // Unreadable: a link to nowhere (on unix), else another truncated file.
    #[cfg(unix)]
    std::os::unix::fs::symlink(dir.path().join("gone.jpg"), dir.path().join("b/4.jpg")).unwrap();
    #[cfg(not(unix))]
    write(&dir.path().join("b/4.jpg"), b"\xff\xd8");
    write(&dir.path().join("b/5.png"), &png_bytes(5));
    let f: Arc<dyn Dataset> =
        Arc::new(ImageFolder::labelled(dir.path(), &FolderOptions::default()).unwrap());
    let e = ImageSet::load(f.as_ref(), ErrorPolicy::Fail).unwrap_err();
    assert!(
        e.to_string().contains("2.png") || e.to_string().contains("4.jpg"),
        "{e}"
    );
    let (set, skipped) = ImageSet::load(f.as_ref(), ErrorPolicy::Skip).unwrap();
    assert_eq!((set.len(), skipped), (3, 2));
    assert_eq!(class_counts(&set), vec![1, 2]);
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(200))]

    /// Random bytes, or a valid file with random damage, never panic any reader.
    #[test]
    fn readers_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600), cut in 0usize..400, flip in any::<u8>()) {
        let opts = DecodeOptions::default();
        let _ = decode_image(&bytes, "r", &opts);
        let _ = parse_idx(&bytes, "r");
        let _ = parse_cifar10_batch(&bytes, "r");
        let _ = parse_stl10_labels(&bytes, "r");
        let _ = maybe_gunzip(bytes.clone(), "r");
        let mut png = png_bytes(flip);
        let n = cut.min(png.len() - 1);
        png[n] ^= flip;
        png.truncate(png.len() - cut / 4);
        let _ = decode_image(&png, "r.png", &opts);
    }
}
