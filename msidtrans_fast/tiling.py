"""Tiled decision maps: the network run on overlapping tiles of a large pair.

The network was trained on crops of 128-224 pixels, and its attention is global: on a whole camera
frame (12-45 megapixels) it costs hundreds of TFLOP and tens of GB. Here the frame is cut into a
grid of overlapping tiles of one size; batches of tiles go through the network (one call per
batch, the model is batch-consistent); each tile's soft decision map is weighted by a smooth window
and the weighted maps are summed into one full-size soft map D (H, W) float32. The windows form a
partition of unity: at every pixel the weights of the tiles covering it sum to one, so a map that
is the same in every tile (a constant, a ramp) comes back unchanged and no seam appears where tiles
meet. Binarisation and the consistency check then run once on the whole map, as for a whole image
(the area threshold relative to the whole frame, as the original).

Memory: only the tiles in the network are converted to float; the sources stay uint8/uint16 and
the only full-size buffer this module adds is D itself.

Threads: on the CPU the batches run side by side on worker threads, each network call on its
share of torch's threads (one each on a machine with as many threads as workers), while the
calling thread adds the finished maps into D in tile order (:func:`cpu_workers`).

Window, along each axis (the 2-D weight of a tile is the product of its row and column weights):
between two neighbouring tiles the weight passes from one to the other over a ramp of ``overlap``
pixels in the middle of their common strip, ``sin^2`` rising in the next tile and ``cos^2``
falling in the previous one (continuous with a continuous slope); a tile weighs 1 elsewhere inside
its span and at the image border. The 1-D weights are divided by their sum so that rounding, and
uneven strips where the last tile is pushed back to end at the border, still sum to one.
"""

from __future__ import annotations

import math
import numbers
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .model import MSIDTrans
from .ops import network_call

#: Smallest tile side accepted (pixels): below it a tile holds too little context for the
#: network's four downsampling stages.
MIN_TILE = 64
#: Tile side (pixels) and overlap used by ``tile="auto"`` above :data:`AUTO_WHOLE_MAX_PIXELS`.
DEFAULT_TILE = 256
DEFAULT_OVERLAP = 32
#: ``tile="auto"`` runs the whole image at once up to this many pixels (1024 x 1024), tiles above.
AUTO_WHOLE_MAX_PIXELS = 1024 * 1024
#: Activation memory the tiles in the network at one time may take on the CPU (bytes, all
#: workers together; see :func:`cpu_workers`).
CPU_TILE_BYTES = 2 << 30
#: Most tiles in one network call.
MAX_BATCH = 32


# ------------------------------------------------------------------------------------ the grid
def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """First pixel of each tile along one axis of ``length`` pixels.

    As few tiles of side ``min(tile, length)`` as cover the axis with neighbours sharing at least
    ``overlap`` pixels, spread evenly from 0 to ``length - tile``.
    """
    if tile >= length:
        return [0]
    count = math.ceil((length - overlap) / (tile - overlap))
    return [round(k * (length - tile) / (count - 1)) for k in range(count)]


def axis_weights(length: int, starts: list[int], size: int, overlap: int) -> list[np.ndarray]:
    """Blending weights along one axis: one float32 array of ``size`` per tile start; at every
    position of the axis the weights of the tiles covering it sum to one (see the module
    docstring)."""
    raw = [np.ones(size, dtype=np.float64) for _ in starts]
    for k in range(1, len(starts)):
        lo, hi = starts[k], starts[k - 1] + size  # the strip both tiles cover
        width = min(overlap, hi - lo)  # 0: a hard cut in the middle of the strip
        ramp_start = lo + (hi - lo - width) // 2
        t = (np.arange(width) + 0.5) / width
        rise = np.sin(0.5 * np.pi * t) ** 2
        # previous tile: 1, falling over the ramp, then 0; this tile: 0, rising, then 1
        prev, cur = raw[k - 1], raw[k]
        p0 = ramp_start - starts[k - 1]
        prev[p0:p0 + width] *= 1 - rise
        prev[p0 + width:] = 0
        c0 = ramp_start - starts[k]
        cur[:c0] = 0
        cur[c0:c0 + width] *= rise
    total = np.zeros(length, dtype=np.float64)
    for s, r in zip(starts, raw, strict=True):
        total[s:s + size] += r
    return [(r / total[s:s + size]).astype(np.float32) for s, r in zip(starts, raw, strict=True)]


