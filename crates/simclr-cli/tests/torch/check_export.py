#!/usr/bin/env python3
"""Loads an encoder written by `simclr export` into torchvision's own ResNet and checks that it
gives the representations h that the Rust side computed for the same images.

    python check_export.py --encoder enc.safetensors --data io.safetensors --layers 1,1,1,1 \
        --block basic --stem cifar

io.safetensors holds `images` [n, 3, H, W] and `h` [n, features]. Exit status 0 when every h
matches within --tol (absolute, relative to the largest |h|), 1 otherwise.
"""

import argparse
import sys

import torch
import torch.nn as nn
from safetensors.torch import load_file
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--encoder", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--layers", default="2,2,2,2")
    ap.add_argument("--block", choices=["basic", "bottleneck"], default="basic")
    ap.add_argument("--stem", choices=["cifar", "imagenet"], default="cifar")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args()

    block = BasicBlock if a.block == "basic" else Bottleneck
    model = ResNet(block, [int(v) for v in a.layers.split(",")])
    if a.stem == "cifar":
        # The CIFAR stem, as SimCLR's CIFAR experiments use it: 3x3 stride 1, no max-pool.
        model.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        model.maxpool = nn.Identity()
    model.fc = nn.Identity()
    state = load_file(a.encoder)
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or result.missing_keys:
        print(f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
        return 1
    model.eval()
    io = load_file(a.data)
    with torch.no_grad():
        h = model(io["images"].float())
    expected = io["h"].float()
    if h.shape != expected.shape:
        print(f"shape {tuple(h.shape)} vs {tuple(expected.shape)}")
        return 1
    err = (h - expected).abs().max().item() / max(expected.abs().max().item(), 1e-12)
    print(f"max |h_torch - h_rust| / max |h| = {err:.3e}")
    return 0 if err <= a.tol else 1


if __name__ == "__main__":
    sys.exit(main())
