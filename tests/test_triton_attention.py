"""Fused multi-scale attention (``msidtrans_fast.attention``) against the reference ops.

The tests take their device from the ``kernel_device`` fixture: compiled on CUDA tensors on a GPU
machine, Triton's interpreter on CPU tensors elsewhere (see conftest.py). References run in
float64. Shapes are small and odd: head sizes 32, 48, 64; N below one block, a multiple of the
blocks, and with a partial last block; Nq != Nk (kv stride 2); batch 2; all six permutations;
non-contiguous and token-padded inputs.
"""

from __future__ import annotations

import itertools
import tempfile

import pytest
import torch
from conftest import requires_cuda
from tolerances import FP32_FWD_REL, FP32_GRAD_REL, GRADCHECK, LOWP_FACTOR, LOWP_FLOOR, rel_err

from msidtrans_fast import reference

triton = pytest.importorskip("triton")
from msidtrans_fast.kernels import msa_attention as kernels  # noqa: E402

from msidtrans_fast.attention import msa_attention  # noqa: E402

PERMS = list(itertools.permutations(range(3)))


def _inputs(b, d, h, w, kv_stride, dtype=torch.float32, device="cpu", seed=0):
    """q (b, 3, d, H*W); k, v (b, 3, d, Hk*Wk) as views into one key/value tensor."""
    gen = torch.Generator().manual_seed(seed)
    hk, wk = (h - 1) // kv_stride + 1, (w - 1) // kv_stride + 1
    q = torch.randn(b, 3, d, h * w, generator=gen, dtype=torch.float64)
    kv = torch.randn(b, 3, 2 * d, hk * wk, generator=gen, dtype=torch.float64)
    q, kv = q.to(device=device, dtype=dtype), kv.to(device=device, dtype=dtype)
    return q, kv[:, :, :d], kv[:, :, d:]


def _reference(q, k, v, perm, hw, upcast=True):
    """The reference ops, in float64 unless ``upcast`` is False (differentiable back to q, k, v
    in their own dtype)."""
    if upcast:
        q, k, v = (t.double() for t in (q, k, v))
    split = [lambda t, i=i: t[:, i].transpose(1, 2) for i in range(3)]
    return reference.multi_scale_attention([f(q) for f in split], [f(k) for f in split],
                                           [f(v) for f in split], perm, hw)


# (batch, head size, H, W, kv stride): N = 35 < one block; N = 143, Nk = 42; N = 90; N = Nk = 64,
# whole blocks only (no partial last block).
CASES = [(2, 48, 5, 7, 1), (1, 32, 13, 11, 2), (2, 64, 9, 10, 1), (1, 48, 3, 3, 2),
         (1, 32, 8, 8, 1)]


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-{}x{}-s{}".format(*c))
def test_forward_and_gradients_fp32(case, kernel_device):
    b, d, h, w, s = case
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(b, d, h, w, s, device=kernel_device)))
    perm = (2, 0, 1)
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert out.shape == (b, 3 * d, h, w) and out.is_contiguous()
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(out)
    ours = torch.autograd.grad(out, (q, k, v), grad)
    theirs = torch.autograd.grad(ref, (q, k, v), grad.double())
    for name, a, r in zip("qkv", ours, theirs, strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL, name


def _pad_tokens(t, align=kernels.TOKEN_ALIGN):
    """The producer's layout: (..., N) as a view of a zero-padded (..., N') buffer."""
    return torch.nn.functional.pad(t, (0, -t.shape[-1] % align))[..., :t.shape[-1]]


@pytest.mark.parametrize("case", [(2, 48, 5, 7, 1), (1, 32, 13, 11, 2), (1, 64, 8, 8, 1)],
                         ids=lambda c: "b{}-d{}-{}x{}-s{}".format(*c))
def test_token_padded_inputs(case, kernel_device):
    """q/k/v as the embedding produces them: token axis padded to a multiple of 16, so every
    other stride is 16-aligned (the vectorised specialisation on a GPU)."""
    b, d, h, w, s = case
    q, k, v = _inputs(b, d, h, w, s, device=kernel_device, seed=5)
    q = _pad_tokens(q).requires_grad_()
    kv = _pad_tokens(torch.cat([k, v], 2)).requires_grad_()
    k, v = kv[:, :, :d], kv[:, :, d:]
    assert all(st % 16 == 0 for t in (q, k, v) for st in t.stride()[:3])
    perm = (1, 0, 2)
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, kv), grad),
                    torch.autograd.grad(ref, (q, kv), grad.double()), strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


