"""``msidtrans-fuse``: fuse multi-focus images from the command line.

Three modes: sources given as arguments (a pair or a focus stack, one output file), ``--dataset``
(a folder with ``sourceA/`` and ``sourceB/`` as in the original, one output per pair) and
``--sample`` (the pair shipped with the package). Every input and output is checked before the
network runs, so bad input never leaves partial output. Exit codes: 0 success, 1 the run failed
(for example out of memory), 2 bad input or usage (one line on stderr, no traceback).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

PROG = "msidtrans-fuse"
DATA_DIR = Path(__file__).resolve().parent / "data"
SAMPLE_SOURCES = (DATA_DIR / "sample_near.png", DATA_DIR / "sample_far.png")
EXIT_OK, EXIT_FAILED, EXIT_BAD_INPUT = 0, 1, 2
IO_THREADS = 2  # background threads decoding and encoding images while the network runs
ALIGN_MODELS = ("similarity", "affine", "homography")  # msidtrans_fast.align.MODELS

EPILOG = """\
examples:
  msidtrans-fuse --sample -o out/                   fuse the bundled sample pair into out/
  msidtrans-fuse A.jpg B.jpg -o fused.png           fuse a pair
  msidtrans-fuse frame_*.tif -o fused.tif           fuse a focus stack (sorted as given)
  msidtrans-fuse --align frame_*.jpg -o fused.png   align a handheld or refocused stack first
  msidtrans-fuse --dataset Lytro -o results/Lytro --save-decision-map
                                                    Lytro/sourceA + Lytro/sourceB -> results/Lytro/
                                                    Lytro-01.png, Lytro-01-dm.png, ...

