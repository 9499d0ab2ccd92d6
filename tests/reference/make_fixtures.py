#!/usr/bin/env python3
"""Writes the PyTorch reference tensors that tests/parity.rs checks the Rust CPU path against.

llm.c style: tiny models, fixed seeds, everything computed in float64 by PyTorch and stored as
float32 (the stored weights and inputs are exactly the float32 values the float64 computation
started from). See tests/reference/README.md for what each file holds.

    python tests/reference/make_fixtures.py --out tests/reference/fixtures
"""

import argparse
import copy
import json
import os
import struct

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import save as safetensors_bytes

BN_EPS = 1e-5
BN_MOMENTUM = 0.1

TEMPERATURE = 0.5
SGD = dict(lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4)
LARS = dict(lr=0.5, momentum=0.9, eta=0.001, weight_decay=1e-6)


# ---------------------------------------------------------------------------------------------
# Models: torchvision's ResNet v1.5 with a configurable base width and stem, same names.
# ---------------------------------------------------------------------------------------------


def conv3x3(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False)


def conv1x1(cin, cout, stride=1):
    return nn.Conv2d(cin, cout, 1, stride=stride, bias=False)


def bn2d(c):
    return nn.BatchNorm2d(c, eps=BN_EPS, momentum=BN_MOMENTUM)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = bn2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = bn2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class Bottleneck(nn.Module):
    """v1.5: the stride sits on the 3x3 conv (conv2), as in torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None):
        super().__init__()
        width = planes
        self.conv1 = conv1x1(inplanes, width)
        self.bn1 = bn2d(width)
        self.conv2 = conv3x3(width, width, stride)
        self.bn2 = bn2d(width)
        self.conv3 = conv1x1(width, planes * self.expansion)
        self.bn3 = bn2d(planes * self.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        identity = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        if self.downsample is not None:
            identity = self.downsample(x)
        return self.relu(out + identity)


class ResNet(nn.Module):
    """torchvision.models.ResNet without fc, with base width and stem configurable.

    forward(x) returns h = global average pool of layer4's output, [N, 8 * base * expansion].
    """

    def __init__(self, block, layers, base_width=64, stem="imagenet", in_channels=3):
        super().__init__()
        assert stem in ("cifar", "imagenet")
        self.inplanes = base_width
        if stem == "cifar":
            self.conv1 = nn.Conv2d(in_channels, base_width, 3, stride=1, padding=1, bias=False)
        else:
            self.conv1 = nn.Conv2d(in_channels, base_width, 7, stride=2, padding=3, bias=False)
        self.bn1 = bn2d(base_width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if stem == "imagenet" else nn.Identity()
        self.layer1 = self._make_layer(block, base_width, layers[0], 1)
        self.layer2 = self._make_layer(block, 2 * base_width, layers[1], 2)
        self.layer3 = self._make_layer(block, 4 * base_width, layers[2], 2)
        self.layer4 = self._make_layer(block, 8 * base_width, layers[3], 2)
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.out_dim = 8 * base_width * block.expansion
        # torchvision's initialisation.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
                nn.init.constant_(m.weight, 1)
                nn.init.constant_(m.bias, 0)

    def _make_layer(self, block, planes, blocks, stride):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                conv1x1(self.inplanes, planes * block.expansion, stride),
                bn2d(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride, downsample)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes))
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)


def projection_head(h_dim, hidden, out):
    """SimCLR's MLP head: names head.0.weight, head.1.*, head.3.weight, head.3.bias."""
    return nn.Sequential(
        nn.Linear(h_dim, hidden, bias=False),
        nn.BatchNorm1d(hidden, eps=BN_EPS, momentum=BN_MOMENTUM),
        nn.ReLU(inplace=True),
        nn.Linear(hidden, out, bias=True),
    )


class SimCLR(nn.Module):
    def __init__(self, encoder, head):
        super().__init__()
        self.encoder = encoder
        self.head = head

    def forward(self, x):
        h = self.encoder(x)
        return h, self.head(h)