@pytest.mark.parametrize("case", CASES, ids=lambda c: "b{}-d{}-{}x{}-s{}".format(*c))
def test_split_tail_loops_fp32(case, kernel_device, monkeypatch):
    """The 16-bit loop structure (unmasked full blocks, then the masked partial block) forced on
    fp32, so that the interpreter checks it too: whole blocks only, a partial block only, both."""
    consts = kernels._consts
    monkeypatch.setattr(kernels, "_consts", lambda *a: {**consts(*a), "SPLIT_TAIL": True})
    b, d, h, w, s = case
    q, k, v = _inputs(b, d, h, w, s, device=kernel_device, seed=8)
    q = _pad_tokens(q).requires_grad_()
    kv = _pad_tokens(torch.cat([k, v], 2)).requires_grad_()
    k, v = kv[:, :, :d], kv[:, :, d:]
    out = msa_attention(q, k, v, (2, 1, 0), (h, w))
    ref = _reference(q, k, v, (2, 1, 0), (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, kv), grad),
                    torch.autograd.grad(ref, (q, kv), grad.double()), strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


@pytest.mark.parametrize("perm", PERMS, ids=str)
def test_every_permutation(perm, kernel_device):
    b, d, h, w, s = 2, 32, 7, 5, 2
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(b, d, h, w, s, device=kernel_device, seed=1)))
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn_like(out)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad.double()), strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


def test_groups_are_independent_and_images_too(kernel_device):
    """Changing image 1 or key scale 0 leaves image 0 / groups 1 and 2 untouched."""
    b, d, h, w, perm = 2, 32, 4, 5, (1, 2, 0)
    q, k, v = _inputs(b, d, h, w, 1, device=kernel_device, seed=2)
    out = msa_attention(q, k, v, perm, (h, w))
    k2 = k.clone()
    k2[1] += 1.0
    k2[0, 0] += 1.0
    out2 = msa_attention(q, k2, v, perm, (h, w))
    assert torch.equal(out[0, d:], out2[0, d:])
    assert not torch.equal(out[0, :d], out2[0, :d])
    assert not torch.equal(out[1], out2[1])


@pytest.mark.parametrize("d, h, w, s, b", [(48, 4, 5, 1, 2), (32, 5, 3, 2, 1), (64, 3, 4, 1, 1)])
def test_gradcheck_float64(d, h, w, s, b, kernel_device):
    q, k, v = (t.requires_grad_() for t in (t.clone() for t in _inputs(
        b, d, h, w, s, dtype=torch.float64, device=kernel_device)))
    assert torch.autograd.gradcheck(lambda q_, k_, v_: msa_attention(q_, k_, v_, (1, 2, 0), (h, w)),
                                    (q, k, v), fast_mode=True, **GRADCHECK)


def test_non_contiguous_inputs_and_grad_output(kernel_device):
    """Token-major q (a transposed view), k/v slices of one tensor, a strided grad_output."""
    b, d, h, w, perm = 2, 48, 6, 5, (0, 2, 1)
    gen = torch.Generator().manual_seed(3)
    q_tok = torch.randn(b, 3, h * w, d, generator=gen).to(kernel_device).requires_grad_()
    kv = torch.randn(b, 3, 2 * d, 7, 9, generator=gen)[..., ::2, ::2].flatten(-2)  # (.., 16)
    kv = kv.to(kernel_device).requires_grad_()
    q, k, v = q_tok.transpose(2, 3), kv[:, :, :d], kv[:, :, d:]
    assert not (q.is_contiguous() or k.is_contiguous())
    out = msa_attention(q, k, v, perm, (h, w))
    ref = _reference(q, k, v, perm, (h, w))
    assert rel_err(out, ref) <= FP32_FWD_REL
    grad = torch.randn(b, 3 * d, w, h, generator=gen).to(kernel_device).transpose(2, 3)
    ours = torch.autograd.grad(out, (q_tok, kv), grad)
    theirs = torch.autograd.grad(ref, (q_tok, kv), grad.double())
    for a, r in zip(ours, theirs, strict=True):
        assert rel_err(a, r) <= FP32_GRAD_REL


def test_no_grad_inputs_save_nothing(kernel_device):
    q, k, v = _inputs(1, 32, 3, 3, 1, device=kernel_device)
    out = msa_attention(q, k, v, (0, 1, 2), (3, 3))
    assert out.grad_fn is None