Sources may be 8- or 16-bit, grayscale or RGB (PNG, TIFF, JPEG, BMP, ...); the output keeps their
bit depth and channels (16-bit output needs .png or .tif). The weights bundled with the package
are used unless --weights is given.
"""


class BadInput(Exception):
    """Bad input or usage: reported as one line on stderr with exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, no usage dump
        raise BadInput(message)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog=PROG, description="Fuse photos of one scene focused at different depths into "
                "one all-in-focus image with MSI-DTrans.",
                epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("sources", nargs="*", metavar="SOURCE",
                   help="two or more source images of one size (a pair, or a focus stack fused "
                        "in the order given), e.g. A.jpg B.jpg")
    p.add_argument("-o", "--output", required=True, metavar="PATH",
                   help="output image (.png, .tif, .jpg) for SOURCEs, e.g. -o fused.png; an output "
                        "folder (created if missing) with --dataset and --sample")
    p.add_argument("--dataset", metavar="ROOT",
                   help="fuse every pair of ROOT/sourceA and ROOT/sourceB (matched by sorted file "
                        "name, as the original Eval.py); outputs NAME-01.png, NAME-02.png, ... "
                        "with NAME = ROOT's folder name, e.g. --dataset data/Lytro -o results/")
    p.add_argument("--sample", action="store_true",
                   help="fuse the sample pair shipped with the package (no download), e.g. "
                        "--sample -o out/ writes out/sample-fused.png")
    p.add_argument("--weights", metavar="FILE",
                   help="checkpoint to use (a state_dict saved by the original or by "
                        "msidtrans-train, or a dict with a 'model' entry), e.g. --weights "
                        "model44.ckpt; default: the bundled weights")
    p.add_argument("--device", default="auto",
                   help="auto (default: CUDA if available, else CPU), cpu, cuda or cuda:N, "
                        "e.g. --device cpu")
    p.add_argument("--dtype", default="auto",
                   help="compute precision: auto (default: mixed on a CPU with native bfloat16, "
                        "else float32), float32 (exact), mixed (float32 with the heavy "
                        "convolutions computed in bfloat16), bfloat16, or float16 (CUDA only); "
                        "e.g. --dtype float32")
    p.add_argument("--tile", default="auto", metavar="auto|off|N",
                   help="how the decision map is computed: auto (default: the whole image at once "
                        "up to 1024x1024 pixels, tiles of 256 px above), off (always the whole "
                        "image; refused when it would not fit in memory) or N, tiles of N pixels "
                        "(>= 64), e.g. --tile 384")
    p.add_argument("--tile-overlap", default=None, metavar="M",
                   help="least overlap of neighbouring tiles in pixels, 0 to half the tile "
                        "(default 32), e.g. --tile-overlap 64")
    p.add_argument("--threshold", default="0.001", metavar="FRACTION",
                   help="consistency check: regions smaller than FRACTION of the image are merged "
                        "into their surroundings (0 disables it; default 0.001 as the original), "
                        "e.g. --threshold 0")
    from .decision import DECISION_RULES, DEFAULT_RULE

    p.add_argument("--decision-rule", choices=DECISION_RULES, default=DEFAULT_RULE,
                   help="how the network's soft map becomes source choices: original (D > 0.5, "
                        "as the original code) or flat (each flat, featureless region takes one "
                        "source throughout, so exposure differences between the sources do not "
                        f"show as blotches); default {DEFAULT_RULE}, e.g. --decision-rule original")
    p.add_argument("--save-decision-map", action="store_true",
                   help="also write the binary decision map (white where the first source was "
                        "taken; for stacks, grey levels by source) as NAME-dm.png beside each "
                        "output")
    p.add_argument("--align", nargs="?", const="similarity", choices=ALIGN_MODELS,
                   metavar="MODEL",
                   help="register every source to the first before fusing, for handheld or "
                        "refocused stacks: similarity (scale, rotation, shift; the default when "
                        "MODEL is left out), affine or homography. The output has the first "
                        "source's size; where a moved source has no content the first source is "
                        "taken. E.g. --align, --align homography")
    p.add_argument("--align-crop", action="store_true",
                   help="with --align: cut the output (and decision map) to the area every "
                        "source covers")
    p.add_argument("--align-fallback", action="store_true",
                   help="with --align: when a source cannot be aligned, warn and fuse unaligned "
                        "(default: stop with exit code 2 and write nothing)")
    p.add_argument("--save-aligned", metavar="DIR",
                   help="with --align: also write the sources as the network saw them (aligned, "
                        "cut like the output) as PNG into DIR: a pair as DIR/sourceA/NAME.png and "
                        "DIR/sourceB/NAME.png (the layout msidtrans-eval --sources reads), a "
                        "stack as DIR/NAME.png")
    p.add_argument("--overwrite", action="store_true",
                   help="replace existing output files (default: refuse and change nothing)")
    p.add_argument("--skip-existing", action="store_true",
                   help="keep output files that already exist and fuse only what is missing, "
                        "e.g. to continue an interrupted --dataset run")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no progress bar and no closing line (warnings and errors still show)")
    return p


@dataclass
class Job:
    """One fusion: its sources, output and optional decision-map output."""

    sources: list[Path]
    output: Path
    dm_output: Path | None = None
    arrays: list = field(default_factory=list)  # decoded sources, kept when cheap
    aligned_outputs: list[Path] = field(default_factory=list)  # --save-aligned targets
    alignments: list | None = None  # estimated before any work (--align)
    unaligned: bool = False  # alignment failed and --align-fallback asked to go on without
    shape: tuple = ()  # (H, W) of the sources, known after check_jobs
    keep: set[Path] = field(default_factory=set)  # outputs that exist and stay (--skip-existing)

    def targets(self) -> list[Path]:
        """Every file the job writes."""
        return [t for t in (self.output, self.dm_output, *self.aligned_outputs) if t is not None]


def _aligned_outputs(sources: list[Path], folder: Path) -> list[Path]:
    """Where --save-aligned writes a job's sources: a pair in msidtrans-eval's layout, a stack
    by file name (numbered when two sources share a name)."""
    if len(sources) == 2:
        return [folder / "sourceA" / f"{sources[0].stem}.png",
                folder / "sourceB" / f"{sources[1].stem}.png"]
    stems = [s.stem for s in sources]
    if len(set(stems)) == len(stems):
        return [folder / f"{stem}.png" for stem in stems]
    return [folder / f"{i:02d}-{stem}.png" for i, stem in enumerate(stems)]


