#!/usr/bin/env python3
"""PyTorch on the same GPU, beside `cargo bench --bench gpu_kernels`: the peers of our kernels.

- ntxent/torch-{fp32,bf16}/M: the usual SimCLR NT-Xent in eager PyTorch (F.normalize, one
  matmul, the diagonal masked, F.cross_entropy at the positives), forward + backward, d = 128,
  tau = 0.1; the bf16 variant under autocast. Peak extra memory is reported; an out-of-memory
  error is reported as such.
- augment/torchvision-v2/224: torchvision.transforms.v2 on uint8 CUDA tensors, per view (each
  view its own random parameters, as SimCLR needs): RandomApply(ColorJitter(0.8, 0.8, 0.8, 0.2),
  p=0.8), RandomGrayscale(0.2), RandomApply(GaussianBlur(23, (0.1, 2.0)), p=0.5), ToDtype,
  Normalize. Also the batched call (one set of parameters for the whole batch: not SimCLR's
  augmentation, an upper bound on torchvision's speed).

With --ours FILE (the JSON of gpu_kernels), prints the ratios of the medians.

usage: torch_gpu_compare.py [--quick] [--json OUT] [--ours gpu_kernels.json]
"""

import argparse
import json
import statistics
import sys
import time


def median_time(fn, reps, iters):
    import torch

    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(iters):
            fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) / iters)
    return statistics.median(times)


def ntxent_rows(quick):
    import torch
    import torch.nn.functional as F

    rows_out = []
    dim, tau = 128, 0.1
    sizes = [512, 8192] if quick else [512, 2048, 8192, 65536]
    for m in sizes:
        n = m // 2
        target = torch.cat([torch.arange(n, m), torch.arange(0, n)]).cuda()
        for mode in ["fp32", "bf16"]:
            name = f"ntxent/torch-{mode}/{m}"
            z = (torch.rand(m, dim, device="cuda") - 0.5).requires_grad_(True)

            def step():
                with torch.autocast("cuda", dtype=torch.bfloat16, enabled=mode == "bf16"):
                    u = F.normalize(z, dim=1)
                    s = (u @ u.t()) / tau
                    s = s.float()
                    s.fill_diagonal_(float("-inf"))
                    loss = F.cross_entropy(s, target)
                loss.backward()
                z.grad = None

            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            try:
                iters = 2 if m >= 65536 else 20
                s = median_time(step, 5 if quick else 15, iters)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
                row = {"name": name, "us": s * 1e6, "peak_extra_mib": peak}
            except torch.OutOfMemoryError:
                row = {"name": name, "oom": True}
            print(row, flush=True)
            rows_out.append(row)
            del z
            torch.cuda.empty_cache()
    return rows_out


def augment_rows(quick):
    import torch
    from torchvision.transforms import v2

    views = 256
    x = torch.randint(0, 256, (views, 3, 224, 224), dtype=torch.uint8, device="cuda")
    t = v2.Compose(
        [
            v2.RandomApply([v2.ColorJitter(0.8, 0.8, 0.8, 0.2)], p=0.8),
            v2.RandomGrayscale(p=0.2),
            v2.RandomApply([v2.GaussianBlur(23, sigma=(0.1, 2.0))], p=0.5),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
        ]
    )
    out = []

    def per_view():
        for i in range(views):
            t(x[i])

    s = median_time(per_view, 3 if quick else 7, 1)
    row = {"name": "augment/torchvision-v2/224/per-view", "views_per_s": views / s}
    print(row, flush=True)
    out.append(row)
    s = median_time(lambda: t(x), 5 if quick else 15, 5)
    row = {"name": "augment/torchvision-v2/224/batched-same-params", "views_per_s": views / s}
    print(row, flush=True)
    out.append(row)
    return out


def report(ours, theirs):
    by = {r["name"]: r for r in ours + theirs}
    print("\n== ratios (PyTorch time / ours; > 1 means ours is faster) ==")
    for m in [512, 2048, 8192, 65536]:
        o = by.get(f"ntxent/bf16/{m}")
        if not o:
            continue
        line = f"NT-Xent fwd+bwd 2N={m:<6} ours bf16 {o['us']:9.1f} us ({o['workspace_mib']:.1f} MiB workspace)"
        for mode in ["fp32", "bf16"]:
            t = by.get(f"ntxent/torch-{mode}/{m}")
            if t is None:
                continue
            if t.get("oom"):
                line += f" | torch {mode}: out of memory"
            else:
                line += f" | torch {mode} {t['us']:9.1f} us, {t['peak_extra_mib']:.0f} MiB: x{t['us'] / o['us']:.2f}"
        print(line)
    tv = by.get("augment/torchvision-v2/224/per-view")
    tb = by.get("augment/torchvision-v2/224/batched-same-params")
    for key in ["augment/224/f32-nchw", "augment/224/bf16-nhwc"]:
        o = by.get(key)
        if o and tv:
            line = f"{key}: {o['views_per_s']:.0f} views/s | torchvision per view {tv['views_per_s']:.0f}: x{o['views_per_s'] / tv['views_per_s']:.1f}"
            if tb:
                line += f" | batched {tb['views_per_s']:.0f}: x{o['views_per_s'] / tb['views_per_s']:.1f}"
            print(line)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json")
    ap.add_argument("--ours")
    a = ap.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("torch_gpu_compare: no CUDA device visible to PyTorch", file=sys.stderr)
        return 1
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name(0)}", flush=True)
    rows = []
    for part in (ntxent_rows, augment_rows):
        try:
            rows += part(a.quick)
        except Exception as e:  # report and go on: the other part still measures
            print(f"torch_gpu_compare: {part.__name__}: {e!r}", file=sys.stderr)
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    if a.ours:
        try:
            with open(a.ours) as f:
                ours = json.load(f)
            report(ours, rows)
        except (OSError, ValueError) as e:
            print(f"torch_gpu_compare: cannot read {a.ours}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