def randomise_bn(model, gen):
    """Makes every BN non-trivial: weight U(0.5, 1.5), bias N(0, 0.1), running_mean N(0, 0.1),
    running_var U(0.5, 1.5), num_batches_tracked 0."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d)):
                c = m.num_features
                m.weight.copy_(torch.rand(c, generator=gen) + 0.5)
                m.bias.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_mean.copy_(torch.randn(c, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=gen) + 0.5)
                m.num_batches_tracked.zero_()


# ---------------------------------------------------------------------------------------------
# Loss and optimisers.
# ---------------------------------------------------------------------------------------------


def nt_xent(z, tau):
    """Rows 0..N-1 are view 1 of images 0..N-1, rows N..2N-1 view 2: positive of i is (i+N) mod 2N."""
    n2 = z.shape[0]
    u = F.normalize(z, dim=1)
    s = u @ u.t() / tau
    s = s.masked_fill(torch.eye(n2, dtype=torch.bool), float("-inf"))
    target = (torch.arange(n2) + n2 // 2) % n2
    return F.cross_entropy(s, target)


def is_excluded(p):
    """BN weights/biases and all biases: every 1-D parameter (no weight decay, no trust ratio)."""
    return p.ndim == 1


def lars_step(params, grads, bufs, lr, momentum, eta, weight_decay):
    """One step of SimCLR's TF LARSOptimizer (classic momentum, no Nesterov), in place."""
    with torch.no_grad():
        for name, w in params.items():
            g = grads[name].clone()
            if is_excluded(w):
                scaled_lr = lr
            else:
                g = g + weight_decay * w
                w_norm = torch.linalg.vector_norm(w)
                g_norm = torch.linalg.vector_norm(g)
                if w_norm > 0 and g_norm > 0:
                    trust = eta * w_norm / g_norm
                else:
                    trust = 1.0
                scaled_lr = lr * trust
            bufs[name] = momentum * bufs[name] + scaled_lr * g
            w.sub_(bufs[name])


def sgd_step(params, grads):
    """torch.optim.SGD (Nesterov, weight decay on everything), one step from fresh state."""
    plist = []
    for name, w in params.items():
        w.grad = grads[name].clone()
        plist.append(w)
    opt = torch.optim.SGD(plist, **SGD)
    opt.step()


# ---------------------------------------------------------------------------------------------
# Fixtures.
# ---------------------------------------------------------------------------------------------


def save_file(tensors, path, metadata):
    """safetensors.torch.save_file, but bit-identical from run to run: safetensors writes the
    metadata dict in hash order, so the header is re-serialised with the metadata keys sorted
    (same length, same tensor entries and offsets, same data)."""
    b = safetensors_bytes(tensors, metadata=metadata)
    n = struct.unpack("<Q", b[:8])[0]
    header = json.loads(b[8 : 8 + n])
    header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    assert len(text) <= n, "re-serialised header grew"
    text = text + b" " * (n - len(text))
    with open(path, "wb") as f:
        f.write(b[:8] + text + b[8 + n :])


def f32(t):
    return t.detach().to(torch.float32).contiguous().clone()


def store_state(out, prefix, state):
    for k, v in state.items():
        if v.dtype == torch.int64:
            out[prefix + k] = v.detach().clone().contiguous()
        else:
            out[prefix + k] = f32(v)


def running_stats(state):
    return {k: v for k, v in state.items() if k.endswith("running_mean") or k.endswith("running_var")}


def build_basic_simclr(gen):
    encoder = ResNet(BasicBlock, [1, 1, 1, 1], base_width=8, stem="cifar")
    head = projection_head(encoder.out_dim, 64, 16)
    model = SimCLR(encoder, head)
    randomise_bn(model, gen)
    return model


def basic_simclr_pass(model0, x, dtype):
    """Forward, NT-Xent, backward, SGD step and two LARS steps, all in `dtype`."""
    model = copy.deepcopy(model0).to(dtype).train()
    x = x.to(dtype)
    h, z = model(x)
    h.retain_grad()
    z.retain_grad()
    loss = nt_xent(z, TEMPERATURE)
    loss.backward()
    res = {"h": h, "z": z, "loss": loss.reshape(1), "dz": z.grad, "dh": h.grad}
    named = dict(model.named_parameters())
    grads = {k: p.grad.detach().clone() for k, p in named.items()}
    for k, g in grads.items():
        res["grad." + k] = g
    for k, v in running_stats(model.state_dict()).items():
        res["after_forward." + k] = v

    # The optimisers start from the weights before the step (the forward does not change them).
    start = {k: p.detach().clone() for k, p in dict(model0.named_parameters()).items()}

    sgd_params = {k: v.to(dtype).clone().requires_grad_(True) for k, v in start.items()}
    sgd_step(sgd_params, grads)
    for k, v in sgd_params.items():
        res["sgd." + k] = v

    lars_params = {k: v.to(dtype).clone() for k, v in start.items()}
    bufs = {k: torch.zeros_like(v) for k, v in lars_params.items()}
    lars_step(lars_params, grads, bufs, **LARS)
    for k, v in lars_params.items():
        res["lars." + k] = v.clone()
    lars_step(lars_params, grads, bufs, **LARS)
    for k, v in lars_params.items():
        res["lars2." + k] = v.clone()
    return res


