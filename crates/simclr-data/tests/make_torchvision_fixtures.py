#!/usr/bin/env python3
"""Writes fixtures/torchvision_ops.safetensors: torchvision's results of the colour, blur and
resize operations on a small fixed image, for crates/simclr-data/tests/torchvision_parity.rs.

    python3 -m venv /tmp/torch && /tmp/torch/bin/pip install torch torchvision safetensors
    /tmp/torch/bin/python crates/simclr-data/tests/make_torchvision_fixtures.py

Also writes fixtures/cmyk.jpg (a small CMYK JPEG made with Pillow) for the decoder tests.
Every tensor is named after the operation and its parameters; the metadata entry "ops" lists
them as JSON: {name: {"op": ..., params...}}.
"""

import json
import os

import torch
import torchvision
from safetensors.torch import save_file
from torchvision.transforms.v2 import functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(HERE, "fixtures")


def main() -> None:
    os.makedirs(OUT, exist_ok=True)
    g = torch.Generator().manual_seed(1234)
    h, w = 20, 28
    # A smooth colourful picture plus noise, so every op (hue sectors, blur) is exercised.
    ys = torch.linspace(0, 1, h).view(h, 1).expand(h, w)
    xs = torch.linspace(0, 1, w).view(1, w).expand(h, w)
    base = torch.stack([xs, ys, 1 - 0.5 * (xs + ys)])
    noise = torch.rand(3, h, w, generator=g) * 0.6 - 0.3
    img_u8 = ((base + noise).clamp(0, 1) * 255).round().to(torch.uint8)
    # A few exact grays and saturated pixels (edge cases of the HSV conversion).
    img_u8[:, 0, 0] = torch.tensor([128, 128, 128], dtype=torch.uint8)
    img_u8[:, 0, 1] = torch.tensor([255, 0, 0], dtype=torch.uint8)
    img_u8[:, 0, 2] = torch.tensor([0, 0, 0], dtype=torch.uint8)
    img_u8[:, 0, 3] = torch.tensor([255, 255, 255], dtype=torch.uint8)
    img = img_u8.to(torch.float32) / 255.0

    tensors = {"input_u8": img_u8, "input": img}
    ops = {}

    def add(name, tensor, **params):
        tensors[name] = tensor.contiguous().clone()
        ops[name] = params

    for f in (0.6, 1.4):
        add(f"brightness_{f}", F.adjust_brightness(img, f), op="brightness", factor=f)
    for f in (0.5, 1.6):
        add(f"contrast_{f}", F.adjust_contrast(img, f), op="contrast", factor=f)
    for f in (0.3, 1.7):
        add(f"saturation_{f}", F.adjust_saturation(img, f), op="saturation", factor=f)
    for f in (0.2, -0.35, 0.5):
        add(f"hue_{f}", F.adjust_hue(img, f), op="hue", factor=f)
    add("grayscale", F.rgb_to_grayscale(img, num_output_channels=3), op="grayscale")
    for k, s in ((5, 1.3), (7, 0.6), (3, 2.0)):
        add(f"blur_{k}_{s}", F.gaussian_blur(img, [k, k], [s, s]), op="blur", kernel=k, sigma=s)
    # ColorJitter's chain in the order hue, contrast, brightness, saturation (ids 3, 1, 0, 2).
    b, c, s, hue = 1.2, 0.7, 1.3, 0.1
    x = F.adjust_hue(img, hue)
    x = F.adjust_contrast(x, c)
    x = F.adjust_brightness(x, b)
    x = F.adjust_saturation(x, s)
    add("jitter_chain", x, op="jitter", order=[3, 1, 0, 2], brightness=b, contrast=c,
        saturation=s, hue=hue)
    # Crop + antialiased bilinear resize on 8-bit pixels: down and up.
    for (top, left, ch, cw, oh, ow) in ((3, 5, 14, 20, 9, 11), (2, 4, 8, 8, 16, 16), (0, 0, 20, 28, 20, 28)):
        name = f"resized_crop_{top}_{left}_{ch}_{cw}_{oh}_{ow}"
        out = F.resized_crop(img_u8, top, left, ch, cw, [oh, ow], antialias=True)
        add(name, out, op="resized_crop", top=top, left=left, height=ch, width=cw,
            out_height=oh, out_width=ow)

    meta = {"ops": json.dumps(ops), "torch": torch.__version__, "torchvision": torchvision.__version__}
    save_file(tensors, os.path.join(OUT, "torchvision_ops.safetensors"), metadata=meta)

    # A CMYK JPEG (Pillow writes Adobe-style CMYK): left half red, right half blue.
    from PIL import Image

    rgb = Image.new("RGB", (16, 8), (255, 0, 0))
    rgb.paste((0, 0, 255), (8, 0, 16, 8))
    rgb.convert("CMYK").save(os.path.join(OUT, "cmyk.jpg"), quality=95)
    print(f"wrote {OUT}: {len(tensors)} tensors")


if __name__ == "__main__":
    main()
