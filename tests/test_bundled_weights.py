"""The weights shipped in the package: format, default use, and that they really fuse."""

import json
import warnings

import numpy as np
import pytest
import torch
from conftest import TESTS_DIR

from msidtrans_fast import datasets, fuse, pipeline, weights

skimage_data = pytest.importorskip("skimage.data", reason="scikit-image is a test dependency")


def test_file_is_a_small_fp16_state_dict_with_the_original_keys():
    path = weights.BUNDLED_WEIGHTS
    assert path.is_file(), f"the bundled weights are missing: {path}"
    assert path.stat().st_size <= 8 * 2 ** 20
    state = torch.load(path, map_location="cpu", weights_only=True)
    original = json.loads((TESTS_DIR / "fixtures" / "original_state_dict_keys.json").read_text())
    assert [(k, list(v.shape)) for k, v in state.items()] == [(k, s) for k, s in original]
    assert {v.dtype for v in state.values() if v.is_floating_point()} == {torch.float16}
    assert all(torch.isfinite(v.float()).all() for v in state.values())


def test_fuse_uses_them_by_default_without_warning():
    pipeline.clear_model_cache()
    pair = [np.full((16, 16, 3), v, np.uint8) for v in (10, 200)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", weights.UntrainedWeightsWarning)
        fuse(pair)
    model = pipeline.get_model()
    bundled = torch.load(weights.BUNDLED_WEIGHTS, map_location="cpu", weights_only=True)
    for name, value in model.state_dict().items():
        torch.testing.assert_close(value, bundled[name].to(value.dtype), rtol=0, atol=0)


def _half_focus_pair(sigma: float = 2.0):
    """A photo sharp on the left in A and on the right in B, (128, 128, 3) uint8 each."""
    img = torch.from_numpy(skimage_data.astronaut()[::4, ::4].copy()).permute(2, 0, 1).float()
    img = img[:, :128, :128] / 255
    blurred = datasets.gaussian_blur(img, sigma)
    left = torch.zeros(1, 128, 128)
    left[..., :64] = 1
    a = left * img + (1 - left) * blurred
    b = (1 - left) * img + left * blurred

    def to_u8(x):
        return (x.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)

    return to_u8(a), to_u8(b), left[0].numpy() > 0.5


def test_they_pick_the_sharp_source():
    a, b, truth = _half_focus_pair()
    _, d = fuse([a, b], return_decision_map=True)
    _, d_swapped = fuse([b, a], return_decision_map=True)
    assert ((d > 0.5) == truth).mean() > 0.9
    assert ((d_swapped > 0.5) == ~truth).mean() > 0.9