@dataclass(frozen=True)
class TileGrid:
    """The tiles of an H x W image: all ``tile_h`` x ``tile_w``, at rows ``ys`` and columns
    ``xs``, with per-axis blending weights ``wy[i]`` (tile_h,) and ``wx[j]`` (tile_w,)."""

    height: int
    width: int
    tile_h: int
    tile_w: int
    ys: tuple[int, ...]
    xs: tuple[int, ...]
    wy: tuple[np.ndarray, ...]
    wx: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.ys) * len(self.xs)

    def tiles(self):
        """(i, j, y, x) for every tile, row by row."""
        for i, y in enumerate(self.ys):
            for j, x in enumerate(self.xs):
                yield i, j, y, x

    def weight(self, i: int, j: int) -> np.ndarray:
        """(tile_h, tile_w) float32 blending weight of tile (i, j)."""
        return self.wy[i][:, None] * self.wx[j][None, :]


def check_tile(tile: int, overlap: int) -> None:
    """Raises ValueError unless ``tile >= MIN_TILE`` and ``0 <= overlap <= tile // 2``, both
    integers."""
    for name, value in (("tile", tile), ("tile overlap", overlap)):
        if not isinstance(value, numbers.Integral) or isinstance(value, bool):
            raise ValueError(f"{name} must be a whole number of pixels, got {value!r}")
    if tile < MIN_TILE:
        raise ValueError(f"tile must be at least {MIN_TILE} pixels, got {tile}")
    if not 0 <= overlap <= tile // 2:
        raise ValueError(f"tile overlap must be between 0 and half the tile ({tile // 2}), "
                         f"got {overlap}")


def plan_tiles(height: int, width: int, tile: int, overlap: int = DEFAULT_OVERLAP) -> TileGrid:
    """The tile grid of an H x W image (tiles larger than the image are clipped to it)."""
    check_tile(tile, overlap)
    th, tw = min(tile, height), min(tile, width)
    ys, xs = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    return TileGrid(height, width, th, tw, tuple(ys), tuple(xs),
                    tuple(axis_weights(height, ys, th, overlap)),
                    tuple(axis_weights(width, xs, tw, overlap)))


# ---------------------------------------------------------------------------------- the policy
def check_tile_option(tile, overlap) -> None:
    """Raises ValueError unless ``tile`` is "auto", "off", None or a side >= :data:`MIN_TILE`, and
    ``overlap`` a whole number from 0 to half the tile (of :data:`DEFAULT_TILE` for "auto")."""
    if tile is None or tile in ("off", "auto"):
        check_tile(DEFAULT_TILE, overlap)
    elif isinstance(tile, numbers.Integral) and not isinstance(tile, bool):
        check_tile(int(tile), overlap)
    else:
        raise ValueError(f"tile must be 'auto', 'off', None or a tile side in pixels "
                         f"(>= {MIN_TILE}), got {tile!r}")


def resolve_tile(tile, height: int, width: int) -> int | None:
    """The tile side to use for an H x W pair, or None for the whole image at once.

    ``tile``: ``"auto"`` (the whole image up to :data:`AUTO_WHOLE_MAX_PIXELS`, else
    :data:`DEFAULT_TILE`), ``None`` / ``"off"`` (whole), or an int >= :data:`MIN_TILE`.
    Raises ValueError for anything else.
    """
    if tile is None or tile == "off":
        return None
    if tile == "auto":
        return None if height * width <= AUTO_WHOLE_MAX_PIXELS else DEFAULT_TILE
    if isinstance(tile, numbers.Integral) and not isinstance(tile, bool):
        check_tile(int(tile), 0)
        return int(tile)
    raise ValueError(f"tile must be 'auto', 'off', None or a tile side in pixels (>= {MIN_TILE}), "
                     f"got {tile!r}")


