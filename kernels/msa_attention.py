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

Token loops (why they are split): every loop over key (or query) blocks runs its full blocks
without token masks and the last, partial block, if any, once with masks. A mask whose bound is
not a multiple of 16 (Nq = 1089, 4225, 16900 at 520x520) keeps Triton from proving that
neighbouring tokens load together, so a masked loop compiles to scalar loads without
``cp.async`` multi-buffering; unmasked full blocks vectorise as soon as the token-axis strides are
multiples of 16 elements, which :func:`msidtrans_fast.embedding.token_embedding` guarantees by
padding the token axis where q, k, v are produced (the padding is never read).

Offsets are 64-bit: per-program bases are computed in int64 and loops advance pointers, so tensors
of any size index correctly (an int32 product such as ``group * stride`` wraps past 2**31
elements).

Tuning: a small ``triton.autotune`` space per kernel, keyed on dtype, head size and a token-count
class that includes whether the token axis is 16-aligned. The configurations of one kernel differ
only in the tile size that does not split a reduction (query tile of the forward and of dQ, key
tile of dK/dV), warps and pipeline stages, so whichever is picked, every output element sums the
same terms in the same order; tuning results are cached on disk. In Triton's interpreter only the
first configuration of each space runs (no timing there).
"""

from __future__ import annotations

import inspect
import os

import torch
import triton
import triton.language as tl

from . import device_guard

#: log2(e): scores are scaled by ``d**-0.5 * LOG2E`` so that ``exp(x) == exp2(x * LOG2E)``.
LOG2E = 1.4426950408889634
#: Largest supported head size (the padded head block must fit the registers of one program).
MAX_HEAD_DIM = 128
GROUPS = 3
#: Token-axis alignment (elements) under which tiles load as 16-byte vectors.
TOKEN_ALIGN = 16
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------- tuning spaces

def _space(entries, fixed: dict) -> list:
    """Configs ``(tile, warps, stages)`` tagged with the dtype class they are meant for."""
    configs = []
    for dtype_class, rows in entries.items():
        for tile_name, tile, warps, stages in rows:
            cfg = triton.Config({tile_name: tile, **fixed[dtype_class]}, num_warps=warps,
                                num_stages=stages)
            cfg.dtype_class = dtype_class
            configs.append(cfg)
    return configs


def _dtype_class(dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def _prune(configs, named_args, **kwargs):
    """The configs of the input's dtype class (only the first in the interpreter)."""
    kept = [c for c in configs if c.dtype_class == _dtype_class(named_args["Q"].dtype)]
    return kept[:1] if _INTERPRET else kept


# Each space compiles without register spills for sm_90 and sm_80 at head sizes 32, 48 and 64
# (tools/inspect_kernels.py). The fixed block is the one a reduction runs over.
_KEY_BLOCK = {"16bit": {"BLOCK_N": 64}, "fp32": {"BLOCK_N": 32}}
_QUERY_BLOCK = {"16bit": {"BLOCK_M": 64}, "fp32": {"BLOCK_M": 32}}
FWD_CONFIGS = _space({
    "16bit": [("BLOCK_M", 128, 8, 3), ("BLOCK_M", 64, 4, 2), ("BLOCK_M", 64, 4, 3),
              ("BLOCK_M", 128, 8, 2)],
    "fp32": [("BLOCK_M", 64, 8, 2), ("BLOCK_M", 32, 4, 2), ("BLOCK_M", 64, 8, 3)],
}, _KEY_BLOCK)
DQ_CONFIGS = _space({
    "16bit": [("BLOCK_M", 64, 4, 2), ("BLOCK_M", 64, 4, 3), ("BLOCK_M", 128, 8, 2)],
    "fp32": [("BLOCK_M", 32, 8, 2), ("BLOCK_M", 32, 4, 2), ("BLOCK_M", 64, 8, 2)],
}, _KEY_BLOCK)
DKDV_CONFIGS = _space({
    "16bit": [("BLOCK_N", 64, 4, 2), ("BLOCK_N", 64, 4, 3), ("BLOCK_N", 128, 8, 2)],
    "fp32": [("BLOCK_N", 32, 8, 2), ("BLOCK_N", 32, 4, 2), ("BLOCK_N", 64, 8, 2)],
}, _QUERY_BLOCK)