def _list_images(folder: Path) -> list[Path]:
    from . import io as mio

    try:
        return mio.list_images(folder)
    except ValueError as e:
        raise BadInput(f"dataset {e}") from None


def _dm_path(output: Path) -> Path:
    return output.with_name(f"{output.stem}-dm.png")


def plan_jobs(args) -> tuple[list[Job], Path | None]:
    """The fusions to run and the output folder to create (or None)."""
    modes = sum([bool(args.sources), args.dataset is not None, args.sample])
    if modes != 1:
        raise BadInput("give either SOURCE files, --dataset ROOT or --sample (exactly one)")
    for flag, given in (("--align-crop", args.align_crop),
                        ("--align-fallback", args.align_fallback),
                        ("--save-aligned", args.save_aligned is not None)):
        if given and args.align is None:
            raise BadInput(f"{flag} needs --align")
    jobs, out_dir = _plan(args)
    if args.save_aligned is not None:
        folder = Path(args.save_aligned)
        if folder.exists() and not folder.is_dir():
            raise BadInput(f"--save-aligned folder is a file: {folder}")
        for job in jobs:
            job.aligned_outputs = _aligned_outputs(job.sources, folder)
    return jobs, out_dir


def _plan(args) -> tuple[list[Job], Path | None]:
    out = Path(args.output)
    if args.sources:
        if len(args.sources) < 2:
            raise BadInput(f"need at least two source images, got one: {args.sources[0]}")
        dm = _dm_path(out) if args.save_decision_map else None
        return [Job([Path(s) for s in args.sources], out, dm)], None
    if out.exists() and not out.is_dir():
        raise BadInput(f"output folder is a file: {out}")
    if args.sample:
        missing = [p for p in SAMPLE_SOURCES if not p.is_file()]
        if missing:
            raise BadInput(f"sample image missing from the installation: {missing[0]}")
        return [Job(list(SAMPLE_SOURCES), out / "sample-fused.png",
                    out / "sample-fused-dm.png" if args.save_decision_map else None)], out
    root = Path(args.dataset)
    if not root.is_dir():
        raise BadInput(f"dataset folder not found: {root}")
    from . import io as mio

    try:
        pairs = mio.pair_images(_list_images(root / "sourceA"), _list_images(root / "sourceB"))
    except ValueError as e:
        raise BadInput(f"mismatched dataset folder {root}: {e}") from None
    name = root.resolve().name
    jobs = []
    for i, (a, b) in enumerate(pairs, start=1):
        output = out / f"{name}-{i:02d}.png"
        jobs.append(Job([a, b], output,
                        out / f"{name}-{i:02d}-dm.png" if args.save_decision_map else None))
    return jobs, out


def check_jobs(jobs: list[Job], overwrite: bool, out_dir: Path | None, options=None,
               skip_existing: bool = False) -> list[Job]:
    """Reads every source (and checks sizes/depths) and checks every output location, before
    any work; with ``options.align``, also estimates every job's alignment (so that a source that
    cannot be aligned stops the run before anything is written).

    Returns the jobs to run: with ``skip_existing``, outputs that exist are kept (not recomputed,
    not rewritten) and a job with no missing output is left out.
    """
    from . import io as mio

    seen: set[Path] = set()
    todo = []
    for job in jobs:
        for target in job.targets():
            if target in seen:
                raise BadInput(f"two outputs would share the name {target}")
            seen.add(target)
            if skip_existing and target.is_file():
                job.keep.add(target)
                continue
            folder_to_create = out_dir is not None or target in job.aligned_outputs
            try:
                mio.check_writable(target, overwrite=overwrite, create_dirs=folder_to_create)
            except (OSError, ValueError) as e:
                raise BadInput(str(e)) from None
        if job.keep == set(job.targets()):
            continue
        names = [str(s) for s in job.sources]
        arrays = [_read(s) for s in job.sources]
        try:
            mio.check_sources(arrays, names)
        except ValueError as e:
            raise BadInput(str(e)) from None
        if job.output.suffix.lower() in mio.JPEG_SUFFIXES and arrays[0].dtype != "uint8":
            raise BadInput(f"JPEG holds 8-bit images only; these sources are 16-bit: write "
                           f"{job.output.with_suffix('.png')} or .tif instead")
        job.shape = arrays[0].shape[:2]
        if options is not None and options.align is not None:
            sources = mio.load_sources(arrays)
            _estimate_alignment(job, sources, options, names)
            if len(jobs) == 1:
                job.arrays = sources
        elif len(jobs) == 1:
            job.arrays = mio.load_sources(arrays)
        todo.append(job)
    return todo


