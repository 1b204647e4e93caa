"""The whole network with backend "triton" against backend "reference".

The parity tests take their device from the ``kernel_device`` fixture: compiled on CUDA tensors on
a GPU machine, Triton's interpreter on CPU tensors elsewhere (see conftest.py), so the image is tiny
and odd (13x11: the attention layers see 1x1, 2x2 and 4x3 grids, every kv length below a block).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import pytest
import torch
from conftest import requires_cuda
from tolerances import LOWP_FACTOR, MODEL_GRAD_FLOOR, MODEL_REL, ZERO_GRAD_REL, rel_err

import msidtrans_fast
from msidtrans_fast import MSIDTrans, backends, modules

triton = pytest.importorskip("triton")
from msidtrans_fast import triton_backend  # noqa: E402

Q_PERMS = [(1, 2, 0), (2, 0, 1), (0, 2, 1), (1, 0, 2)]


def _model(seed=0):
    torch.manual_seed(seed)
    model = MSIDTrans()
    with torch.no_grad():  # non-trivial BatchNorm affine parameters and running statistics
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.weight.uniform_(0.8, 1.2)
                m.bias.normal_(0, 0.1)
                m.running_mean.normal_(0, 0.1)
                m.running_var.uniform_(0.5, 1.5)
    return model


def _inputs(b, h, w, device="cpu", seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.rand(b, 3, h, w, generator=gen) * 2 - 1).to(device) for _ in range(2)]


def test_backend_registration():
    assert "triton" in backends.available_backends()
    assert modules.ATTENTION_IMPLS["triton"] is triton_backend.attention_block
    assert backends.resolve_backend("auto", "cpu") == "reference"
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert backends.resolve_backend("triton", "cpu") == "triton"
        assert triton_backend.can_run(torch.device("cpu")) is None
    assert hasattr(msidtrans_fast, "triton_backend")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    environ = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    environ.update(env)
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=environ, timeout=120, check=False)


def test_cpu_without_interpreter_is_refused_with_a_reason():
    code = ("import msidtrans_fast\n"
            "assert msidtrans_fast.resolve_backend('auto', 'cpu') == 'reference'\n"
            "try:\n"
            "    msidtrans_fast.resolve_backend('triton', 'cpu')\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr
    assert "TRITON_INTERPRET=1" in result.stdout


def test_import_survives_a_missing_triton():
    code = ("import sys\nsys.modules['triton'] = None\n"
            "import msidtrans_fast\n"
            "assert 'triton' not in msidtrans_fast.available_backends()\n"
            "assert msidtrans_fast.MSIDTrans is not None\n")
    result = _python(code)
    assert result.returncode == 0, result.stderr


def _biases_before_batchnorm(model: torch.nn.Module) -> set[str]:
    """Names of the convolution biases that feed a BatchNorm directly (true gradient 0 in train
    mode)."""
    names = set()
    for seq_name, seq in model.named_modules():
        if isinstance(seq, torch.nn.Sequential):
            children = list(seq.named_children())
            for (name, conv), (_, norm) in zip(children, children[1:], strict=False):
                if (isinstance(conv, torch.nn.Conv2d) and conv.bias is not None
                        and isinstance(norm, torch.nn.BatchNorm2d)):
                    names.add(f"{seq_name}.{name}.bias")
    return names


def test_train_step_matches_reference(monkeypatch, kernel_device):
    """Train mode, batch 2, 13x11: output, every parameter's gradient, BatchNorm buffers."""
    if triton_backend.can_run(kernel_device) is not None:
        pytest.skip(triton_backend.can_run(kernel_device))
    calls = []

    def counted(block, x, perm):
        calls.append(tuple(perm))
        return triton_backend.attention_block(block, x, perm)

    monkeypatch.setitem(modules.ATTENTION_IMPLS, "triton", counted)
    ref_model = _model().to(kernel_device)
    model = copy.deepcopy(ref_model)
    ref_model.backend, model.backend = "reference", "triton"
    ref_model.train()
    model.train()
    a, b = _inputs(2, 13, 11, device=kernel_device)
    out = model(a, b, q_perms=Q_PERMS)
    out_ref = ref_model(a, b, q_perms=Q_PERMS)
    assert calls == Q_PERMS  # every attention layer ran fused, with its own permutation
    assert rel_err(out, out_ref) <= MODEL_REL
    gen = torch.Generator().manual_seed(2)
    grad = torch.rand(out.shape, generator=gen).to(kernel_device)
    out.backward(grad)
    out_ref.backward(grad)
    largest = max(p.grad.abs().max().item() for p in ref_model.parameters()
                  if p.grad is not None)
    checked = 0
    zero_grad = _biases_before_batchnorm(model)
    assert len(zero_grad) > 20
    for (name, p), p_ref in zip(model.named_parameters(), ref_model.parameters(), strict=True):
        assert (p.grad is None) == (p_ref.grad is None), name
        if p_ref.grad is not None and name in zero_grad:
            for g in (p.grad, p_ref.grad):
                assert g.abs().max().item() <= ZERO_GRAD_REL * largest, name
            checked += 1
        elif p_ref.grad is not None:
            scale = max(p_ref.grad.abs().max().item(), MODEL_GRAD_FLOOR * largest)
            assert (p.grad - p_ref.grad).abs().max().item() <= MODEL_REL * scale, name
            checked += 1
    assert checked > 250  # every parameter but the never-called sub2 of the RSE modules
    for (name, buf), buf_ref in zip(model.named_buffers(), ref_model.buffers(), strict=True):
        if buf.dtype == torch.long:
            assert torch.equal(buf, buf_ref), name
        else:
            assert rel_err(buf, buf_ref) <= MODEL_REL, name
    assert all(int(m.num_batches_tracked) == 1 for name, m in model.named_modules()
               if isinstance(m, torch.nn.BatchNorm2d) and "Token_Embeding" in name)


def test_eval_matches_reference_and_state_dict_unchanged(kernel_device):
    if triton_backend.can_run(kernel_device) is not None:
        pytest.skip(triton_backend.can_run(kernel_device))
    model = _model().to(kernel_device).eval()
    keys = list(model.state_dict())
    a, b = _inputs(1, 9, 14, device=kernel_device, seed=3)
    with torch.no_grad():
        model.backend = "reference"
        ref = model(a, b)
        model.backend = "triton"
        out = model(a, b)
    assert rel_err(out, ref) <= MODEL_REL
    assert list(model.state_dict()) == keys


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_model_low_precision_gpu(dtype):
    """Autocast inference: the triton backend's error against fp32 stays within twice the
    reference backend's error under the same autocast, plus a floor of 1e-2 on a sigmoid map."""
    model = _model().cuda().eval()
    a, b = _inputs(1, 130, 97, device="cuda")
    with torch.no_grad():
        model.backend = "reference"
        ref = model(a, b)
        with torch.autocast("cuda", dtype=dtype):
            ref_lowp = model(a, b)
            model.backend = "triton"
            out = model(a, b)
    bound = LOWP_FACTOR * (ref_lowp.float() - ref).abs().max().item() + 1e-2
    assert (out.float() - ref).abs().max().item() <= bound