def _bench(kernel_call, quantiles):
    """Short timing per configuration: the model's first call tunes about a dozen launches."""
    return triton.testing.do_bench(kernel_call, warmup=5, rep=20, quantiles=quantiles)


_TUNING = {"key": ["HEAD_DIM", "tune_class"], "prune_configs_by": {"early_config_prune": _prune},
           "do_bench": _bench}
if "cache_results" in inspect.signature(triton.autotune).parameters:
    _TUNING["cache_results"] = True  # tuned choices persist across processes (on disk)


def tune_class(n_tokens: int, batch: int, *strides: int) -> int:
    """Autotuning key of a launch: the size class of ``batch * 3 * n_tokens`` (powers of 4 from
    4096 tokens on, capped) times 2, plus 1 where every given stride is a multiple of 16."""
    size = min(max(batch * GROUPS * n_tokens, 1).bit_length() // 2, 12)
    return 2 * size + int(all(s % TOKEN_ALIGN == 0 for s in strides))


# ----------------------------------------------------------------------------------- kernels

@triton.jit
def _query_scale(group, perm_code):
    """Scale index of the queries used by ``group`` (0, 1, 2) from the packed permutation."""
    power = tl.where(group == 0, 1, tl.where(group == 1, 3, 9))
    return ((perm_code // power) % 3).to(tl.int64)


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, n_k, mask_d, qk_scale,
               MASK_N: tl.constexpr, ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr):
    """One key block of the online softmax; ``MASK_N`` only for the last, partial block."""
    if MASK_N:
        mask_n = offs_n < n_k
        k_t = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        k_t = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None]
    acc += tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(ACC_DTYPE)
    return acc, l_i, m_new


@triton.autotune(configs=FWD_CONFIGS, **_TUNING)
@triton.jit(do_not_specialize=["tune_class"])
def _msa_fwd_kernel(
    Q, K, V, OUT, LSE,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    so_b, so_c, so_n,
    n_q, n_k, qk_scale, perm_code, tune_class,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM
    offs_d64 = offs_d.to(tl.int64)

    q = tl.load(Q + batch * sq_b + q_scale * sq_g + offs_m.to(tl.int64)[:, None] * sq_n
                + offs_d64[None, :] * sq_c, mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_ptrs = K + batch * sk_b + group * sk_g + offs_d64[:, None] * sk_c + offs_n[None, :] * sk_n
    v_ptrs = V + batch * sv_b + group * sv_g + offs_n[:, None] * sv_n + offs_d64[None, :] * sv_c
    k_step = tl.full([], BLOCK_N, tl.int64) * sk_n
    v_step = tl.full([], BLOCK_N, tl.int64) * sv_n

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    n_full = n_k - n_k % BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, offs_n, n_k, mask_d,
                                   qk_scale, False, ACC_DTYPE, PRECISION)
        k_ptrs += k_step
        v_ptrs += v_step
    if n_full < n_k:
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_ptrs, v_ptrs, n_full + offs_n, n_k,
                                   mask_d, qk_scale, True, ACC_DTYPE, PRECISION)

    acc = acc / l_i[:, None]
    o_ptrs = (OUT + batch * so_b + (group * HEAD_DIM + offs_d64)[None, :] * so_c
              + offs_m.to(tl.int64)[:, None] * so_n)
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
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
    group = (pid_bg % 3).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < n_q) & (offs_d[None, :] < HEAD_DIM)
    channel = group * HEAD_DIM + offs_d.to(tl.int64)[None, :]
    tokens = offs_m.to(tl.int64)[:, None]
    o = tl.load(OUT + batch * so_b + channel * so_c + tokens * so_n, mask=mask, other=0.0)
    do = tl.load(DO + batch * sdo_b + channel * sdo_c + tokens * sdo_n, mask=mask, other=0.0)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    tl.store(DELTA + pid_bg.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_m, n_q, mask_d,
                qk_scale, MASK_M: tl.constexpr, PRECISION: tl.constexpr,
                ACC_DTYPE: tl.constexpr):
    """One query block of dK, dV; ``MASK_M`` only for the last, partial block. Keys past the end
    (zero k, v) produce rows that are never stored, so keys need no mask here."""
    if MASK_M:
        mask_m = offs_m < n_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptrs, mask=mask_md, other=0.0)
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
        lse = tl.load(lse_ptrs, mask=mask_m, other=0.0)
        delta = tl.load(delta_ptrs, mask=mask_m, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=mask_d[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=mask_d[None, :], other=0.0)
        lse = tl.load(lse_ptrs)
        delta = tl.load(delta_ptrs)
    # Transposed scores s^T (keys x queries), probabilities recomputed from the saved lse.
    s_t = tl.dot(k, tl.trans(q), input_precision=PRECISION).to(ACC_DTYPE)
    p_t = tl.exp2(s_t * qk_scale - lse[None, :])
    if MASK_M:
        p_t = tl.where(mask_m[None, :], p_t, 0.0)
    dv += tl.dot(p_t.to(do.dtype), do, input_precision=PRECISION).to(ACC_DTYPE)
    dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION).to(ACC_DTYPE)
    ds_t = p_t * (dp_t - delta[None, :])
    dk += tl.dot(ds_t.to(q.dtype), q, input_precision=PRECISION).to(ACC_DTYPE)
    return dk, dv