@pytest.mark.parametrize("bad, exc, match", [
    (lambda q, k, v: (q[:, :2], k, v, (0, 1, 2), (5, 7)), ValueError, "shape"),
    (lambda q, k, v: (q, k.double(), v, (0, 1, 2), (5, 7)), TypeError, "dtype"),
    (lambda q, k, v: (q.int(), k.int(), v.int(), (0, 1, 2), (5, 7)), TypeError, "dtype"),
    (lambda q, k, v: (q, k, v[..., :-1], (0, 1, 2), (5, 7)), ValueError, "same shape"),
    (lambda q, k, v: (q, k, v, (0, 1, 1), (5, 7)), ValueError, "permutation"),
    (lambda q, k, v: (q, k, v, ("a", 1, 2), (5, 7)), TypeError, "perm"),
    (lambda q, k, v: (q, k, v, (0, 1, 2), (7, 6)), ValueError, "out_hw"),
    (lambda q, k, v: (q, k[:, :, :16], v[:, :, :16], (0, 1, 2), (5, 7)), ValueError, "head size"),
    (lambda q, k, v: (q.numpy(), k, v, (0, 1, 2), (5, 7)), TypeError, "q must be"),
])
def test_bad_inputs_raise(bad, exc, match):
    q, k, v = _inputs(1, 32, 5, 7, 1)
    with pytest.raises(exc, match=match):
        msa_attention(*bad(q, k, v))


@requires_cuda
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("case", [(2, 64, 33, 33, 1), (1, 48, 65, 65, 1), (2, 32, 130, 129, 2)])
@pytest.mark.parametrize("padded", [False, True], ids=["contiguous", "token-padded"])
def test_low_precision_gpu(dtype, case, padded):
    """fp16/bf16 against the float64 reference, within twice PyTorch's own error in that dtype
    (plus a floor), in both layouts: contiguous and token-padded (the vectorised fast path)."""
    b, d, h, w, s = case
    q32, k32, v32 = (t.requires_grad_() for t in
                     (t.clone() for t in _inputs(b, d, h, w, s, device="cuda")))
    q, k, v = (t.detach().to(dtype) for t in (q32, k32, v32))
    if padded:
        q, k, v = (_pad_tokens(t) for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    perm = (1, 2, 0)
    ref = _reference(q32, k32, v32, perm, (h, w))
    torch_lowp = _reference(q, k, v, perm, (h, w), upcast=False)
    out = msa_attention(q, k, v, perm, (h, w))
    floor = LOWP_FLOOR[dtype]
    bound = LOWP_FACTOR * (torch_lowp.float() - ref).abs().max().item() + floor
    assert (out.float() - ref).abs().max().item() <= bound
    grad = torch.randn_like(ref)
    for a, p, r in zip(torch.autograd.grad(out, (q, k, v), grad.to(dtype)),
                       torch.autograd.grad(torch_lowp, (q, k, v), grad.to(dtype)),
                       torch.autograd.grad(ref, (q32, k32, v32), grad.double()),
                       strict=True):
        bound = LOWP_FACTOR * (p.float() - r).abs().max().item() + floor
        assert (a.float() - r).abs().max().item() <= bound


@requires_cuda
@pytest.mark.gpu
def test_deterministic_gpu():
    """Repeated forward and backward give bit-identical results (no atomics, no races)."""
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(2, 64, 65, 65, 1, dtype=torch.float16, device="cuda")))
    grad = torch.randn(2, 192, 65, 65, device="cuda", dtype=torch.float16)
    first = None
    for _ in range(3):
        out = msa_attention(q, k, v, (2, 1, 0), (65, 65))
        result = (out, *torch.autograd.grad(out, (q, k, v), grad))
        if first is None:
            first = result
        assert all(torch.equal(a, r) for a, r in zip(result, first, strict=True))


def test_custom_ops_opcheck(kernel_device):
    """The launchers' torch.library ops: schema, fake kernels (shapes, strides), tracing."""
    q, k, v = _inputs(2, 48, 5, 7, 2, device=kernel_device)
    perm = [2, 0, 1]
    ops = torch.ops.msidtrans_fast
    torch.library.opcheck(ops.msa_attention_forward, (q, k, v, perm, 5, 7))
    out, lse = ops.msa_attention_forward(q, k, v, perm, 5, 7)
    grad = torch.randn_like(out)
    torch.library.opcheck(ops.msa_attention_backward, (grad, q, k, v, out, lse, perm))