def _estimate_alignment(job: Job, sources: list, options, names: list[str]) -> None:
    from .align import AlignmentError
    from .pipeline import estimate_alignment

    try:
        job.alignments = estimate_alignment(sources, options, names)
    except AlignmentError as e:
        raise BadInput(f"{e} (--align-fallback fuses unaligned instead)") from None
    job.unaligned = job.alignments is None
    job.shape = sources[0].shape[:2]


def _read(path: Path):
    from . import io as mio

    try:
        return mio.as_source_array(path, str(path))
    except FileNotFoundError:
        raise BadInput(f"source not found: {path}") from None
    except (OSError, ValueError, TypeError) as e:
        raise BadInput(str(e)) from None


def _is_oom(e: BaseException) -> bool:
    import torch

    if isinstance(e, (MemoryError, torch.OutOfMemoryError)):
        return True
    text = str(e).lower()
    return isinstance(e, RuntimeError) and ("out of memory" in text
                                            or "can't allocate memory" in text)


def _oom_advice(device, dtype, shape) -> str:
    from . import weights as mw

    h, w = shape
    tips = []
    dtype = mw.resolve_precision(dtype)
    if dtype in ("float32", mw.MIXED):
        tips.append("--dtype bfloat16" if device.type == "cpu" else
                    "a smaller --dtype (float16 or bfloat16)")
    if device.type != "cpu":
        tips.append("--device cpu (uses main memory)")
    tips.append("smaller images")
    return (f"out of memory fusing {w}x{h} images on {device} in "
            f"{mw.describe_precision(dtype)}: try " + ", or ".join(tips))


def available_memory(device) -> int | None:
    """Bytes free on a CUDA device, or available main memory for the CPU (None if unknown)."""
    import torch

    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    if device.type != "cpu":
        return None
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _check_memory(decider, shape, stderr) -> None:
    """Refuses before running when a CUDA device clearly lacks the memory the decision stage
    says it needs for ``shape`` = (H, W) (warns on the CPU)."""
    device = decider.device
    need = decider.memory_needed(*shape)
    free = available_memory(device)
    if free is None or need <= free:
        return
    if device.type == "cuda":
        raise MemoryError(f"needs about {need / 2**30:.1f} GiB, {free / 2**30:.1f} GiB free")
    print(f"{PROG}: warning: {shape[1]}x{shape[0]} images may need about "
          f"{need / 2**30:.1f} GiB, only {free / 2**30:.1f} GiB available", file=stderr)


def _refuse_whole_if_too_big(decider, jobs) -> None:
    """``--tile off``: refuses, before any work, sizes whose whole-image run would not fit."""
    from .tiling import DEFAULT_TILE

    free = available_memory(decider.device)
    for h, w in dict.fromkeys(job.shape for job in jobs):
        need = decider.memory_needed(h, w)
        if free is not None and need > free:
            raise BadInput(f"--tile off: the whole {w}x{h} image needs about {need / 2**30:.1f} "
                           f"GiB, {free / 2**30:.1f} GiB available on {decider.device}; use "
                           f"--tile auto (tiles of {DEFAULT_TILE} px)")


