#!/usr/bin/env python3
"""Puts our CUDA training step (benches/gpu_train_step.rs --json) beside PyTorch's
(torch_gpu_baseline.py --only step --json) from the same GPU, and prints the ratios of images/s:
ours (best variant) over PyTorch's best eager variant, per model. A ratio is printed only where
both ran the same batch and input size (--quick runs of the baseline shrink them).

    python3 step_ratio.py OURS.json TORCH.json
"""
import json
import sys


def main() -> int:
    if len(sys.argv) != 3:
        print(__doc__)
        return 2
    with open(sys.argv[1]) as f:
        ours = json.load(f)
    with open(sys.argv[2]) as f:
        torch = json.load(f)
    theirs = {}
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
            print(f"ours  {model} {o['variant']:12s} {o['images_per_s']:10.1f} images/s")
        if key not in theirs:
            print(f"{model}: no PyTorch result at batch {best['batch']}, {best['side']}x{best['side']}")
            status = 1
            continue
        for v, ips in theirs[key]:
            print(f"torch {model} {v:12s} {ips:10.1f} images/s")
        eager = [(v, ips) for v, ips in theirs[key] if "compile" not in v]
        v, ips = max(eager, key=lambda t: t[1])
        print(f"{model}: ours {best['variant']} / torch {v} = {best['images_per_s'] / ips:.2f}x")
    return status


if __name__ == "__main__":
    sys.exit(main())