def test_torch_compile_fullgraph(kernel_device):
    """torch.compile traces the Function and its custom ops without graph breaks."""
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(1, 32, 5, 7, 2, device=kernel_device)))

    def attend(q_, k_, v_):
        return msa_attention(q_, k_, v_, (2, 0, 1), (5, 7))

    compiled = torch.compile(attend, backend="aot_eager", fullgraph=True)
    out, ref = compiled(q, k, v), attend(q, k, v)
    assert torch.equal(out, ref)
    grad = torch.randn_like(ref)
    for a, r in zip(torch.autograd.grad(out, (q, k, v), grad),
                    torch.autograd.grad(ref, (q, k, v), grad), strict=True):
        assert torch.equal(a, r)


def test_launchers_guard_the_tensors_device(kernel_device, monkeypatch):
    """Every launch runs inside ``device_guard`` of the inputs' device (Triton launches on the
    current CUDA device, not the tensors')."""
    seen = []
    guard = kernels.device_guard

    def recording_guard(device):
        seen.append(torch.device(device))
        return guard(device)

    monkeypatch.setattr(kernels, "device_guard", recording_guard)
    q, k, v = (t.requires_grad_() for t in
               (t.clone() for t in _inputs(1, 32, 3, 4, 1, device=kernel_device)))
    out = msa_attention(q, k, v, (0, 1, 2), (3, 4))
    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    assert seen == [q.device, q.device]  # forward, backward


def test_device_guard_selects_the_given_gpu():
    """The guard for ``cuda:1`` switches to device 1; CPU and index-less devices need none."""
    from msidtrans_fast.kernels import device_guard

    assert device_guard(torch.device("cuda:1")).idx == 1
    for device in ("cpu", "cuda"):
        with device_guard(torch.device(device)):
            pass


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_second_gpu_matches_first():
    """Inputs on cuda:1 while cuda:0 is current: the kernels run on cuda:1, with cuda:0's
    results (without the guard they would read cuda:1 pointers on cuda:0)."""
    q, k, v = _inputs(2, 48, 9, 10, 2)
    results = []
    for device in ("cuda:0", "cuda:1"):
        torch.cuda.set_device(0)
        args = [t.to(device).requires_grad_() for t in (q, k, v)]
        out = msa_attention(*args, (2, 0, 1), (9, 10))
        grads = torch.autograd.grad(out, args, torch.ones_like(out))
        torch.cuda.synchronize(device)
        assert out.device == torch.device(device)
        results.append([t.cpu() for t in (out, *grads)])
    for a, r in zip(*results, strict=True):
        assert rel_err(a, r) <= FP32_FWD_REL


def test_offsets_past_int32(kernel_device):
    """q with a channel stride of 2**27 + 3 elements: ``channel * stride`` and
    ``group * stride`` pass 2**31, where int32 offsets wrap (and read the wrong memory). On the
    CPU the storage is a sparse file mapping (about 50 GB of address space, a few MB touched);
    on a GPU it is allocated when there is room."""
    d, h, w, stride_c = 32, 4, 5, 2 ** 27 + 3
    numel = 3 * d * stride_c
    with tempfile.NamedTemporaryFile() as f:
        if kernel_device.type == "cpu":
            f.truncate(numel * 4)
            storage = torch.from_file(f.name, shared=True, size=numel, dtype=torch.float32)
        else:
            if torch.cuda.mem_get_info()[0] < 1.2 * numel * 4:
                pytest.skip(f"needs {numel * 4 / 2 ** 30:.0f} GiB of free GPU memory")
            storage = torch.empty(numel, device=kernel_device)
        q = storage.as_strided((1, 3, d, h * w), (3 * d * stride_c, d * stride_c, stride_c, 1))
        q_small, k, v = _inputs(1, d, h, w, 1, device=kernel_device, seed=6)
        tile_strides = kernels._tile_strides
        assert kernels._offset_dtype(*tile_strides(q, k, v)) == kernels.tl.int64
        assert kernels._offset_dtype(*tile_strides(q_small, k, v)) == kernels.tl.int32
        q.copy_(q_small)
        q.requires_grad_()
        out = msa_attention(q, k, v, (2, 0, 1), (h, w))
        ref = _reference(q_small, k, v, (2, 0, 1), (h, w))
        assert rel_err(out, ref) <= FP32_FWD_REL
        q_small.requires_grad_()
        grad = torch.randn_like(out)
        dq = torch.autograd.grad(out, q, grad)[0]
        dq_ref = torch.autograd.grad(_reference(q_small, k, v, (2, 0, 1), (h, w)), q_small,
                                     grad.double())[0]
        assert rel_err(dq, dq_ref) <= FP32_GRAD_REL
        del q, storage


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_every_tuning_config_gives_the_same_result(kernel_device, dtype):
    """The configurations of each tuning space only change tile sizes that do not split a
    reduction (and warps, stages), so on a GPU all give the same numbers, bit for bit: which one
    the tuner picks never changes a result. The interpreter computes a tile's matrix product with
    numpy, whose summation order may depend on the tile's shape: there, fp32 tolerance."""
    if dtype != torch.float32 and kernel_device.type != "cuda":
        pytest.skip("16-bit dots need the GPU compiler")
    same = torch.equal if kernel_device.type == "cuda" else (
        lambda a, r: rel_err(a, r) <= FP32_FWD_REL)
    b, d, h, w, s = 2, 48, 9, 10, 2
    q, k, v = (t.to(dtype) for t in _inputs(b, d, h, w, s, device=kernel_device, seed=7))
    grad = torch.randn(b, 3 * d, h, w, device=kernel_device).to(dtype)
    perm = (1, 2, 0)
    out, lse = kernels.msa_attention_forward(q, k, v, perm, (h, w))
    for cfg in kernels.configs_for(kernels.FWD_CONFIGS, q.dtype):
        again, lse_again = kernels.msa_attention_forward(q, k, v, perm, (h, w), config=cfg)
        assert same(again, out) and same(lse_again, lse), cfg
    first = kernels.msa_attention_backward(grad, q, k, v, out, lse, perm)
    choices = ([{"dkdv": c} for c in kernels.configs_for(kernels.DKDV_CONFIGS, q.dtype)]
               + [{"dq": c} for c in kernels.configs_for(kernels.DQ_CONFIGS, q.dtype)])
    for configs in choices:
        grads = kernels.msa_attention_backward(grad, q, k, v, out, lse, perm, configs=configs)
        assert all(same(a, r) for a, r in zip(grads, first, strict=True)), configs




