"""Benchmarks of the compiled ops (msidtrans_fast._C) against what the original used.

    python -m pytest benchmarks/bench_ops.py --benchmark-json=ops.json

``remove_small_regions`` on decision-map-like masks of 520x520 (Lytro), 2048x2048 and 4096x4096,
``min_area = ceil(0.001 * H * W)`` (the original's threshold):
- ``compiled``: :func:`msidtrans_fast.ops.remove_small_regions` (C++ union-find on CPU, the CUDA
  union-find labelling on a GPU);
- ``fallback``: the plain-PyTorch labelling used when the extension is missing;
- ``skimage``: the original's two ``remove_small_objects`` calls (scikit-image, CPU, numpy in and
  out; the original also paid a device-to-host copy of the map, not counted here).

``haar_split`` forward on the encoder shapes of a 520x520 and a 1024x1024 input (batch 1: the
Encoder1 split at H1 with 32 channels, the 48-channel split at H3):
- ``compiled`` / ``reference``: :func:`msidtrans_fast.ops.haar_split` / the plain-PyTorch
  :func:`msidtrans_fast.reference.haar_split`, forward and forward+backward;
- ``pywt``: the original's round trip (tensor to numpy, ``pywt.dwt2(x, 'haar', mode='zero')``,
  back to torch and concatenated), forward only (it has no backward).

CUDA variants run on a GPU only (synchronised around each call) and skip here otherwise. Each row
carries device, dtype, shape, torch version and commit in ``extra_info``; nothing asserts speed.
"""

from __future__ import annotations

import math
import platform
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from msidtrans_fast import ops, reference

REGION_SIDES = (520, 2048, 4096)
HAAR_SHAPES = {"520_enc1": (1, 32, 260, 260), "520_enc3": (1, 48, 65, 65),
               "1024_enc1": (1, 32, 512, 512), "1024_enc3": (1, 48, 128, 128)}
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA GPU here"))]


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, cwd=Path(__file__).parent, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def info(benchmark, device: str, **extra) -> None:
    benchmark.extra_info.update(
        device=torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu",
        threads=torch.get_num_threads(), torch=torch.__version__, commit=commit(),
        compiled=ops.compiled(), **extra)


def decision_map(side: int, seed: int = 0) -> torch.Tensor:
    """(1, 1, side, side) bool map shaped like a fusion decision map: large smooth regions from
    upsampled coarse noise, plus speckle (small islands and holes) near the boundaries."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 1, max(side // 64, 2), max(side // 64, 2), generator=g)
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    speckle = torch.rand(1, 1, side, side, generator=g) * 0.2 - 0.1
    return (smooth + speckle) > 0.5


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@pytest.mark.parametrize("side", REGION_SIDES)
@pytest.mark.parametrize("impl", ["compiled", "fallback", "skimage"])
@pytest.mark.parametrize("device", DEVICES)
def test_remove_small_regions(benchmark, side, impl, device):
    mask = decision_map(side)
    area = math.ceil(0.001 * side * side)
    if impl == "skimage":
        if device != "cpu":
            pytest.skip("scikit-image runs on the CPU only")
        morphology = pytest.importorskip("skimage.morphology")
        m = mask[0, 0].numpy()

        def run():
            kept = morphology.remove_small_objects(m, max_size=area - 1)
            return ~morphology.remove_small_objects(~kept, max_size=area - 1)
    elif impl == "compiled":
        if not ops.compiled()["remove_small_regions"][device]:
            pytest.skip(f"msidtrans_fast._C has no {device} remove_small_regions")
        m = mask.to(device)

        def run():
            out = ops.remove_small_regions(m, area)
            sync(device)
            return out
    else:
        if side > 2048:
            pytest.skip("the PyTorch fallback needs several GB at 4096x4096; not timed")
        m = mask[:, 0].to(device)

        def run():
            out = ops._remove_small_regions_fallback(m, area)
            sync(device)
            return out
    info(benchmark, device, shape=[1, 1, side, side], min_area=area, dtype="bool",
         foreground=float(mask.float().mean()))
    rounds = 3 if side >= 4096 or impl == "fallback" else 10
    benchmark.pedantic(run, rounds=rounds, warmup_rounds=1)


def pywt_round_trip(x: torch.Tensor):
    import pywt

    c_a, (c_h, c_v, c_d) = pywt.dwt2(x.detach().cpu().numpy(), "haar", mode="zero")
    low = torch.from_numpy(c_a).to(x.device)
    high = torch.from_numpy(np.concatenate([c_h, c_v, c_d], axis=1)).to(x.device)
    return low, high


@pytest.mark.parametrize("shape", HAAR_SHAPES)
@pytest.mark.parametrize("impl", ["compiled", "reference", "pywt"])
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd_bwd"])
@pytest.mark.parametrize("device", DEVICES)
def test_haar_split(benchmark, shape, impl, backward, device):
    if impl == "pywt":
        pytest.importorskip("pywt")
        if backward:
            pytest.skip("the PyWavelets round trip has no backward")
    if impl == "compiled" and not ops.compiled()["haar_split"][device]:
        pytest.skip(f"msidtrans_fast._C has no {device} haar_split")
    fn = {"compiled": ops.haar_split, "reference": reference.haar_split,
          "pywt": pywt_round_trip}[impl]
    x = torch.randn(HAAR_SHAPES[shape], generator=torch.Generator().manual_seed(0)).to(device)
    x.requires_grad_(backward)
    grads = None
    if backward:
        low, high = fn(x)
        grads = (torch.randn_like(low), torch.randn_like(high))

    def run():
        low, high = fn(x)
        if grads is not None:
            torch.autograd.backward((low, high), grads)
        sync(device)

    info(benchmark, device, shape=list(x.shape), dtype="float32",
         megabytes_moved=2 * x.numel() * 4 / 1e6 * (2 if backward else 1))
    benchmark.pedantic(run, rounds=10, warmup_rounds=2)
