#!/usr/bin/env python3
"""Puts our CUDA training step (benches/gpu_train_step.rs --json) beside PyTorch's
(torch_gpu_baseline.py --only step --json, one file or several: eager and torch.compile runs)
from the same GPU, and prints the ratios of images/s: ours (best variant) over PyTorch's best
eager variant, and over its best of all variants where torch.compile ran, per model. A ratio is
printed only where both ran the same batch and input size (--quick runs of the baseline shrink
them). A missing or unreadable PyTorch file is reported and skipped.

    python3 step_ratio.py OURS.json TORCH.json [TORCH_COMPILE.json ...]
"""
import json
import sys


def main() -> int:
    if len(sys.argv) < 3:
        print(__doc__)
        return 2
    with open(sys.argv[1]) as f:
        ours = json.load(f)
    theirs = {}
    for path in sys.argv[2:]:
        try:
            with open(path) as f:
                torch = json.load(f)
        except (OSError, ValueError) as e:
            print(f"{path}: skipped ({e})")
            continue
        for c in torch.get("step", {}).get("results", []):
            r = c.get("result", {})
            if r.get("status") != "ok":
                continue
            side = int(str(c["input"]).split("x")[0])
            key = (c["model"], c["batch"], side)
            theirs.setdefault(key, []).append((c["variant"], r["images_per_s"]))
    status = 0
    for model in sorted({o["model"] for o in ours}):
        mine = [o for o in ours if o["model"] == model]
        best = max(mine, key=lambda o: o["images_per_s"])
        key = (model, best["batch"], best["side"])
        for o in mine:
            print(f"ours  {model} {o['variant']:16s} {o['images_per_s']:10.1f} images/s")
        if key not in theirs:
            if model.endswith("-gc"):
                # Gradient caching: a batch no PyTorch baseline runs on one GPU.
                print(f"{model}: batch {best['batch']} at {best['side']}x{best['side']} on one GPU, "
                      f"pool peak {best.get('pool_peak_mib', 0):.0f} MiB (no PyTorch counterpart)")
                continue
            print(f"{model}: no PyTorch result at batch {best['batch']}, {best['side']}x{best['side']}")
            status = 1
            continue
        for v, ips in theirs[key]:
            print(f"torch {model} {v:16s} {ips:10.1f} images/s")
        eager = [(v, ips) for v, ips in theirs[key] if "compile" not in v]
        if eager:
            v, ips = max(eager, key=lambda t: t[1])
            print(f"{model}: ours {best['variant']} / torch {v} = {best['images_per_s'] / ips:.2f}x")
        if len(eager) < len(theirs[key]):
            v, ips = max(theirs[key], key=lambda t: t[1])
            print(f"{model}: ours {best['variant']} / torch best of all, {v} = "
                  f"{best['images_per_s'] / ips:.2f}x")
    return status


if __name__ == "__main__":
    sys.exit(main())