@triton.autotune(configs=DKDV_CONFIGS, **_TUNING)
@triton.jit(do_not_specialize=["tune_class"])
def _msa_bwd_dkdv_kernel(
    Q, K, V, DO, LSE, DELTA, DK, DV,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    sdo_b, sdo_c, sdo_n,
    sdk_b, sdk_g, sdk_c, sdk_n,
    n_q, n_k, qk_scale, sm_scale, perm_code, tune_class,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (key block, batch * 3 + group); dK and dV share the strides ``sdk_*``."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < n_k
    mask_d = offs_d < HEAD_DIM
    mask_nd = mask_n[:, None] & mask_d[None, :]
    offs_d64 = offs_d.to(tl.int64)
    offs_n64 = offs_n.to(tl.int64)

    k = tl.load(K + batch * sk_b + group * sk_g + offs_n64[:, None] * sk_n
                + offs_d64[None, :] * sk_c, mask=mask_nd, other=0.0)
    v = tl.load(V + batch * sv_b + group * sv_g + offs_n64[:, None] * sv_n
                + offs_d64[None, :] * sv_c, mask=mask_nd, other=0.0)
    q_ptrs = Q + batch * sq_b + q_scale * sq_g + offs_m[:, None] * sq_n + offs_d64[None, :] * sq_c
    do_ptrs = (DO + batch * sdo_b + (group * HEAD_DIM + offs_d64)[None, :] * sdo_c
               + offs_m[:, None] * sdo_n)
    lse_ptrs = LSE + pid_bg.to(tl.int64) * n_q + offs_m
    delta_ptrs = DELTA + pid_bg.to(tl.int64) * n_q + offs_m
    q_step = tl.full([], BLOCK_M, tl.int64) * sq_n
    do_step = tl.full([], BLOCK_M, tl.int64) * sdo_n

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    m_full = n_q - n_q % BLOCK_M
    for _ in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs, offs_m, n_q,
                             mask_d, qk_scale, False, PRECISION, ACC_DTYPE)
        q_ptrs += q_step
        do_ptrs += do_step
        lse_ptrs += BLOCK_M
        delta_ptrs += BLOCK_M
    if m_full < n_q:
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptrs, do_ptrs, lse_ptrs, delta_ptrs,
                             m_full + offs_m, n_q, mask_d, qk_scale, True, PRECISION, ACC_DTYPE)

    dk = dk * sm_scale
    out_offs = (batch * sdk_b + group * sdk_g + offs_n64[:, None] * sdk_n
                + offs_d64[None, :] * sdk_c)
    tl.store(DK + out_offs, dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(DV + out_offs, dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_n, n_k, mask_d, qk_scale,
              MASK_N: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr):
    """One key block of dQ; ``MASK_N`` only for the last, partial block."""
    if MASK_N:
        mask_dn = mask_d[:, None] & (offs_n < n_k)[None, :]
        k_t = tl.load(k_ptrs, mask=mask_dn, other=0.0)
        v_t = tl.load(v_ptrs, mask=mask_dn, other=0.0)
    else:
        k_t = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        v_t = tl.load(v_ptrs, mask=mask_d[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where((offs_n < n_k)[None, :], p, 0.0)
    dp = tl.dot(do, v_t, input_precision=PRECISION).to(ACC_DTYPE)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision=PRECISION).to(ACC_DTYPE)
    return dq


@triton.autotune(configs=DQ_CONFIGS, **_TUNING)
@triton.jit(do_not_specialize=["tune_class"])
def _msa_bwd_dq_kernel(
    Q, K, V, DO, LSE, DELTA, DQ,
    sq_b, sq_g, sq_c, sq_n,
    sk_b, sk_g, sk_c, sk_n,
    sv_b, sv_g, sv_c, sv_n,
    sdo_b, sdo_c, sdo_n,
    sdq_b, sdq_g, sdq_c, sdq_n,
    n_q, n_k, qk_scale, sm_scale, perm_code, tune_class,
    HEAD_DIM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """One program per (query block, batch * 3 + group); writes dQ of scale ``perm[group]``.

    ``perm`` is a permutation, so every query scale is written by exactly one group: no atomics.
    """
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < n_q
    mask_d = offs_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]
    offs_d64 = offs_d.to(tl.int64)
    offs_m64 = offs_m.to(tl.int64)

    q = tl.load(Q + batch * sq_b + q_scale * sq_g + offs_m64[:, None] * sq_n
                + offs_d64[None, :] * sq_c, mask=mask_md, other=0.0)
    do = tl.load(DO + batch * sdo_b + (group * HEAD_DIM + offs_d64)[None, :] * sdo_c
                 + offs_m64[:, None] * sdo_n, mask=mask_md, other=0.0)
    row_base = pid_bg.to(tl.int64) * n_q
    lse = tl.load(LSE + row_base + offs_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + offs_m, mask=mask_m, other=0.0)
    k_ptrs = K + batch * sk_b + group * sk_g + offs_d64[:, None] * sk_c + offs_n[None, :] * sk_n
    v_ptrs = V + batch * sv_b + group * sv_g + offs_d64[:, None] * sv_c + offs_n[None, :] * sv_n
    k_step = tl.full([], BLOCK_N, tl.int64) * sk_n
    v_step = tl.full([], BLOCK_N, tl.int64) * sv_n

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    n_full = n_k - n_k % BLOCK_N
    for _ in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, offs_n, n_k, mask_d, qk_scale,
                       False, PRECISION, ACC_DTYPE)
        k_ptrs += k_step
        v_ptrs += v_step
    if n_full < n_k:
        dq = _dq_block(dq, q, do, lse, delta, k_ptrs, v_ptrs, n_full + offs_n, n_k, mask_d,
                       qk_scale, True, PRECISION, ACC_DTYPE)

    dq = dq * sm_scale
    tl.store(DQ + batch * sdq_b + q_scale * sdq_g + offs_m64[:, None] * sdq_n
             + offs_d64[None, :] * sdq_c, dq.to(DQ.dtype.element_ty), mask=mask_md)


# ------------------------------------------------------------------------------------ launchers

def _consts(dtype: torch.dtype, head_dim: int) -> dict:
    """Constexprs fixed by dtype and head size (the tile sizes come from the tuning spaces)."""
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
            "PRECISION": "ieee"}