def make_basic_simclr(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # module constructors (kaiming_normal_, Linear init) use the global RNG
    model = build_basic_simclr(gen)  # float32 weights: the stored values are exact
    x = torch.randn(8, 3, 16, 16, generator=gen)

    out = {}
    store_state(out, "param.", model.state_dict())
    out["input"] = f32(x)
    res = basic_simclr_pass(model, x, torch.float64)
    for k, v in res.items():
        out[k] = f32(v)
    out["meta.temperature"] = torch.tensor([TEMPERATURE], dtype=torch.float32)
    out["meta.bn_eps"] = torch.tensor([BN_EPS], dtype=torch.float32)
    out["meta.bn_momentum"] = torch.tensor([BN_MOMENTUM], dtype=torch.float32)
    for k, v in SGD.items():
        out["meta.sgd_" + k] = torch.tensor([float(v)], dtype=torch.float32)
    for k, v in LARS.items():
        out["meta.lars_" + k] = torch.tensor([float(v)], dtype=torch.float32)

    meta = {
        "fixture": "basic_simclr",
        "block": "basic",
        "layers": "1,1,1,1",
        "base_width": "8",
        "stem": "cifar",
        "in_channels": "3",
        "h_dim": "64",
        "head": "mlp: Linear(64,64,bias=False) BatchNorm1d(64) ReLU Linear(64,16)",
        "head_hidden_dim": "64",
        "head_output_dim": "16",
        "views": "rows 0..3 view 1 of images 0..3, rows 4..7 view 2; positive of i is (i+4) mod 8",
        "mode": "train",
        "loss": "nt_xent",
        "temperature": str(TEMPERATURE),
        "bn_eps": str(BN_EPS),
        "bn_momentum": str(BN_MOMENTUM),
        "sgd": "torch.optim.SGD lr=0.1 momentum=0.9 nesterov=True weight_decay=1e-4 (all params)",
        "lars": "SimCLR TF LARSOptimizer lr=0.5 momentum=0.9 eta=0.001 weight_decay=1e-6; "
        "1-D params excluded from weight decay and trust ratio; no nesterov; lars2 = second step, same grads",
        "compute_dtype": "float64",
        "seed": str(seed),
        "torch": torch.__version__,
    }
    return model, out, meta, res, x


def make_basic_eval(model, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(4, 3, 16, 16, generator=gen)
    enc = copy.deepcopy(model.encoder).double().eval()
    with torch.no_grad():
        h = enc(x.double())
    out = {"input": f32(x), "h": f32(h)}
    meta = {
        "fixture": "basic_eval",
        "weights": "param.encoder.* of basic_simclr.safetensors (before the training step)",
        "mode": "eval",
        "compute_dtype": "float64",
        "seed": str(seed),
        "torch": torch.__version__,
    }
    return out, meta


def bottleneck_pass(model0, x, r, dtype):
    model = copy.deepcopy(model0).to(dtype).train()
    h = model(x.to(dtype))
    (h * r.to(dtype)).sum().backward()
    res = {"h": h}
    for k, p in model.named_parameters():
        res["grad." + k] = p.grad
    for k, v in running_stats(model.state_dict()).items():
        res["after_forward." + k] = v
    return res


def make_bottleneck(seed):
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = ResNet(Bottleneck, [1, 1, 1, 1], base_width=4, stem="imagenet")
    randomise_bn(model, gen)
    # 48x48 rather than 32x32: at 32 layer4 is 1x1, so its BNs normalise over only 4 values and
    # the float64 gradients are so ill-conditioned that float32 PyTorch itself misses 1e-4 there.
    # At 48 layer3 is 3x3 (odd: exercises stride-2 padding edges) and layer4 2x2 (16 per channel).
    x = torch.randn(4, 3, 48, 48, generator=gen)
    r = torch.randn(4, model.out_dim, generator=gen)
    out = {}
    store_state(out, "param.", model.state_dict())
    out["input"] = f32(x)
    out["r"] = f32(r)
    res = bottleneck_pass(model, x, r, torch.float64)
    for k, v in res.items():
        out[k] = f32(v)
    out["meta.bn_eps"] = torch.tensor([BN_EPS], dtype=torch.float32)
    out["meta.bn_momentum"] = torch.tensor([BN_MOMENTUM], dtype=torch.float32)
    meta = {
        "fixture": "bottleneck_resnet",
        "block": "bottleneck",
        "layers": "1,1,1,1",
        "base_width": "4",
        "stem": "imagenet",
        "in_channels": "3",
        "h_dim": str(model.out_dim),
        "mode": "train",
        "input_shape": "4,3,48,48",
        "loss": "sum(h * r), so dL/dh = r",
        "bn_eps": str(BN_EPS),
        "bn_momentum": str(BN_MOMENTUM),
        "compute_dtype": "float64",
        "seed": str(seed),
        "torch": torch.__version__,
    }
    return model, out, meta, res, x, r


# ---------------------------------------------------------------------------------------------
# Self-checks.
# ---------------------------------------------------------------------------------------------


def check_against_torchvision():
    """Our class with 64 base channels and the ImageNet stem is torchvision's resnet18 / resnet50:
    same state_dict names and shapes (minus fc.*) and the same output."""
    import torchvision

    for block, layers, ctor in [
        (BasicBlock, [2, 2, 2, 2], torchvision.models.resnet18),
        (Bottleneck, [3, 4, 6, 3], torchvision.models.resnet50),
    ]:
        torch.manual_seed(1)
        ours = ResNet(block, layers, base_width=64, stem="imagenet")
        randomise_bn(ours, torch.Generator().manual_seed(2))
        tv = ctor()
        a = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
        b = {k: tuple(v.shape) for k, v in tv.state_dict().items() if not k.startswith("fc.")}
        assert list(a) == list(b), f"{ctor.__name__}: names differ: {set(a) ^ set(b)}"
        assert a == b, f"{ctor.__name__}: shapes differ"
        tv.fc = nn.Identity()
        tv.load_state_dict(ours.state_dict())
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(3))
        for train in (False, True):
            o, t = copy.deepcopy(ours).double().train(train), copy.deepcopy(tv).double().train(train)
            with torch.no_grad():
                ho, ht = o(x.double()), t(x.double())
            assert ho.shape == (2, ours.out_dim)
            assert torch.allclose(ho, ht, rtol=1e-12, atol=1e-12), f"{ctor.__name__}: outputs differ"
        print(f"self-check: matches torchvision {ctor.__name__} ({len(a)} tensors)")


def check_lars_formula(out):
    """Re-derive lars.* for one conv weight and one BN weight straight from the stored tensors."""
    lr, mom, eta, wd = LARS["lr"], LARS["momentum"], LARS["eta"], LARS["weight_decay"]
    for name in ["encoder.conv1.weight", "encoder.bn1.weight"]:
        w = out["param." + name].double()
        g = out["grad." + name].double()
        if w.ndim > 1:
            g = g + wd * w
            lr_eff = lr * eta * w.norm() / g.norm()
        else:
            lr_eff = lr
        w1 = w - lr_eff * g
        assert torch.allclose(w1.float(), out["lars." + name], rtol=1e-5, atol=1e-7), name


def check_sgd_formula(out):
    """torch's SGD on its first step: buf = g + wd*w (not 0), w -= lr * (g + wd*w + momentum*buf)."""
    lr, mom, wd = SGD["lr"], SGD["momentum"], SGD["weight_decay"]
    for name in ["encoder.conv1.weight", "encoder.bn1.weight", "head.3.bias"]:
        w = out["param." + name].double()
        g = out["grad." + name].double() + wd * w
        w1 = w - lr * (1 + mom) * g
        assert torch.allclose(w1.float(), out["sgd." + name], rtol=1e-5, atol=1e-7), name


def check_round_trip(out_dir):
    """Reload the written files and recompute h from the stored float32 weights and inputs: the
    stored values are exactly the ones the float64 computation started from."""
    from safetensors.torch import load_file

    ck = load_file(os.path.join(out_dir, "basic_simclr.safetensors"))
    ev = load_file(os.path.join(out_dir, "basic_eval.safetensors"))
    model = build_basic_simclr(torch.Generator().manual_seed(123))
    model.load_state_dict({k[len("param.") :]: v for k, v in ck.items() if k.startswith("param.")})
    m = copy.deepcopy(model).double().train()
    h, z = m(ck["input"].double())
    assert torch.equal(h.float(), ck["h"]) and torch.equal(z.float(), ck["z"]), "basic_simclr h/z"
    m = copy.deepcopy(model.encoder).double().eval()
    with torch.no_grad():
        assert torch.equal(m(ev["input"].double()).float(), ev["h"]), "basic_eval h"

    bk = load_file(os.path.join(out_dir, "bottleneck_resnet.safetensors"))
    enc = ResNet(Bottleneck, [1, 1, 1, 1], base_width=4, stem="imagenet")
    enc.load_state_dict({k[len("param.") :]: v for k, v in bk.items() if k.startswith("param.")})
    h = copy.deepcopy(enc).double().train()(bk["input"].double())
    assert torch.equal(h.float(), bk["h"]), "bottleneck_resnet h"
    print("self-check: the written files reproduce h and z exactly")


def rel_l2(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def elementwise(a, b):
    """tests/common assert_allclose's element criterion: max |a - b| / (|b| + mean |b|)."""
    a, b = a.double(), b.double()
    return ((a - b).abs() / (b.abs() + b.abs().mean()).clamp_min(1e-300)).max().item()


def float32_headroom(res64, res32, label):
    """How far plain float32 PyTorch lands from the float64 reference (what the Rust f32 path
    can hope for): per key family, the worst relative L2 error and the worst element error in
    the sense of tests/common's assert_allclose (the Rust test's tolerance is 1e-4 on both)."""
    worst = {}
    for k, v in res64.items():
        fam = k.split(".")[0] if "." in k else k
        e, m = rel_l2(res32[k], v), elementwise(res32[k], v)
        l2, el = worst.get(fam, ((0.0, k), (0.0, k)))
        worst[fam] = (max(l2, (e, k)), max(el, (m, k)))
    print(f"{label}: float32 torch vs float64 reference, worst per family (relative L2 | element):")
    for fam, ((e, k), (m, km)) in sorted(worst.items()):
        print(f"    {fam:14s} {e:.2e} ({k}) | {m:.2e} ({km})")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures"))
    ap.add_argument("--no-self-check", action="store_true", help="skip the torchvision comparison")
    args = ap.parse_args()

    torch.set_num_threads(1)  # bit-identical reductions from run to run
    torch.use_deterministic_algorithms(True)
    os.makedirs(args.out, exist_ok=True)

    if not args.no_self_check:
        check_against_torchvision()

    model, out, meta, res64, x = make_basic_simclr(seed=0)
    check_lars_formula(out)
    check_sgd_formula(out)
    float32_headroom(res64, basic_simclr_pass(model, x, torch.float32), "basic_simclr")
    save_file(out, os.path.join(args.out, "basic_simclr.safetensors"), metadata=meta)

    eval_out, eval_meta = make_basic_eval(model, seed=1)
    save_file(eval_out, os.path.join(args.out, "basic_eval.safetensors"), metadata=eval_meta)

    bmodel, bout, bmeta, bres64, bx, br = make_bottleneck(seed=2)
    float32_headroom(bres64, bottleneck_pass(bmodel, bx, br, torch.float32), "bottleneck_resnet")
    save_file(bout, os.path.join(args.out, "bottleneck_resnet.safetensors"), metadata=bmeta)

    check_round_trip(args.out)
    for name in ["basic_simclr", "basic_eval", "bottleneck_resnet"]:
        path = os.path.join(args.out, name + ".safetensors")
        print(f"wrote {path} ({os.path.getsize(path)} bytes)")


if __name__ == "__main__":
    main()