def batch_size(tile_h: int, tile_w: int, device: torch.device, dtype: torch.dtype) -> int:
    """Tiles per network call: on a CUDA device as many as half its free memory holds, at most
    :data:`MAX_BATCH`; on the CPU one (a thread computes a tile about 10% faster alone than in
    batches of 2 or 4, its activations staying in cache; the CPU's cores run tiles side by side
    instead, see :func:`cpu_workers`)."""
    if device.type != "cuda":
        return 1
    from .pipeline import estimate_memory

    free, _ = torch.cuda.mem_get_info(device)
    return int(max(1, min(MAX_BATCH, free // 2 // estimate_memory(tile_h, tile_w, dtype))))


def cpu_workers(tile_h: int, tile_w: int, dtype: torch.dtype, batch: int,
                batches: int) -> tuple[int, int]:
    """How ``batches`` network calls of ``batch`` tiles each run on the CPU: ``(workers,
    threads)``, that many calls at once on worker threads, each with ``threads`` torch threads.

    With ``t = torch.get_num_threads()``: ``workers = min(t, batches, memory)`` (at least 1),
    where ``memory`` is how many calls :data:`CPU_TILE_BYTES` holds, and ``threads = t //
    workers``. One tile per torch thread keeps every core busy without the threads of one
    operation waiting for each other at its end (measured on 2 busy cores: 0.6-0.75 CPU s per
    256-px tile on two workers of one thread, 0.9-1.9 on one worker of two threads).
    """
    from .pipeline import estimate_memory

    threads = torch.get_num_threads()
    fit = CPU_TILE_BYTES // (batch * estimate_memory(tile_h, tile_w, dtype))
    workers = max(1, min(threads, batches, fit))
    return workers, max(1, threads // workers)


# ------------------------------------------------------------------------------- the decision
def tile_batch(source: np.ndarray, boxes: list[tuple[int, int, int, int]], grid: TileGrid,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """Network input of some tiles of one source: (n, 3, tile_h, tile_w) in [-1, 1], channels
    last, for ``boxes`` = n tuples (i, j, y, x) of ``grid`` and an (H, W, C) ``source``."""
    from .pipeline import to_network_input

    crops = np.stack([source[y:y + grid.tile_h, x:x + grid.tile_w] for _, _, y, x in boxes])
    return to_network_input(crops, device, dtype)


def _in_order(pool: ThreadPoolExecutor | None, fn: Callable, items: list, ahead: int):
    """``fn(item)`` for each item, in order; with a ``pool``, computed by its threads with at
    most ``ahead`` calls submitted and not yet taken."""
    if pool is None:
        yield from map(fn, items)
        return
    pending: deque[Future] = deque()
    for item in items:
        pending.append(pool.submit(fn, item))
        if len(pending) >= ahead:
            yield pending.popleft().result()
    while pending:
        yield pending.popleft().result()


def tiled_decision_map(model: torch.nn.Module, a: np.ndarray, b: np.ndarray, *,
                       tile: int = DEFAULT_TILE, overlap: int = DEFAULT_OVERLAP,
                       batch: int | None = None, workers: int | None = None,
                       progress: Callable[[int], object] | None = None,
                       products: torch.dtype | None = None) -> np.ndarray:
    """Soft decision map of a pair computed tile by tile.

    Args:
        model: the network, in eval mode (inputs go to its device and dtype).
        a, b: (H, W, C) sources of one size and dtype (uint8, uint16 or float32 in [0, 1]; see
            :func:`msidtrans_fast.pipeline.as_source_array`); only tiles are converted to float.
        tile, overlap: tile side and minimum overlap of neighbouring tiles, in pixels.
        batch: tiles per network call; default :func:`batch_size`.
        workers: network calls running at once on worker threads, torch's threads shared among
            them (:func:`cpu_workers`, the default on the CPU; 1 on a GPU). Whatever the workers,
            the tiles' maps are added into D in one fixed order, so D does not depend on timing.
        progress: called with the number of tiles finished after each network call.
        products: dtype of the heavy convolutions' products when it differs from the
            model's (:func:`msidtrans_fast.precision.products_context`), else None.

    Returns:
        (H, W) float32 D in [0, 1]: the network's output where one tile covers the image, else
        the window-weighted sum of the tiles' maps.
    """
    if a.shape != b.shape:
        raise ValueError(f"sources differ in shape: {a.shape} and {b.shape}")
    height, width = a.shape[:2]
    grid = plan_tiles(height, width, tile, overlap)
    param = next(model.parameters())
    if batch is None:
        batch = batch_size(grid.tile_h, grid.tile_w, param.device, param.dtype)
    boxes = list(grid.tiles())
    chunks = [boxes[k:k + batch] for k in range(0, len(boxes), batch)]
    threads = torch.get_num_threads()
    if workers is not None:
        workers, per_worker = max(1, workers), max(1, threads // max(1, workers))
    elif param.device.type == "cpu":
        workers, per_worker = cpu_workers(grid.tile_h, grid.tile_w, param.dtype, batch,
                                          len(chunks))
    else:
        workers, per_worker = 1, threads
    # the sources were checked on the host (io.load_sources): no device sync for that here
    kwargs = {"check_finite": False} if isinstance(model, MSIDTrans) else {}

    def run(chunk) -> np.ndarray:  # (n, tile_h, tile_w) float32
        A = tile_batch(a, chunk, grid, param.device, param.dtype)
        B = tile_batch(b, chunk, grid, param.device, param.dtype)
        with network_call(param.device, products):
            return model(A, B, **kwargs)[:, 0].float().cpu().numpy()

    out = np.zeros((height, width), dtype=np.float32)
    pool = None
    if workers > 1:
        pool = ThreadPoolExecutor(workers, thread_name_prefix="msidtrans-tile",
                                  initializer=torch.set_num_threads, initargs=(per_worker,))
    if per_worker != threads:
        torch.set_num_threads(per_worker)  # threads the workers start with
    try:
        for chunk, D in zip(chunks, _in_order(pool, run, chunks, 2 * workers), strict=True):
            for (i, j, y, x), d in zip(chunk, D, strict=True):
                if len(grid) == 1:
                    out[:] = d
                else:
                    out[y:y + grid.tile_h, x:x + grid.tile_w] += grid.weight(i, j) * d
            if progress is not None:
                progress(len(chunk))
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
        if per_worker != threads:
            torch.set_num_threads(threads)
    return out


class TiledDecider:
    """The decision stage on tiles (a :class:`msidtrans_fast.pipeline.Decider`): ``decider(a, b)``
    is :func:`tiled_decision_map` of the pair, a (H, W) float32 tensor on the model's device.

    ``tile``: a tile side in pixels, or ``"auto"`` (:func:`resolve_tile`: images up to
    :data:`AUTO_WHOLE_MAX_PIXELS` run as one tile covering the whole image, which is exactly the
    whole-image decision map). ``progress``, an attribute that may be set after construction, is
    called with the number of tiles finished after each network call. ``products``: as in
    :func:`tiled_decision_map`.
    """

    def __init__(self, model: torch.nn.Module, tile: int | str = "auto",
                 overlap: int = DEFAULT_OVERLAP, batch: int | None = None,
                 progress: Callable[[int], object] | None = None,
                 products: torch.dtype | None = None):
        check_tile_option(tile, overlap)
        if tile is None or tile == "off":
            raise ValueError("TiledDecider needs a tile side or 'auto'")
        self.model, self.tile, self.overlap, self.batch = model, tile, overlap, batch
        self.progress, self.products = progress, products
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    def tile_for(self, height: int, width: int) -> int | None:
        """The tile side used for an H x W pair, None when it runs whole."""
        return resolve_tile(self.tile, height, width)

    def tiles(self, height: int, width: int) -> int:
        """Network runs (tiles) one H x W pair takes."""
        side = self.tile_for(height, width)
        return 1 if side is None else len(plan_tiles(height, width, side, self.overlap))

    def describe(self, height: int, width: int) -> str:
        """How an H x W pair is run, for the closing line: "whole image" or the tile grid."""
        side = self.tile_for(height, width)
        if side is None:
            return "whole image"
        grid = plan_tiles(height, width, side, self.overlap)
        return f"{len(grid)} tiles of {side} px, overlap {self.overlap}"

    def __call__(self, a: np.ndarray, b: np.ndarray) -> torch.Tensor:
        height, width = a.shape[:2]
        side = self.tile_for(height, width) or max(height, width, MIN_TILE)
        was_training = self.model.training
        self.model.eval()
        try:
            d = tiled_decision_map(self.model, a, b, tile=side,
                                   overlap=min(self.overlap, side // 2), batch=self.batch,
                                   progress=self.progress, products=self.products)
        finally:
            self.model.train(was_training)
        return torch.from_numpy(d).to(self.device)

    def memory_needed(self, height: int, width: int) -> int:
        """Peak memory of one call (bytes): the tiles in the network at one time plus the map."""
        from .pipeline import estimate_memory

        side = self.tile_for(height, width)
        if side is None:
            return estimate_memory(height, width, self.dtype) + 4 * height * width
        grid = plan_tiles(height, width, side, min(self.overlap, side // 2))
        th, tw = grid.tile_h, grid.tile_w
        batch = self.batch or batch_size(th, tw, self.device, self.dtype)
        workers = 1
        if self.device.type == "cpu":
            workers, _ = cpu_workers(th, tw, self.dtype, batch, -(-len(grid) // batch))
        return workers * batch * estimate_memory(th, tw, self.dtype) + 4 * height * width
