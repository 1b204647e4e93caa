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

Token loops (why they are split): with 16-bit inputs every loop over key (or query) blocks runs
its full blocks without token masks and the last, partial block, if any, once with masks
(``SPLIT_TAIL``). A mask whose bound is not a multiple of 16 (Nq = 1089, 4225, 16900 at 520x520)
keeps Triton from proving that neighbouring tokens load together, so a masked loop compiles to
scalar loads without ``cp.async`` multi-buffering; unmasked full blocks vectorise as soon as the
token-axis strides are multiples of 16 elements, which
:func:`msidtrans_fast.embedding.token_embedding` guarantees by padding the token axis where q, k,
v are produced (the padding is never read). fp32/fp64 keep one masked loop: their FMA dots hold
so many registers that a second, tail copy of the block made ptxas spill 200-2000 bytes per
thread (sm_90), and they are bound by arithmetic, not loads.

Offsets never wrap: every tile starts from a scalar 64-bit pointer (batch, group and block
offsets are computed in int64; loops advance these pointers), and offsets inside a tile are int32,
or int64 when a stride is large enough for them to pass 2**31 (``_offset_dtype``). An int32
product such as ``group * stride`` would wrap once a tensor passes 2**31 elements.

Tuning: a small ``triton.autotune`` space per kernel, keyed on dtype, head size and a token-count
class that includes whether the token axis is 16-aligned. The configurations of one kernel differ
only in the tile size that does not split a reduction (query tile of the forward and of dQ, key
tile of dK/dV), warps and pipeline stages, so whichever is picked, every output element sums the
same terms in the same order; tuning results are cached on disk. The tuner leaves out the
configurations that ptxas compiles with spilled registers on the GPU at hand (``_SPILLS``, by
compute capability and Triton release). In Triton's interpreter only the first configuration of
each space runs (no timing there).
"""

from __future__ import annotations

import inspect
import os
import re

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

#: id(config) -> (kernel, dtype class): the tuning space a config belongs to ("fwd", "dq" or
#: "dkdv") and the dtype class it is meant for ("16bit" or "fp32"); kept beside the configs because
#: Triton's on-disk tuning cache rebuilds configs from their attributes.
_SPACE_OF: dict[int, tuple[str, str]] = {}
#: (major, minor) of the installed Triton.
TRITON_VERSION = tuple(int(p) for p in re.findall(r"\d+", triton.__version__)[:2])


def _space(kernel: str, entries, fixed: dict) -> list:
    """Configs ``(tile name, tile, warps, stages)`` per dtype class, with the fixed tiles."""
    configs = []
    for dtype_class, rows in entries.items():
        for tile_name, tile, warps, stages in rows:
            cfg = triton.Config({tile_name: tile, **fixed[dtype_class]}, num_warps=warps,
                                num_stages=stages)
            _SPACE_OF[id(cfg)] = (kernel, dtype_class)
            configs.append(cfg)
    return configs


def _dtype_class(dtype) -> str:
    return "16bit" if dtype in (torch.float16, torch.bfloat16) else "fp32"


def configs_for(space: list, dtype: torch.dtype) -> list:
    """The configurations of a tuning space (``FWD_CONFIGS``...) that ``dtype`` runs."""
    return [c for c in space if _SPACE_OF.get(id(c), (None, None))[1] == _dtype_class(dtype)]


#: 16-bit configurations, ``(kernel, BLOCK_M, BLOCK_N, warps, stages)``, that compile with a
#: stack frame (ptxas spills registers) for some launched shape, by GPU generation (compute
#: capability major) and Triton release (``True``: 3.9 and later; ``False``: before 3.9), found with
#: ``tools/inspect_kernels.py --all-configs`` (520x520 and 1024x768, bf16; Triton 3.6, 3.7, 3.8
#: and 3.9). The tuner leaves them out there; each space keeps at least one configuration per
#: dtype. No fp32 configuration spills; other GPU generations were not checked.
_SPILLS = {
    (8, True): {("fwd", 64, 64, 4, 3)},
    (8, False): {("fwd", 64, 64, 4, 2), ("fwd", 64, 64, 4, 3), ("dq", 64, 64, 4, 2),
                 ("dq", 128, 64, 8, 2), ("dkdv", 64, 64, 4, 2), ("dkdv", 64, 64, 4, 3),
                 ("dkdv", 64, 128, 8, 2)},
    (9, False): {("dkdv", 64, 64, 4, 2), ("dkdv", 64, 32, 4, 2)},
}


def spills(cfg, capability: tuple[int, int], triton_version=TRITON_VERSION) -> bool:
    """Whether ``cfg`` (of a tuning space) spills registers on a GPU of compute capability
    ``capability`` (major, minor) with this Triton release (see ``_SPILLS``)."""
    kernel, dtype_class = _SPACE_OF.get(id(cfg), (None, None))
    if dtype_class != "16bit":
        return False
    entry = (kernel, cfg.kwargs["BLOCK_M"], cfg.kwargs["BLOCK_N"], cfg.num_warps, cfg.num_stages)
    return entry in _SPILLS.get((capability[0], triton_version >= (3, 9)), ())


def launch_configs(space: list, dtype: torch.dtype, capability: tuple[int, int],
                   triton_version=TRITON_VERSION) -> list:
    """The configurations of ``space`` that the tuner tries for ``dtype`` on a GPU of compute
    capability ``capability``: those of the dtype's class that do not spill there."""
    return [c for c in configs_for(space, dtype) if not spills(c, capability, triton_version)]


