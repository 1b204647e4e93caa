"""Multi-scale flash attention of MSI-DTrans: Triton kernels and their launchers.

Algorithm (FlashAttention-2, Dao 2023): the forward pass streams key/value blocks through an
online softmax (running maximum ``m`` and normaliser ``l`` per query row, scores in base-2 units so
that ``exp2`` can be used), keeps the output tile in registers and stores it once, together with the
per-row log-sum-exp of the scaled scores (fp32), kept in base-2 units
(``lse2 = log2(sum_j exp2(s_ij * d**-0.5 * LOG2E))``, i.e. the natural log-sum-exp times LOG2E) so
that the backward pass recomputes ``p = exp2(s * qk_scale - lse2)`` with the very same constant. The
backward pass recomputes the probabilities from ``lse``: a preprocess kernel computes
``delta_i = sum_c dO_ic * O_ic``; one kernel per key block accumulates ``dV = P^T dO`` and
``dK = scale * dS^T Q`` over all query blocks; one kernel per query block accumulates
``dQ = scale * dS K`` over all key blocks (``dS = P * (dP - delta)``, ``dP = dO V^T``). Two
backward kernels instead of one fused kernel with atomic dQ updates: no atomics means results are
deterministic and fp32 dQ needs no extra buffer, at the price of computing ``Q K^T`` twice.
Nothing of size N x N is ever stored; memory is linear in the number of tokens.

Multi-scale grouping: every image has three groups; group ``g`` pairs the queries of scale
``perm[g]`` with the keys/values of scale ``g``. Groups are selected with pointer offsets (the
permutation is packed into one integer ``perm_code = perm[0] + 3 perm[1] + 9 perm[2]``); nothing is
copied. Programs are laid out as ``(token block, batch * 3 + group)``.

Layouts (all given as strides, so any strided view works; the fast case is token stride 1):
    q:        (b, 3, d, Nq)  scale, channel, token; the channel-major layout a 1x1 convolution
              produces, flattened over pixels (row-major). Token stride 1 makes every tile load
              coalesced along tokens.
    k, v:     (b, 3, d, Nk)  likewise (Nk = Hk * Wk, the key/value grid at stride ``kv_stride``).
    out:      (b, 3 * d, H, W) with channel ``g * d + c``: the layout ``to_out`` consumes. Tiles are
              stored transposed (token-contiguous), i.e. straight into this layout.
    lse, delta: (b, 3, Nq), fp32 (fp64 for fp64 inputs), indexed by group.

Limits: head size d <= 128 (padded to the next power of two and masked, so 48 runs as 64);
Nq, Nk >= 1, any values. fp16/bf16/fp32 inputs accumulate in fp32 (fp64 inputs, for gradcheck,
accumulate in fp64). fp32 matrix products use ``input_precision="ieee"`` so a GPU gives fp32 (not
TF32) accuracy; 16-bit inputs use the tensor cores' native fp16/bf16 products.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

#: log2(e): scores are scaled by ``d**-0.5 * LOG2E`` so that ``exp(x) == exp2(x * LOG2E)``.
LOG2E = 1.4426950408889634
#: Largest supported head size (the padded head block must fit the registers of one program).
MAX_HEAD_DIM = 128
GROUPS = 3


@triton.jit
def _query_scale(group, perm_code):
    """Scale index of the queries used by ``group`` (0, 1, 2) from the packed permutation."""
    power = tl.where(group == 0, 1, tl.where(group == 1, 3, 9))
    return (perm_code // power) % 3


@triton.jit
def _msa_fwd_kernel(
    Q, K, V, OUT, LSE,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    so_b, so_c, so_n,
    n_q, n_k, qk_scale, perm_code,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = pid_bg % 3
    q_scale = _query_scale(group, perm_code)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM

    q_base = Q + batch * sq_b + q_scale * sq_g
    k_base = K + batch * sk_b + group * sk_g
    v_base = V + batch * sv_b + group * sv_g
    q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :] * sq_c,
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_k
        k_t = tl.load(k_base + offs_d[:, None] * sk_c + offs_n[None, :] * sk_n,
                      mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
        s = tl.where(mask_n[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * sv_n + offs_d[None, :] * sv_c,
                    mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(ACC_DTYPE)
        m_i = m_new

    acc = acc / l_i[:, None]
    o_base = OUT + batch * so_b + (group * HEAD_DIM) * so_c
    tl.store(o_base + offs_d[None, :] * so_c + offs_m[:, None] * so_n,
             acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # Base-2 log-sum-exp of the scores in base-2 units; the backward pass uses the same units.
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE + pid_bg.to(tl.int64) * n_q + offs_m, lse2, mask=mask_m)


@triton.jit
def _msa_bwd_preprocess_kernel(
    OUT, DO, DELTA,
    so_b, so_c, so_n,
    sdo_b, sdo_c, sdo_n,
    n_q,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = pid_bg % 3
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    channel = group * HEAD_DIM + offs_d[None, :]
    o = tl.load(OUT + batch * so_b + channel * so_c + offs_m[:, None] * so_n, mask=mask, other=0.0)
    do = tl.load(DO + batch * sdo_b + channel * sdo_c + offs_m[:, None] * sdo_n,
                 mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(DELTA + pid_bg.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _msa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    sdo_b, sdo_c, sdo_n,
    sdk_b, sdk_g, sdk_c, sdk_n,
    n_q, n_k, qk_scale, sm_scale, perm_code,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key block, batch * 3 + group); dK and dV share the strides ``sdk_*``."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = pid_bg % 3
    q_scale = _query_scale(group, perm_code)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_k
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]

    q_base = Q + batch * sq_b + q_scale * sq_g
    do_base = DO + batch * sdo_b + (group * HEAD_DIM) * sdo_c
    row_base = pid_bg.to(tl.int64) * n_q
    k = tl.load(K + batch * sk_b + group * sk_g + offs_n[:, None] * sk_n + offs_d[None, :] * sk_c,
                mask=mask_nd, other=0.0)
    v = tl.load(V + batch * sv_b + group * sv_g + offs_n[:, None] * sv_n + offs_d[None, :] * sv_c,
                mask=mask_nd, other=0.0)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    for start_m in range(0, n_q, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        mask_m = offs_m < n_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_base + offs_m[:, None] * sq_n + offs_d[None, :] * sq_c,
                    mask=mask_md, other=0.0)
        do = tl.load(do_base + offs_m[:, None] * sdo_n + offs_d[None, :] * sdo_c,
                     mask=mask_md, other=0.0)
        lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
        delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
        # Transposed scores s^T (keys x queries), probabilities recomputed from the saved lse.
        s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION).to(ACC_DTYPE)
        p_t = tl.exp2(s_t * qk_scale - lse[None, :])
        p_t = tl.where(mask_n[:, None] & mask_m[None, :], p_t, 0.0)
        dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION).to(ACC_DTYPE)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(ACC_DTYPE)
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION).to(ACC_DTYPE)

    dk = dk * sm_scale
    out_offs = batch * sdk_b + group * sdk_g + offs_n[:, None] * sdk_n + offs_d[None, :] * sdk_c
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _msa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    sdo_b, sdo_c, sdo_n,
    sdq_b, sdq_g, sdq_c, sdq_n,
    n_q, n_k, qk_scale, sm_scale, perm_code,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query block, batch * 3 + group); writes dQ of scale ``perm[group]``.

    ``perm`` is a permutation, so every query scale is written by exactly one group: no atomics.
    """
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = pid_bg % 3
    q_scale = _query_scale(group, perm_code)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(Q + batch * sq_b + q_scale * sq_g + offs_m[:, None] * sq_n
                + offs_d[None, :] * sq_c, mask=mask_md, other=0.0)
    do = tl.load(DO + batch * sdo_b + (group * HEAD_DIM + offs_d[None, :]) * sdo_c
                 + offs_m[:, None] * sdo_n, mask=mask_md, other=0.0)
    row_base = pid_bg.to(tl.int64) * n_q
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_base = K + batch * sk_b + group * sk_g
    v_base = V + batch * sv_b + group * sv_g

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    for start_n in range(0, n_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < n_k
        mask_dn = mask_d[:, None] & mask_n[None, :]
        k_t = tl.load(k_base + offs_d[:, None] * sk_c + offs_n[None, :] * sk_n,
                      mask=mask_dn, other=0.0)
        v_t = tl.load(v_base + offs_d[:, None] * sv_c + offs_n[None, :] * sv_n,
                      mask=mask_dn, other=0.0)
        s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE)
        p = tl.exp2(s * qk_scale - lse[:, None])
        p = tl.where(mask_m[:, None] & mask_n[None, :], p, 0.0)
        dp = tl.dot(do, v_t, input_precision=PRECISION).to(ACC_DTYPE)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION).to(ACC_DTYPE)

    dq = dq * sm_scale
    tl.store(DQ + batch * sdq_b + q_scale * sdq_g + offs_m[:, None] * sdq_n
             + offs_d[None, :] * sdq_c, dq.to(DQ.dtype.element_ty), mask=mask_md)