SPACES = {"fwd": kernels.FWD_CONFIGS, "dq": kernels.DQ_CONFIGS, "dkdv": kernels.DKDV_CONFIGS}


def _tiles(cfg) -> tuple:
    return cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages


def _left_out(space, dtype, capability, version) -> list[tuple]:
    """``_tiles`` of the dtype's configurations that the tuner leaves out."""
    kept = {id(c) for c in kernels.launch_configs(space, dtype, capability, version)}
    return [_tiles(c) for c in kernels.configs_for(space, dtype) if id(c) not in kept]


@pytest.mark.parametrize("capability", [(8, 0), (8, 6), (9, 0), (10, 0), (12, 0)], ids=str)
@pytest.mark.parametrize("version", [(3, 6), (3, 8), (3, 9), (3, 10)], ids=str)
def test_tuner_leaves_out_spilling_configs(capability, version):
    """The pruning rule alone (no GPU): the tuner tries the dtype's configurations less exactly
    those listed as spilling (16-bit ones only) for that GPU generation and Triton release, and
    at least one."""
    listed = kernels._SPILLS.get((capability[0], version >= (3, 9)), set())
    for name, space in SPACES.items():
        for dtype in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            assert kernels.launch_configs(space, dtype, capability, version), (name, dtype)
            expected = [t for t in map(_tiles, kernels.configs_for(space, dtype))
                        if dtype in (torch.float16, torch.bfloat16) and (name, *t) in listed]
            assert _left_out(space, dtype, capability, version) == expected, (name, dtype)


def test_spilling_configs_are_those_measured():
    """The cases measured with tools/inspect_kernels.py: on sm_80 the 64x64 4-warp 3-stage
    16-bit forward spills (Triton 3.9); on sm_90 with Triton 3.6 the 64x64 4-warp 2-stage 16-bit
    dK/dV does, and with 3.9 nothing does."""
    bf16 = torch.bfloat16
    assert _left_out(kernels.FWD_CONFIGS, bf16, (8, 0), (3, 9)) == [(64, 64, 4, 3)]
    assert (64, 64, 4, 2) in _left_out(kernels.DKDV_CONFIGS, bf16, (9, 0), (3, 6))
    assert all(_left_out(space, bf16, (9, 0), (3, 9)) == [] for space in SPACES.values())
    # sm_80 before Triton 3.9: every 64-key dK/dV tile spills; the 32-key one runs.
    kept = kernels.launch_configs(kernels.DKDV_CONFIGS, bf16, (8, 0), (3, 6))
    assert [(c.kwargs["BLOCK_N"], c.num_warps) for c in kept] == [(32, 4)]