def _prune(configs, named_args, **kwargs):
    """The configs of the input's dtype class that do not spill on its GPU (only the first in
    the interpreter, which has no GPU)."""
    q = named_args["Q"]
    if _INTERPRET:
        return configs_for(configs, q.dtype)[:1]
    return launch_configs(configs, q.dtype, torch.cuda.get_device_capability(q.device))


# Spaces checked with tools/inspect_kernels.py (sm_90 and sm_80, the launches of 520x520 and
# 1024x768 at head sizes 32, 48, 64): fp32 configurations that spilled were left out (dK/dV with
# 4 warps or 64-key tiles spilled 250-400 bytes, with 2 stages 8 bytes at head size 48 or 64);
# 16-bit ones that spill only on some GPU generation or Triton release are left out there
# (``_SPILLS``; the 32-key dK/dV tile is there for sm_80 with Triton before 3.9, where every
# 64-key tile spills). The fixed block is the one a reduction runs over.
_KEY_BLOCK = {"16bit": {"BLOCK_N": 64}, "fp32": {"BLOCK_N": 32}}
_QUERY_BLOCK = {"16bit": {"BLOCK_M": 64}, "fp32": {"BLOCK_M": 32}}
FWD_CONFIGS = _space("fwd", {
    "16bit": [("BLOCK_M", 128, 8, 3), ("BLOCK_M", 64, 4, 2), ("BLOCK_M", 64, 4, 3),
              ("BLOCK_M", 128, 8, 2)],
    "fp32": [("BLOCK_M", 64, 8, 2), ("BLOCK_M", 64, 8, 3)],
}, _KEY_BLOCK)
DQ_CONFIGS = _space("dq", {
    "16bit": [("BLOCK_M", 64, 4, 2), ("BLOCK_M", 64, 4, 3), ("BLOCK_M", 128, 8, 2)],
    "fp32": [("BLOCK_M", 32, 8, 2), ("BLOCK_M", 32, 4, 2)],
}, _KEY_BLOCK)
DKDV_CONFIGS = _space("dkdv", {
    "16bit": [("BLOCK_N", 64, 4, 2), ("BLOCK_N", 64, 4, 3), ("BLOCK_N", 128, 8, 2),
              ("BLOCK_N", 32, 4, 2)],
    "fp32": [("BLOCK_N", 32, 8, 3)],
}, _QUERY_BLOCK)