def _parse_tile(args) -> tuple:
    """(tile, overlap) for FuseOptions from --tile and --tile-overlap; BadInput when invalid."""
    from .tiling import DEFAULT_OVERLAP, DEFAULT_TILE, MIN_TILE

    tile = args.tile.strip().lower()
    if tile not in ("auto", "off"):
        try:
            tile = int(tile)
        except ValueError:
            tile = None
        if tile is None or tile < MIN_TILE:
            raise BadInput(f"--tile must be auto, off or a tile side in pixels (>= {MIN_TILE}), "
                           f"got {args.tile!r}")
    if args.tile_overlap is None:
        return tile, DEFAULT_OVERLAP
    try:
        overlap = int(args.tile_overlap)
    except ValueError:
        raise BadInput(f"--tile-overlap must be a whole number of pixels, got "
                       f"{args.tile_overlap!r}") from None
    limit = (tile if isinstance(tile, int) else DEFAULT_TILE) // 2
    if not 0 <= overlap <= limit:
        raise BadInput(f"--tile-overlap must be between 0 and half the tile ({limit}), got "
                       f"{args.tile_overlap}")
    return tile, overlap


@dataclass(frozen=True)
class Shard:
    """This process's place among those ``torchrun`` started (``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``); one process when they are unset.

    With ``--dataset``, process ``rank`` fuses pairs ``rank, rank + world, ...`` (outputs named
    as in a single run) on its own device (``cuda:LOCAL_RANK`` when ``--device auto`` finds
    CUDA), and rank 0 prints the closing line once every process has finished.
    """

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls) -> Shard:
        get = os.environ.get
        return cls(int(get("RANK", "0")), int(get("WORLD_SIZE", "1")), int(get("LOCAL_RANK", "0")))

    def join(self) -> None:
        """Joins the process group (gloo: CPU-only machines too); a no-op for one process."""
        if self.world > 1:
            import torch.distributed as dist

            if not dist.is_initialized():
                dist.init_process_group("gloo")

    def wait_for_all(self) -> None:
        """Returns once every process got here (and leaves the group)."""
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()
            dist.destroy_process_group()


