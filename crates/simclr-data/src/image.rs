//! An 8-bit RGB image and the decoder of image files.

use std::io::Cursor;
use std::path::Path;

use image::{DynamicImage, ImageDecoder, ImageReader, Limits};

use crate::DataError;

/// An 8-bit RGB image, rows top to bottom, pixels interleaved (`r, g, b, r, g, b, ...`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Image {
    width: u32,
    height: u32,
    data: Vec<u8>,
}

impl Image {
    /// An image from interleaved RGB bytes; `data.len()` must be `3 * width * height` and both
    /// sides at least 1.
    pub fn new(width: u32, height: u32, data: Vec<u8>) -> Result<Image, DataError> {
        if width == 0 || height == 0 {
            return Err(DataError::Config(format!("empty image {width}x{height}")));
        }
        let want = 3 * width as usize * height as usize;
        if data.len() != want {
            return Err(DataError::Config(format!(
                "an RGB image of {width}x{height} needs {want} bytes, got {}",
                data.len()
            )));
        }
        Ok(Image {
            width,
            height,
            data,
        })
    }

    /// An image from one byte per pixel (grayscale), copied to the three channels.
    pub fn from_gray(width: u32, height: u32, gray: &[u8]) -> Result<Image, DataError> {
        if gray.len() != width as usize * height as usize {
            return Err(DataError::Config(format!(
                "a gray image of {width}x{height} needs {} bytes, got {}",
                width as usize * height as usize,
                gray.len()
            )));
        }
        let data = gray.iter().flat_map(|&v| [v, v, v]).collect();
        Image::new(width, height, data)
    }

    /// An image from planar bytes (`3 x height x width`, red plane first), as CIFAR stores them.
    pub fn from_planar(width: u32, height: u32, planar: &[u8]) -> Result<Image, DataError> {
        let n = width as usize * height as usize;
        if planar.len() != 3 * n {
            return Err(DataError::Config(format!(
                "a planar image of {width}x{height} needs {} bytes, got {}",
                3 * n,
                planar.len()
            )));
        }
        let (r, rest) = planar.split_at(n);
        let (g, b) = rest.split_at(n);
        let mut data = Vec::with_capacity(3 * n);
        for i in 0..n {
            data.extend_from_slice(&[r[i], g[i], b[i]]);
        }
        Image::new(width, height, data)
    }

    /// Width in pixels.
    pub fn width(&self) -> u32 {
        self.width
    }

    /// Height in pixels.
    pub fn height(&self) -> u32 {
        self.height
    }

    /// The interleaved RGB bytes.
    pub fn pixels(&self) -> &[u8] {
        &self.data
    }

    /// The interleaved RGB bytes, by value.
    pub fn into_raw(self) -> Vec<u8> {
        self.data
    }

    /// The pixel at column `x`, row `y` (panics when outside, like slice indexing).
    pub fn pixel(&self, x: u32, y: u32) -> [u8; 3] {
        let i = 3 * (y as usize * self.width as usize + x as usize);
        [self.data[i], self.data[i + 1], self.data[i + 2]]
    }
}

/// Limits on the images the decoder accepts; larger ones are a [`DataError::TooLarge`], found
/// from the file header before any pixel is decoded.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DecodeOptions {
    /// Most pixels (width x height) an image may have. Default 64 Mi (8192 x 8192).
    pub max_pixels: u64,
    /// Longest side an image may have. Default 16384.
    pub max_side: u32,
}

impl Default for DecodeOptions {
    fn default() -> Self {
        DecodeOptions {
            max_pixels: 64 << 20,
            max_side: 16384,
        }
    }
}

/// An error unless a `width` x `height` image (as its header says) is within `opts`' limits.
pub(crate) fn check_size(
    name: &str,
    width: u32,
    height: u32,
    opts: &DecodeOptions,
) -> Result<(), DataError> {
    if width == 0 || height == 0 {
        return Err(DataError::Decode {
            file: name.to_string(),
            message: format!("empty image {width}x{height}"),
        });
    }
    if width as u64 * height as u64 > opts.max_pixels
        || width > opts.max_side
        || height > opts.max_side
    {
        return Err(DataError::TooLarge {
            file: name.to_string(),
            width,
            height,
            max_pixels: opts.max_pixels,
            max_side: opts.max_side,
        });
    }
    Ok(())
}

/// Decodes an image file of any format the `image` crate reads here (JPEG, PNG, WebP, BMP,
/// GIF, TIFF), guessing the format from its first bytes, and converts it to 8-bit RGB:
/// grayscale is copied to the three channels, alpha dropped, 16-bit and float samples scaled,
/// CMYK converted. `name` is used in errors. Never panics: a panic inside a decoder is
/// returned as a [`DataError::Decode`].
pub fn decode_image(bytes: &[u8], name: &str, opts: &DecodeOptions) -> Result<Image, DataError> {
    let decode_err = |message: String| DataError::Decode {
        file: name.to_string(),
        message,
    };
    if bytes.is_empty() {
        return Err(decode_err("the file is empty".into()));
    }
    let result = std::panic::catch_unwind(|| -> Result<Image, DataError> {
        let mut reader = ImageReader::new(Cursor::new(bytes))
            .with_guessed_format()
            .map_err(|e| decode_err(e.to_string()))?;
        if reader.format().is_none() {
            return Err(decode_err("not a known image format".into()));
        }
        // Read the header without the crate's limits, check the size against ours, then
        // decode under ours.
        reader.no_limits();
        let mut decoder = reader
            .into_decoder()
            .map_err(|e| decode_err(e.to_string()))?;
        let (width, height) = decoder.dimensions();
        check_size(name, width, height, opts)?;
        let mut limits = Limits::default();
        limits.max_image_width = Some(opts.max_side);
        limits.max_image_height = Some(opts.max_side);
        // 16 bytes a pixel covers RGBA at 32-bit float, the widest the decoders produce.
        limits.max_alloc = Some(opts.max_pixels.saturating_mul(16).saturating_add(64 << 20));
        decoder
            .set_limits(limits)
            .map_err(|e| decode_err(e.to_string()))?;
        let img = DynamicImage::from_decoder(decoder).map_err(|e| decode_err(e.to_string()))?;
        let rgb = match img {
            DynamicImage::ImageRgb8(rgb) => rgb,
            other => other.into_rgb8(),
        };
        let (w, h) = rgb.dimensions();
        Image::new(w, h, rgb.into_raw()).map_err(|e| decode_err(e.to_string()))
    });
    match result {
        Ok(r) => r,
        Err(_) => Err(decode_err("the decoder panicked on this input".into())),
    }
}

/// Reads and decodes the image file at `path` (see [`decode_image`]).
pub fn read_image(path: &Path, opts: &DecodeOptions) -> Result<Image, DataError> {
    let bytes = std::fs::read(path).map_err(|e| DataError::io(path, e))?;
    decode_image(&bytes, &path.display().to_string(), opts)
}