def _bench(kernel_call, quantiles):
    """Short timing per configuration: the model's first call tunes about a dozen launches.
    In the interpreter the pruned space holds one configuration and there is nothing to time
    (older Triton releases still call this then, and have no GPU driver to time with)."""
    if _INTERPRET:
        return [0.0 for _ in quantiles]
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
def _tile(base, rows, cols, s_row, s_col, OFFSET_DTYPE: tl.constexpr):
    """Pointers ``base + rows[:, None] * s_row + cols[None, :] * s_col`` of one tile: ``base`` is
    a scalar pointer (64-bit), the in-tile offsets are ``OFFSET_DTYPE`` (int32 unless a stride is
    so large that they could pass 2**31; see ``_offset_dtype``)."""
    return base + rows.to(OFFSET_DTYPE)[:, None] * s_row + cols.to(OFFSET_DTYPE)[None, :] * s_col


@triton.jit
def _fwd_block(acc, l_i, m_i, q, k_blk, v_blk, start_n, n_k, mask_d, qk_scale,
               sk_c, sk_n, sv_c, sv_n,
               BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
               ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr):
    """One key block of the online softmax; ``MASK_N`` only for the last, partial block."""
    tile_n = tl.arange(0, BLOCK_N)
    tile_d = tl.arange(0, BLOCK_D)
    k_ptrs = _tile(k_blk, tile_d, tile_n, sk_c, sk_n, OFFSET_DTYPE)
    if MASK_N:
        mask_n = start_n + tile_n < n_k
        k_t = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    else:
        k_t = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE) * qk_scale
    if MASK_N:
        s = tl.where(mask_n[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    v_ptrs = _tile(v_blk, tile_n, tile_d, sv_n, sv_c, OFFSET_DTYPE)
    if MASK_N:
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
    else:
        v = tl.load(v_ptrs, mask=mask_d[None, :], other=0.0)
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
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    SPLIT_TAIL: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)
    start_m = (pid_m * BLOCK_M).to(tl.int64)

    tile_m = tl.arange(0, BLOCK_M)
    tile_d = tl.arange(0, BLOCK_D)
    mask_m = start_m + tile_m < n_q
    mask_d = tile_d < HEAD_DIM

    q = tl.load(_tile(Q + batch * sq_b + q_scale * sq_g + start_m * sq_n, tile_m, tile_d,
                      sq_n, sq_c, OFFSET_DTYPE),
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    k_blk = K + batch * sk_b + group * sk_g
    v_blk = V + batch * sv_b + group * sv_g
    k_step = tl.full([], BLOCK_N, tl.int64) * sk_n
    v_step = tl.full([], BLOCK_N, tl.int64) * sv_n

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], dtype=ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    n_full = n_k - n_k % BLOCK_N if SPLIT_TAIL else 0
    for start_n in range(0, n_full, BLOCK_N):
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_blk, v_blk, start_n, n_k, mask_d,
                                   qk_scale, sk_c, sk_n, sv_c, sv_n, BLOCK_N, BLOCK_D, False,
                                   ACC_DTYPE, PRECISION, OFFSET_DTYPE)
        k_blk += k_step
        v_blk += v_step
    for start_n in range(n_full, n_k, BLOCK_N):  # the partial block, or all (no SPLIT_TAIL)
        acc, l_i, m_i = _fwd_block(acc, l_i, m_i, q, k_blk, v_blk, start_n, n_k, mask_d,
                                   qk_scale, sk_c, sk_n, sv_c, sv_n, BLOCK_N, BLOCK_D, True,
                                   ACC_DTYPE, PRECISION, OFFSET_DTYPE)
        k_blk += k_step
        v_blk += v_step

    acc = acc / l_i[:, None]
    o_ptrs = _tile(OUT + batch * so_b + (group * HEAD_DIM) * so_c + start_m * so_n, tile_m, tile_d,
                   so_n, so_c, OFFSET_DTYPE)
    tl.store(o_ptrs, acc.to(OUT.dtype.element_ty), mask=mask_m[:, None] & mask_d[None, :])
    # Base-2 log-sum-exp of the scores in base-2 units; the backward pass uses the same units.
    lse2 = m_i + tl.log2(l_i)
    tl.store(LSE + pid_bg.to(tl.int64) * n_q + start_m + tile_m, lse2, mask=mask_m)


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
def _dkdv_block(dk, dv, k, v, q_blk, do_blk, lse_blk, delta_blk, start_m, n_q, mask_d, qk_scale,
                sq_c, sq_n, sdo_c, sdo_n,
                BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, MASK_M: tl.constexpr,
                PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, OFFSET_DTYPE: tl.constexpr):
    """One query block of dK, dV; ``MASK_M`` only for the last, partial block. Keys past the end
    (zero k, v) produce rows that are never stored, so keys need no mask here."""
    tile_m = tl.arange(0, BLOCK_M)
    tile_d = tl.arange(0, BLOCK_D)
    q_ptrs = _tile(q_blk, tile_m, tile_d, sq_n, sq_c, OFFSET_DTYPE)
    do_ptrs = _tile(do_blk, tile_m, tile_d, sdo_n, sdo_c, OFFSET_DTYPE)
    if MASK_M:
        mask_m = start_m + tile_m < n_q
        mask_md = mask_m[:, None] & mask_d[None, :]
        q = tl.load(q_ptrs, mask=mask_md, other=0.0)
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
        lse = tl.load(lse_blk + tile_m, mask=mask_m, other=0.0)
        delta = tl.load(delta_blk + tile_m, mask=mask_m, other=0.0)
    else:
        q = tl.load(q_ptrs, mask=mask_d[None, :], other=0.0)
        do = tl.load(do_ptrs, mask=mask_d[None, :], other=0.0)
        lse = tl.load(lse_blk + tile_m)
        delta = tl.load(delta_blk + tile_m)
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
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    SPLIT_TAIL: tl.constexpr,
):
    """One program per (key block, batch * 3 + group); dK and dV share the strides ``sdk_*``."""
    pid_n = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)
    start_n = (pid_n * BLOCK_N).to(tl.int64)

    tile_n = tl.arange(0, BLOCK_N)
    tile_d = tl.arange(0, BLOCK_D)
    mask_d = tile_d < HEAD_DIM
    mask_nd = (start_n + tile_n < n_k)[:, None] & mask_d[None, :]

    k = tl.load(_tile(K + batch * sk_b + group * sk_g + start_n * sk_n, tile_n, tile_d, sk_n, sk_c,
                      OFFSET_DTYPE), mask=mask_nd, other=0.0)
    v = tl.load(_tile(V + batch * sv_b + group * sv_g + start_n * sv_n, tile_n, tile_d, sv_n, sv_c,
                      OFFSET_DTYPE), mask=mask_nd, other=0.0)
    q_blk = Q + batch * sq_b + q_scale * sq_g
    do_blk = DO + batch * sdo_b + (group * HEAD_DIM) * sdo_c
    lse_blk = LSE + pid_bg.to(tl.int64) * n_q
    delta_blk = DELTA + pid_bg.to(tl.int64) * n_q
    q_step = tl.full([], BLOCK_M, tl.int64) * sq_n
    do_step = tl.full([], BLOCK_M, tl.int64) * sdo_n

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=ACC_DTYPE)
    m_full = n_q - n_q % BLOCK_M if SPLIT_TAIL else 0
    for start_m in range(0, m_full, BLOCK_M):
        dk, dv = _dkdv_block(dk, dv, k, v, q_blk, do_blk, lse_blk, delta_blk, start_m, n_q,
                             mask_d, qk_scale, sq_c, sq_n, sdo_c, sdo_n, BLOCK_M, BLOCK_D, False,
                             PRECISION, ACC_DTYPE, OFFSET_DTYPE)
        q_blk += q_step
        do_blk += do_step
        lse_blk += BLOCK_M
        delta_blk += BLOCK_M
    for start_m in range(m_full, n_q, BLOCK_M):  # the partial block, or all (no SPLIT_TAIL)
        dk, dv = _dkdv_block(dk, dv, k, v, q_blk, do_blk, lse_blk, delta_blk, start_m, n_q,
                             mask_d, qk_scale, sq_c, sq_n, sdo_c, sdo_n, BLOCK_M, BLOCK_D, True,
                             PRECISION, ACC_DTYPE, OFFSET_DTYPE)
        q_blk += q_step
        do_blk += do_step
        lse_blk += BLOCK_M
        delta_blk += BLOCK_M

    dk = dk * sm_scale
    out_base = batch * sdk_b + group * sdk_g + start_n * sdk_n
    tl.store(_tile(DK + out_base, tile_n, tile_d, sdk_n, sdk_c, OFFSET_DTYPE),
             dk.to(DK.dtype.element_ty), mask=mask_nd)
    tl.store(_tile(DV + out_base, tile_n, tile_d, sdk_n, sdk_c, OFFSET_DTYPE),
             dv.to(DV.dtype.element_ty), mask=mask_nd)