def _launch(kernel, grid, args: tuple, consts: dict, config=None) -> None:
    """Launches an autotuned kernel; ``config`` (a ``triton.Config`` of its space) bypasses the
    tuning, for tests and tools."""
    if config is None:
        kernel[grid](*args, **consts)
    else:
        meta = {**consts, **config.kwargs}
        kernel.fn[grid(meta)](*args, **meta, num_warps=config.num_warps,
                              num_stages=config.num_stages)


def _acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def pack_perm(perm) -> int:
    """``perm[0] + 3 perm[1] + 9 perm[2]``: the permutation as one kernel argument."""
    return int(perm[0]) + 3 * int(perm[1]) + 9 * int(perm[2])


def msa_attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, perm,
                          out_hw: tuple[int, int], config=None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launches the forward kernel. Inputs are not validated here (see the autograd Function).

    Args:
        q: (b, 3, d, Nq) with Nq = H * W; k, v: (b, 3, d, Nk); any strides, one dtype, one
            device. Fast when the token stride is 1 and the other strides are multiples of 16.
        perm: permutation of (0, 1, 2).
        out_hw: (H, W).
        config: a ``triton.Config`` of ``FWD_CONFIGS`` to run instead of the tuned choice.

    Returns:
        ``(out, lse2)``: out (b, 3 * d, H, W) contiguous in q's dtype; lse2 (b, 3, Nq) fp32
        (fp64 for fp64 inputs), each row's log-sum-exp in base-2 units (natural log-sum-exp
        times LOG2E).
    """
    b, _, d, n_q = q.shape
    n_k = k.shape[-1]
    out = torch.empty((b, GROUPS * d, *out_hw), device=q.device, dtype=q.dtype)
    lse = torch.empty((b, GROUPS, n_q), device=q.device, dtype=_acc_torch_dtype(q.dtype))
    key = tune_class(n_q, b, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3])
    with device_guard(q.device):
        _launch(_msa_fwd_kernel, lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * GROUPS),
                (q, k, v, out, lse, *q.stride(), *k.stride(), *v.stride(),
                 out.stride(0), out.stride(1), 1, n_q, n_k, d ** -0.5 * LOG2E, pack_perm(perm),
                 key), _consts(q.dtype, d), config)
    return out, lse


def _padded_grad(grad_out: torch.Tensor) -> torch.Tensor:
    """grad_out (b, C, H, W) with pixels contiguous per channel, as a (b, C, N) view whose
    channel stride is a multiple of TOKEN_ALIGN (copied into a padded buffer if it is not)."""
    b, c, h, w = grad_out.shape
    flat = grad_out.view(b, c, h * w) if grad_out.stride(-2) == w else None
    if flat is not None and flat.stride(1) % TOKEN_ALIGN == 0 and flat.stride(0) % TOKEN_ALIGN == 0:
        return flat
    n_pad = triton.cdiv(h * w, TOKEN_ALIGN) * TOKEN_ALIGN
    buf = torch.empty((b, c, n_pad), device=grad_out.device, dtype=grad_out.dtype)
    buf[..., :h * w].view(b, c, h, w).copy_(grad_out)
    return buf[..., :h * w]


def msa_attention_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor, perm,
                           configs: dict | None = None
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Launches the backward kernels.

    Args:
        grad_out, out: (b, 3 * d, H, W), pixels contiguous inside each channel (stride of W is 1
            and of H is W); q, k, v, lse, perm as in and from :func:`msa_attention_forward`.
        configs: optional ``{"dkdv": Config, "dq": Config}`` from ``DKDV_CONFIGS`` /
            ``DQ_CONFIGS`` to run instead of the tuned choices.

    Returns:
        ``(dq, dk, dv)``, contiguous, shaped and typed like q, k, v.
    """
    b, _, d, n_q = q.shape
    n_k = k.shape[-1]
    consts = _consts(q.dtype, d)
    code = pack_perm(perm)
    configs = configs or {}
    delta = torch.empty_like(lse)
    do = _padded_grad(grad_out)  # token-aligned rows: the dK/dV loop loads them as vectors
    block_m = _QUERY_BLOCK[_dtype_class(q.dtype)]["BLOCK_M"]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    common = (*q.stride(), *k.stride(), *v.stride(), *do.stride())
    with device_guard(q.device):
        _msa_bwd_preprocess_kernel[(triton.cdiv(n_q, block_m), b * GROUPS)](
            out, do, delta, out.stride(0), out.stride(1), 1, *do.stride(), n_q,
            HEAD_DIM=d, BLOCK_M=block_m, BLOCK_D=consts["BLOCK_D"],
            ACC_DTYPE=consts["ACC_DTYPE"], num_warps=4)
        key = tune_class(n_k, b, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                         *do.stride()[:2])
        _launch(_msa_bwd_dkdv_kernel, lambda meta: (triton.cdiv(n_k, meta["BLOCK_N"]), b * GROUPS),
                (q, k, v, do, lse, delta, dk, dv, *common, *dk.stride(),
                 n_q, n_k, d ** -0.5 * LOG2E, d ** -0.5, code, key), consts, configs.get("dkdv"))
        key = tune_class(n_q, b, *q.stride()[:3], *k.stride()[:3], *v.stride()[:3],
                         *do.stride()[:2])
        _launch(_msa_bwd_dq_kernel, lambda meta: (triton.cdiv(n_q, meta["BLOCK_M"]), b * GROUPS),
                (q, k, v, do, lse, delta, dq, *common, *dq.stride(),
                 n_q, n_k, d ** -0.5 * LOG2E, d ** -0.5, code, key), consts, configs.get("dq"))
    return dq, dk, dv
