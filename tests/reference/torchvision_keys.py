"""Writes the state-dict names and shapes of torchvision's ResNet-18 and ResNet-50 (fc excluded)
to fixtures/torchvision_keys.json, so a Rust test can check that our encoders use exactly
torchvision's names and shapes, and so load each other's checkpoints.

    /tmp/torch/bin/python tests/reference/torchvision_keys.py --out tests/reference/fixtures
"""
import argparse
import json
import os

import torchvision


def keys(model):
    return [[k, list(v.shape)] for k, v in model.state_dict().items() if not k.startswith("fc.")]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "fixtures"))
    a = p.parse_args()
    out = {
        "torchvision": torchvision.__version__,
        "resnet18": keys(torchvision.models.resnet18(weights=None)),
        "resnet50": keys(torchvision.models.resnet50(weights=None)),
    }
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "torchvision_keys.json"), "w") as f:
        f.write(json.dumps(out).replace("], [", "],\n [") + "\n")


if __name__ == "__main__":
    main()