@triton.jit
def _dq_block(dq, q, do, lse, delta, k_blk, v_blk, start_n, n_k, mask_d, qk_scale,
              sk_c, sk_n, sv_c, sv_n,
              BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, MASK_N: tl.constexpr,
              PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr, OFFSET_DTYPE: tl.constexpr):
    """One key block of dQ; ``MASK_N`` only for the last, partial block."""
    tile_n = tl.arange(0, BLOCK_N)
    tile_d = tl.arange(0, BLOCK_D)
    k_ptrs = _tile(k_blk, tile_d, tile_n, sk_c, sk_n, OFFSET_DTYPE)
    v_ptrs = _tile(v_blk, tile_d, tile_n, sv_c, sv_n, OFFSET_DTYPE)
    if MASK_N:
        mask_n = start_n + tile_n < n_k
        k_t = tl.load(k_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
        v_t = tl.load(v_ptrs, mask=mask_d[:, None] & mask_n[None, :], other=0.0)
    else:
        k_t = tl.load(k_ptrs, mask=mask_d[:, None], other=0.0)
        v_t = tl.load(v_ptrs, mask=mask_d[:, None], other=0.0)
    s = tl.dot(q, k_t, input_precision=PRECISION).to(ACC_DTYPE)
    p = tl.exp2(s * qk_scale - lse[:, None])
    if MASK_N:
        p = tl.where(mask_n[None, :], p, 0.0)
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
    ACC_DTYPE: tl.constexpr, PRECISION: tl.constexpr, OFFSET_DTYPE: tl.constexpr,
    SPLIT_TAIL: tl.constexpr,
):
    """One program per (query block, batch * 3 + group); writes dQ of scale ``perm[group]``.

    ``perm`` is a permutation, so every query scale is written by exactly one group: no atomics.
    """
    pid_m = tl.program_id(0)
    pid_bg = tl.program_id(1)
    batch = (pid_bg // 3).to(tl.int64)
    group = (pid_bg % 3).to(tl.int64)
    q_scale = _query_scale(group, perm_code)
    start_m = (pid_m * BLOCK_M).to(tl.int64)

    tile_m = tl.arange(0, BLOCK_M)
    tile_d = tl.arange(0, BLOCK_D)
    mask_m = start_m + tile_m < n_q
    mask_d = tile_d < HEAD_DIM
    mask_md = mask_m[:, None] & mask_d[None, :]

    q = tl.load(_tile(Q + batch * sq_b + q_scale * sq_g + start_m * sq_n, tile_m, tile_d,
                      sq_n, sq_c, OFFSET_DTYPE), mask=mask_md, other=0.0)
    do = tl.load(_tile(DO + batch * sdo_b + (group * HEAD_DIM) * sdo_c + start_m * sdo_n,
                       tile_m, tile_d, sdo_n, sdo_c, OFFSET_DTYPE), mask=mask_md, other=0.0)
    row_base = pid_bg.to(tl.int64) * n_q + start_m
    lse = tl.load(LSE + row_base + tile_m, mask=mask_m, other=0.0)
    delta = tl.load(DELTA + row_base + tile_m, mask=mask_m, other=0.0)
    k_blk = K + batch * sk_b + group * sk_g
    v_blk = V + batch * sv_b + group * sv_g
    k_step = tl.full([], BLOCK_N, tl.int64) * sk_n
    v_step = tl.full([], BLOCK_N, tl.int64) * sv_n

    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=ACC_DTYPE)
    n_full = n_k - n_k % BLOCK_N if SPLIT_TAIL else 0
    for start_n in range(0, n_full, BLOCK_N):
        dq = _dq_block(dq, q, do, lse, delta, k_blk, v_blk, start_n, n_k, mask_d, qk_scale,
                       sk_c, sk_n, sv_c, sv_n, BLOCK_N, BLOCK_D, False, PRECISION, ACC_DTYPE,
                       OFFSET_DTYPE)
        k_blk += k_step
        v_blk += v_step
    for start_n in range(n_full, n_k, BLOCK_N):  # the partial block, or all (no SPLIT_TAIL)
        dq = _dq_block(dq, q, do, lse, delta, k_blk, v_blk, start_n, n_k, mask_d, qk_scale,
                       sk_c, sk_n, sv_c, sv_n, BLOCK_N, BLOCK_D, True, PRECISION, ACC_DTYPE,
                       OFFSET_DTYPE)
        k_blk += k_step
        v_blk += v_step

    dq = dq * sm_scale
    tl.store(_tile(DQ + batch * sdq_b + q_scale * sdq_g + start_m * sdq_n, tile_m, tile_d,
                   sdq_n, sdq_c, OFFSET_DTYPE), dq.to(DQ.dtype.element_ty), mask=mask_md)