def run(args, stdout, stderr) -> int:
    """Runs the command for parsed ``args``; raises BadInput for bad input."""
    from . import weights as mw

    shard = Shard.from_env()
    if shard.world > 1 and args.dataset is None:
        raise BadInput("several processes (torchrun) share the pairs of a --dataset only")
    try:
        device = mw.resolve_device(args.device)
        if shard.world > 1 and args.device == "auto" and device.type == "cuda":
            device = mw.resolve_device(f"cuda:{shard.local_rank}")
        dtype = mw.resolve_precision(args.dtype, device)
        mw.check_dtype_on_device(mw.resolve_dtype(dtype), device)
    except ValueError as e:
        raise BadInput(str(e)) from None
    try:
        threshold = float(args.threshold)
    except ValueError:
        raise BadInput(f"--threshold must be a number, got {args.threshold!r}") from None
    if not 0 <= threshold < 1:
        raise BadInput(f"--threshold must be in [0, 1), got {args.threshold}")
    from .pipeline import FuseOptions

    if args.overwrite and args.skip_existing:
        raise BadInput("give either --overwrite or --skip-existing, not both")
    tile, overlap = _parse_tile(args)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs, out_dir = plan_jobs(args)
    _print_warnings(caught, stderr)
    options = FuseOptions(device=device, dtype=dtype, threshold=threshold,
                          decision_rule=args.decision_rule, align=args.align,
                          align_crop=args.align_crop, align_fallback=args.align_fallback,
                          tile=tile, tile_overlap=overlap)
    if args.weights is not None and not Path(args.weights).is_file():
        raise BadInput(f"weights file not found: {args.weights}")

    planned = len(jobs)
    jobs = jobs[shard.rank::shard.world]
    mine = len(jobs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        jobs = check_jobs(jobs, args.overwrite, out_dir, options, args.skip_existing)
    _print_warnings(caught, stderr)
    skipped = mine - len(jobs)
    if not jobs and shard.world == 1:
        if not args.quiet:
            print(f"nothing to fuse: the outputs of all {planned} "
                  f"{'pairs' if planned > 1 else 'fusions'} exist (kept)", file=stdout)
        return EXIT_OK
    if args.align is not None and not args.quiet:
        _print_alignments(jobs, stdout)
    shard.join()

    from .pipeline import make_decider

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            decider = make_decider(options, weights=args.weights)
        except (OSError, ValueError) as e:
            raise BadInput(str(e)) from None
    _print_warnings(caught, stderr)
    if tile == "off":
        _refuse_whole_if_too_big(decider, jobs)
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")
        code = _fuse_jobs(args, jobs, decider, options, out_dir, skipped, stdout, stderr, shard,
                          len(jobs) if shard.world == 1 else planned)
    _print_warnings(caught, stderr)
    return code


def _print_warnings(caught, stderr) -> None:
    """Each distinct warning once, as one line ``msidtrans-fuse: warning: ...``."""
    for message in dict.fromkeys(str(w.message) for w in caught):
        print(f"{PROG}: warning: {message}", file=stderr)


def _print_alignments(jobs: list[Job], stdout) -> None:
    from .align import report

    for job in jobs:
        if job.alignments is not None:
            for line in report(job.alignments, [str(s) for s in job.sources], *job.shape):
                print(f"aligned {line}", file=stdout)


class _InlineExecutor:
    """Runs submitted calls at once, in the caller's thread (``IO_THREADS = 0``)."""

    def submit(self, fn, *args):
        future: Future = Future()
        try:
            future.set_result(fn(*args))
        except Exception as e:  # delivered through result(), as a thread pool does
            future.set_exception(e)
        return future

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def _read_job(job: Job) -> list:
    """The load stage for one job: its sources as :func:`msidtrans_fast.io.load_sources`."""
    from . import io as mio

    return job.arrays or mio.load_sources(job.sources)


def _write_job(job: Job, result, arrays: list, overwrite: bool) -> None:
    """The write stage for one job: the fused image, with the first source's EXIF and colour
    profile, and, if asked, its decision map and the sources as the network saw them."""
    from . import io as mio
    from .pipeline import decision_map_image

    if job.output not in job.keep:
        mio.write_image(job.output, result.image, overwrite=overwrite,
                        metadata=mio.read_metadata(job.sources[0]))
    if job.dm_output is not None and job.dm_output not in job.keep:
        dm = decision_map_image(result.decision_map(len(arrays)), len(arrays))
        mio.write_image(job.dm_output, dm, overwrite=overwrite)
    if job.aligned_outputs:
        seen = result.aligned_images() or [a[..., 0] if a.shape[-1] == 1 else a for a in arrays]
        for path, image in zip(job.aligned_outputs, seen, strict=True):
            if path in job.keep:
                continue
            path.parent.mkdir(parents=True, exist_ok=True)
            mio.write_image(path, image, overwrite=overwrite)


def _fuse_jobs(args, jobs, decider, options, out_dir, skipped, stdout, stderr, shard=Shard(),
               total=None) -> int:
    """Fuses every job in order. With ``IO_THREADS > 0`` the next job's sources are decoded and
    the finished outputs encoded in background threads while the network runs (decoders,
    encoders and torch release the GIL), at most two outputs waiting to be written.

    ``jobs`` is this process's share (``shard``) of ``total`` jobs; rank 0 reports them all."""
    import torch
    from tqdm import tqdm

    from .pipeline import fuse_sources, stack_runs
    from .weights import AUTO_DTYPE

    start = time.perf_counter()
    total = len(jobs) if total is None else total
    stack = len(jobs) == 1 and len(jobs[0].sources) > 2
    tiles = getattr(decider, "tiles", lambda h, w: 1)
    # when an image is cut into tiles the bar counts tiles (a whole image counts as one, every
    # pair of a stack counts its own); otherwise a stack counts pairs, a dataset images. Other
    # processes' images are not read here: with several, the bar counts images.
    by_tile = shard.world == 1 and any(tiles(*job.shape) > 1 for job in jobs)
    if by_tile:
        bar_total = sum(stack_runs(len(job.sources)) * tiles(*job.shape) for job in jobs)
        unit = "tile"
    elif stack:
        bar_total, unit = stack_runs(len(jobs[0].sources)), "pair"
    else:
        bar_total, unit = len(jobs), "image"
    bar = tqdm(total=bar_total, unit=unit,
               disable=args.quiet or shard.rank > 0 or (total == 1 and not stack and not by_tile),
               file=stderr, dynamic_ncols=True)
    if hasattr(decider, "progress"):
        decider.progress = bar.update if by_tile else None
    from . import weights as mw

    device, dtype = options.device, options.dtype  # resolved by run()
    job, shape = (jobs[0] if jobs else None), None
    pool = (ThreadPoolExecutor(IO_THREADS, thread_name_prefix="msidtrans-io") if IO_THREADS > 0
            else _InlineExecutor())
    with pool:
        writes: deque[Future] = deque()
        try:
            next_read = pool.submit(_read_job, jobs[0]) if jobs else None
            for i, job in enumerate(jobs):
                arrays = next_read.result()
                if i + 1 < len(jobs):
                    next_read = pool.submit(_read_job, jobs[i + 1])
                shape = arrays[0].shape[:2]
                _check_memory(decider, shape, stderr)
                job_options = replace(options, align=None, align_crop=False,
                                      align_fallback=False) if job.unaligned else options
                result = fuse_sources(arrays, decider, job_options,
                                      progress=bar.update if stack and not by_tile else None,
                                      names=[str(s) for s in job.sources],
                                      alignments=job.alignments)
                writes.append(pool.submit(_write_job, job, result, arrays, args.overwrite))
                while len(writes) > 2 or (writes and writes[0].done()):
                    writes.popleft().result()
                if not stack and not by_tile:
                    bar.update()
            while writes:
                writes.popleft().result()
        except Exception as e:
            bar.close()
            for write in writes:
                write.cancel()
            if _is_oom(e):
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                print(f"{PROG}: error: {_oom_advice(device, dtype, shape or (0, 0))} "
                      f"({job.sources[0]})", file=stderr)
                return EXIT_FAILED
            if isinstance(e, OSError):
                print(f"{PROG}: error: reading or writing failed: {e}", file=stderr)
                return EXIT_FAILED
            if isinstance(e, RuntimeError):
                print(f"{PROG}: error: fusing {job.sources[0]} failed on {device} in "
                      f"{mw.describe_precision(dtype)}: {str(e).splitlines()[0]}", file=stderr)
                return EXIT_FAILED
            raise
    bar.close()
    shard.wait_for_all()
    elapsed = time.perf_counter() - start
    if not args.quiet and shard.rank == 0:
        if stack:
            what = f"fused a stack of {len(jobs[0].sources)} images into {jobs[0].output}"
        elif out_dir is not None:
            what = f"fused {total} pair{'s' if total > 1 else ''} into {out_dir}"
            if shard.world > 1:
                what += f" with {shard.world} processes"
            elif skipped:
                what += f" (kept {skipped} already fused)"
        else:
            what = f"fused 1 pair into {jobs[0].output}"
        precision = mw.describe_precision(dtype)
        if str(args.dtype).lower() == AUTO_DTYPE:
            precision += ", picked by --dtype auto"
        rate = f", {total / elapsed:.2f} pairs/s" if out_dir is not None and not stack else ""
        print(f"{what} in {elapsed:.1f} s on {device} ({precision}; "
              f"{_path_note(decider, jobs)}){rate}", file=stdout)
    return EXIT_OK


def _path_note(decider, jobs) -> str:
    """Which decision path ran, for the closing line."""
    describe = getattr(decider, "describe", None)
    if describe is None:
        return "whole image"
    if len(jobs) == 1:
        return describe(*jobs[0].shape)
    tiled = sum(decider.tile_for(*job.shape) is not None for job in jobs)
    return f"{tiled} of {len(jobs)} images tiled" if tiled else "whole images"


def _bare_align(argv: list[str]) -> list[str]:
    """``--align`` not followed by a model name means ``--align=similarity`` (so that
    ``--align a.jpg b.jpg`` does not read ``a.jpg`` as the model)."""
    out = list(argv)
    for i, arg in enumerate(out):
        if arg == "--":
            break
        if arg == "--align" and (i + 1 == len(out) or out[i + 1] not in ALIGN_MODELS):
            out[i] = "--align=similarity"
    return out


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``msidtrans-fuse``; returns the exit code."""
    try:
        args = build_parser().parse_args(_bare_align(sys.argv[1:] if argv is None else argv))
        return run(args, sys.stdout, sys.stderr)
    except BadInput as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