# ------------------------------------------------------------------------------------ launchers

def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return torch.cuda.get_device_properties(device).multi_processor_count


def _config(dtype: torch.dtype, head_dim: int, forward: bool,
            programs_if_wide: int = 0, num_sms: int = 0) -> tuple[dict, dict]:
    """``(constexprs, launch options)`` for one dtype / head size / direction.

    Untuned starting points (no GPU was available to tune them), chosen so that compiled for
    sm_90 no kernel spills registers (checked with ``tools/inspect_kernels.py``). 16-bit inputs
    (tensor-core dots): the forward uses 128-query tiles with 8 warps, as the Triton
    fused-attention tutorial does on Hopper, unless that would leave streaming multiprocessors
    idle (``programs_if_wide < num_sms``: t0 of a 520x520 input has 27 such tiles); otherwise,
    and in the backward, 64 x 64 tiles with 4 warps. fp32/fp64 (FMA dots, IEEE precision): 64 x 32
    tiles forward and 32 x 32 backward, on 8 warps; 64 x 64 tiles on 4 warps spilled 5-11 KB per
    thread at head sizes 48 and 64.
    """
    block_d = max(16, triton.next_power_of_2(head_dim))
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    consts = {"HEAD_DIM": head_dim, "BLOCK_D": block_d, "ACC_DTYPE": acc, "PRECISION": "ieee"}
    if dtype in (torch.float16, torch.bfloat16):
        wide = forward and programs_if_wide >= num_sms
        consts.update(BLOCK_M=128 if wide else 64, BLOCK_N=64)
        return consts, {"num_warps": 8 if wide else 4, "num_stages": 3 if wide else 2}
    consts.update(BLOCK_M=64 if forward else 32, BLOCK_N=32)
    return consts, {"num_warps": 8, "num_stages": 2}


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_perm(perm) -> int:
    """``perm[0] + 3 perm[1] + 9 perm[2]``: the permutation as one kernel argument."""
    return int(perm[0]) + 3 * int(perm[1]) + 9 * int(perm[2])