# ------------------------------------------------------------------------------------ launchers

#: Largest tile side of any configuration (query, key or head block).
_MAX_TILE = 128


def _offset_dtype(*strides: int):
    """int32 for in-tile offsets unless one of the channel/token ``strides`` is so large that
    ``tile index * stride`` summed over a tile's two axes could pass 2**31 (then int64: slower,
    never wrong). Batch and group offsets are always 64-bit."""
    return tl.int32 if 2 * _MAX_TILE * max(abs(s) for s in strides) < 2 ** 31 else tl.int64


def _tile_strides(*tensors: torch.Tensor) -> list[int]:
    """The strides of the two last axes (channel, token) of each tensor."""
    return [s for t in tensors for s in t.stride()[-2:]]


def _consts(dtype: torch.dtype, head_dim: int, strides: list[int]) -> dict:
    """Constexprs fixed by dtype, head size and the in-tile strides (tile sizes come from the
    tuning spaces)."""
    return {"HEAD_DIM": head_dim, "BLOCK_D": max(16, triton.next_power_of_2(head_dim)),
            "ACC_DTYPE": tl.float64 if dtype == torch.float64 else tl.float32,
            "PRECISION": "ieee", "OFFSET_DTYPE": _offset_dtype(*strides),
            "SPLIT_TAIL": _dtype_class(dtype) == "16bit"}


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
                 key), _consts(q.dtype, d, [*_tile_strides(q, k, v), out.stride(1)]), config)
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
    code = pack_perm(perm)
    configs = configs or {}
    delta = torch.empty_like(lse)
    do = _padded_grad(grad_out)  # token-aligned rows: the dK/dV loop loads them as vectors
    block_m = _QUERY_BLOCK[_dtype_class(q.dtype)]["BLOCK_M"]
    dq = torch.empty(q.shape, device=q.device, dtype=q.dtype)
    dk = torch.empty(k.shape, device=k.device, dtype=k.dtype)
    dv = torch.empty(v.shape, device=v.device, dtype=v.dtype)
    consts = _consts(q.dtype, d, _tile_strides(q, k, v, do, dq, dk))
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