def msa_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm,
                          out_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel. Inputs are not validated here (see the autograd Function).

    Args:
        q: (b, 3, d, Nq) with Nq = H * W; k, v: (b, 3, d, Nk); any strides, one dtype.
        perm: permutation of (0, 1, 2).
        out_hw: (H, W).

    Returns:
        ``(out, lse2)``: out (b, 3 * d, H, W) contiguous in q's dtype; lse2 (b, 3, Nq) fp32
        (fp64 for fp64 inputs), each row's log-sum-exp in base-2 units (natural log-sum-exp
        times LOG2E).
    """
    b, _, d, n_q = q.shape
    n_k = k.shape[-1]
    out = torch.empty((b, GROUPS * d, *out_hw), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, GROUPS, n_q), device=q.device, dtype=_acc_torch_dtype(q.dtype))
    cfg, opts = _config(q.dtype, d, forward=True,
                        programs_if_wide=triton.cdiv(n_q, 128) * b * GROUPS,
                        num_sms=_num_sms(q.device))
    grid = (triton.cdiv(n_q, cfg["BLOCK_M"]), b * GROUPS)
    _msa_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(),
        out.stride(0), out.stride(1), 1,
        n_q, n_k, d ** -0.5 * LOG2E, pack_perm(perm), **cfg, **opts)
    return out, lse


def msa_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, perm
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels.

    Args:
        grad_out, out: (b, 3 * d, H, W), pixels contiguous inside each channel (stride of W is 1
            and of H is W); q, k, v, lse, perm as in and from :func:`msa_attention_forward`.

    Returns:
        ``(dq, dk, dv)``, contiguous, shaped and typed like q, k, v.
    """
    b, _, d, n_q = q.shape
    n_k = k.shape[-1]
    cfg, opts = _config(q.dtype, d, forward=False)
    code = pack_perm(perm)
    delta = torch.empty_like(lse)
    do_strides = (grad_out.stride(0), grad_out.stride(1), 1)
    _msa_bwd_preprocess_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), b * GROUPS)](
        out, grad_out, delta,
        out.stride(0), out.stride(1), 1, *do_strides,
        n_q, HEAD_DIM=d, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"],
        ACC_DTYPE=cfg["ACC_DTYPE"], num_warps=4)
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    _msa_bwd_dkdv_kernel[(triton.cdiv(n_k, cfg["BLOCK_N"]), b * GROUPS)](
        q, k, v, grad_out, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do_strides, *dk.stride(),
        n_q, n_k, d ** -0.5 * LOG2E, d ** -0.5, code, **cfg, **opts)
    _msa_bwd_dq_kernel[(triton.cdiv(n_q, cfg["BLOCK_M"]), b * GROUPS)](
        q, k, v, grad_out, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do_strides, *dq.stride(),
        n_q, n_k, d ** -0.5 * LOG2E, d ** -0.5, code, **cfg, **opts)
    return dq, dk, dv
