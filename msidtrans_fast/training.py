"""Training MSI-DTrans: ``msidtrans-train`` and :func:`train` (docs/design.md, "Training").

The original recipe: AdamW (lr 2e-4, weight decay 0), StepLR (step 1 epoch, gamma 0.88), batch 8,
up to 200 epochs, early stopping after 6 epochs without a better validation loss, loss
``0.7 L1 + 0.1 Dice + 0.2 (1 - SSIM)`` (here with a differentiable SSIM term, see
:mod:`msidtrans_fast.losses`), mixed precision, a checkpoint every epoch plus the best.

Output folder (``out_dir``), written by rank 0 only:

- ``checkpoint_epoch_NNN.pt``: full training state after epoch NNN (dict with ``model``,
  ``optimizer``, ``scheduler``, ``scaler``, ``epoch``, ``rng``, ``history``, ...); ``last.pt`` is a
  copy of the newest one and ``best.pt`` of the best one (lowest validation loss);
- ``best_model.pt``: the best weights as a plain ``state_dict`` (loadable by the original code);
- ``log.csv`` and ``log.json``: losses per epoch.

``--resume CHECKPOINT`` continues from any of these checkpoints bit-exactly: the data of each epoch
depend only on (seed, epoch) (see :mod:`msidtrans_fast.datasets`), and the RNG states of torch,
NumPy and Python are restored.

Several GPUs: launch with ``torchrun --nproc_per_node N -m msidtrans_fast.training ...``; with
``WORLD_SIZE > 1`` in the environment each process joins the process group (NCCL on CUDA, gloo on
CPU), wraps the model in DistributedDataParallel and reads its share of every batch through a
DistributedSampler. ``batch_size`` is per process.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import ConcatDataset, DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from . import backends
from .datasets import FolderPairs, SyntheticPairs, list_images, seed_worker, split_images
from .losses import msidtrans_loss
from .model import MSIDTrans
from .modules import RSEModule
from .weights import read_checkpoint

CHECKPOINT_FORMAT = "msidtrans_fast.training/1"
#: The loss terms logged per epoch, in the order of the sums.
LOSS_TERMS = ("loss", "l1", "dice", "ssim")
LOG_FIELDS = ("epoch", "lr", "steps", "train_loss", "train_l1", "train_dice", "train_ssim",
              "val_loss", "val_l1", "val_dice", "val_ssim", "best", "epoch_seconds")


@dataclass
class TrainConfig:
    """Everything a run depends on. Defaults are the original recipe.

    Data: ``data`` lists roots in the original layout (each with ``train/`` and ``validate/``);
    ``sharp`` lists folders of sharp photos for the synthetic generator. At least one is needed;
    both may be combined (the datasets are concatenated).
    """

    out_dir: str = "runs/msidtrans"
    data: list[str] = field(default_factory=list)
    sharp: list[str] = field(default_factory=list)
    epochs: int = 200
    batch_size: int = 8
    lr: float = 2e-4
    weight_decay: float = 0.0
    lr_gamma: float = 0.88
    patience: int = 6
    crop: int = 224
    resize: int = 256
    epoch_length: int = 1000
    val_fraction: float = 0.1
    val_pairs: int = 200
    gray_prob: float = 0.0
    camera_prob: float = 0.0
    seed: int = 0
    workers: int = 2
    amp: str = "auto"
    device: str = "auto"
    backend: str = backends.AUTO
    resume: str | None = None
    init: str | None = None
    keep_checkpoints: int = 0
    time_limit: float | None = None
    progress: bool = True
    threads: int | None = None

    def validate(self) -> None:
        if not self.data and not self.sharp:
            raise ValueError("no training data: give --data ROOT (original layout) and/or "
                             "--sharp FOLDER (sharp photos for the synthetic generator)")
        for name in ("epochs", "batch_size", "crop", "resize", "epoch_length", "val_pairs"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.patience < 0 or self.workers < 0 or self.keep_checkpoints < 0:
            raise ValueError("patience, workers and keep_checkpoints must be >= 0")
        if not (self.lr > 0 and 0 < self.lr_gamma <= 1 and self.weight_decay >= 0):
            raise ValueError("need lr > 0, 0 < lr_gamma <= 1, weight_decay >= 0")
        for name in ("gray_prob", "camera_prob"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)}")
        if self.amp not in ("auto", "off", "bf16", "fp16"):
            raise ValueError(f"amp must be auto, off, bf16 or fp16, got {self.amp!r}")
        if self.resume and self.init:
            raise ValueError("give either resume (a training checkpoint) or init (weights), "
                             "not both")


@dataclass
class TrainResult:
    """What :func:`train` returns (on every rank)."""

    best_val_loss: float
    best_epoch: int
    epochs_run: int
    stopped_early: bool
    history: list[dict[str, Any]]
    out_dir: str
    best_model_path: str
    last_checkpoint_path: str
    seconds: float
    #: The trained network as it is after the last epoch (unwrapped from DDP, on its device).
    model: MSIDTrans | None = field(default=None, repr=False)


# ------------------------------------------------------------------------------------ helpers
def rng_state() -> dict[str, Any]:
    """The RNG states of torch (CPU and, if present, CUDA), NumPy and Python."""
    state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
             "python": random.getstate()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores what :func:`rng_state` returned."""
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seeds torch (all devices), NumPy and Python."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model: torch.nn.Module) -> MSIDTrans:
    return model.module if hasattr(model, "module") else model


def load_model_weights(model: MSIDTrans, state: Any, source: str) -> None:
    """Loads a state_dict into ``model`` (strict), casting to the model's dtype.

    Raises:
        ValueError: ``state`` is not a state_dict of this architecture (names the missing,
            unexpected or mis-shaped entries).
    """
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"{source} does not hold a model state_dict")
    own = model.state_dict()
    missing = [k for k in own if k not in state]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: {tuple(state[k].shape)} vs {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{source} is not an MSI-DTrans checkpoint of this architecture: "
            f"{len(missing)} missing entries {missing[:3]}, {len(unexpected)} unexpected entries "
            f"{unexpected[:3]}, {len(shapes)} shape mismatches {shapes[:3]}")
    state = {k: v.to(own[k].dtype) if v.is_floating_point() else v for k, v in state.items()}
    model.load_state_dict(state, strict=True)


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """Reads a training checkpoint written by :func:`train`, safely
    (:func:`msidtrans_fast.weights.read_checkpoint`: no code from the file runs).

    Raises:
        ValueError: the file is missing, unreadable or not a training checkpoint (a plain
            state_dict, for example: use it with ``init`` instead).
    """
    ckpt = _read_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a training checkpoint of msidtrans-train (a plain "
                         "state_dict can start a run with --init, not continue one with --resume)")
    return ckpt


def _read_file(path: str | Path, what: str = "weights file") -> Any:
    try:
        return read_checkpoint(path, what)
    except FileNotFoundError as exc:
        raise ValueError(str(exc)) from None


def _read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    obj = _read_file(path)
    if isinstance(obj, dict) and obj.get("format") == CHECKPOINT_FORMAT:
        obj = obj["model"]
    return obj


def _resolve_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        return torch.device(f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device {name!r} requested but CUDA is not available")
        if device.index is None:
            device = torch.device(f"cuda:{local_rank}")
    return device


def _amp_dtype(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype: None (off), bfloat16 or float16."""
    if amp == "off" or (amp == "auto" and device.type != "cuda"):
        return None
    if amp == "bf16" or (amp == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16
    return torch.float16


def build_datasets(cfg: TrainConfig, world_size: int = 1) -> tuple[Dataset, Dataset]:
    """(train, validation) datasets of a config; see :class:`TrainConfig`."""
    train_parts: list[Dataset] = []
    val_parts: list[Dataset] = []
    for root in cfg.data:
        root = Path(root)
        train_parts.append(FolderPairs(root / "train", cfg.resize, cfg.crop, True, cfg.seed))
        val_parts.append(FolderPairs(root / "validate", cfg.resize, cfg.crop, False, cfg.seed))
    if cfg.sharp:
        images = [p for folder in cfg.sharp for p in list_images(folder)]
        train_imgs, val_imgs = split_images(images, cfg.val_fraction, cfg.seed)
        length = cfg.epoch_length * cfg.batch_size * world_size
        train_parts.append(SyntheticPairs(train_imgs, length, cfg.crop, cfg.seed,
                                          gray_prob=cfg.gray_prob,
                                          camera_prob=cfg.camera_prob))
        if val_imgs:
            val_parts.append(SyntheticPairs(val_imgs, cfg.val_pairs, cfg.crop, cfg.seed + 1,
                                            fixed=True))
    if not val_parts:
        raise ValueError("no validation data: use val_fraction > 0 with --sharp, or --data roots "
                         "with a validate/ folder")
    def join(parts: list[Dataset]) -> Dataset:
        return parts[0] if len(parts) == 1 else ConcatDataset(parts)

    return join(train_parts), join(val_parts)


def _set_epoch(ds: Dataset, epoch: int) -> None:
    for part in (ds.datasets if isinstance(ds, ConcatDataset) else [ds]):
        part.set_epoch(epoch)


def _write_logs(out: Path, history: list[dict[str, Any]]) -> None:
    with open(out / "log.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=LOG_FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(history)
    (out / "log.json").write_text(json.dumps(history, indent=1))


def _atomic_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)


def training_progress(history: Sequence[dict[str, Any]]) -> tuple[float, int, int]:
    """``(best validation loss, its epoch, epochs since it)`` from a run's history rows.

    The best epoch is the first whose ``val_loss`` is strictly lower than every earlier one (a NaN
    loss never is); before any epoch: ``(inf, 0, 0)``. Early stopping triggers when the third value
    reaches the patience.
    """
    best, best_epoch, stale = math.inf, 0, 0
    for row in history:
        if row["val_loss"] < best:
            best, best_epoch, stale = row["val_loss"], row["epoch"], 0
        else:
            stale += 1
    return best, best_epoch, stale


class CheckpointWriter:
    """Writes a run's checkpoints to ``out_dir``, in the manner of timm's ``CheckpointSaver``.

    :meth:`save` writes ``checkpoint_epoch_NNN.pt`` atomically, copies it to ``last.pt`` and,
    for a new best epoch, to ``best.pt`` with the plain weights in ``best_model.pt``; with
    ``keep > 0`` only the newest ``keep`` per-epoch files remain.
    """

    def __init__(self, out_dir: Path, keep: int = 0):
        self.out_dir, self.keep = Path(out_dir), keep
        self.last_path = self.out_dir / "last.pt"

    def save(self, state: dict[str, Any], epoch: int, is_best: bool) -> Path:
        """Writes ``state`` (a full training state with a ``"model"`` state_dict) for ``epoch``."""
        path = self.out_dir / f"checkpoint_epoch_{epoch:03d}.pt"
        _atomic_save(state, path)
        shutil.copyfile(path, self.last_path)
        if is_best:
            shutil.copyfile(path, self.out_dir / "best.pt")
            _atomic_save(state["model"], self.out_dir / "best_model.pt")
        if self.keep:
            for old in sorted(self.out_dir.glob("checkpoint_epoch_*.pt"))[:-self.keep]:
                old.unlink()
        return path


# --------------------------------------------------------------------------------------- train
def train(config: TrainConfig | dict[str, Any]) -> TrainResult:
    """Trains MSI-DTrans as configured; see the module docstring for what it writes.

    Under ``torchrun`` (``WORLD_SIZE > 1``) each process calls this; it joins and leaves the
    process group itself unless one is already initialised.

    Raises:
        ValueError: bad configuration, unusable data, or a checkpoint that does not fit.
    """
    cfg = TrainConfig(**config) if isinstance(config, dict) else dataclasses.replace(config)
    cfg.validate()
    t_start = time.time()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = _resolve_device(cfg.device, local_rank)
    own_group = False
    if world_size > 1 and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        own_group = True
    rank = dist.get_rank() if dist.is_initialized() else 0
    world_size = dist.get_world_size() if dist.is_initialized() else 1
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    try:
        return _train(cfg, device, rank, world_size, t_start)
    finally:
        if own_group:
            dist.destroy_process_group()


def _build_model(cfg: TrainConfig, device: torch.device,
                 ckpt: dict[str, Any] | None) -> MSIDTrans:
    """The network on ``device``: seeded, then the checkpoint's or ``init`` weights."""
    seed_everything(cfg.seed)
    model = MSIDTrans(backend=cfg.backend).to(device)
    if ckpt is not None:
        load_model_weights(model, ckpt["model"], cfg.resume)
    elif cfg.init:
        load_model_weights(model, _read_weights(cfg.init), cfg.init)
    backends.resolve_backend(cfg.backend, device)  # raises if the backend cannot run here
    # RSEModule.sub2 exists only for checkpoint compatibility and is never called: keep it out of
    # autograd so that DDP does not wait for its gradients.
    for module in model.modules():
        if isinstance(module, RSEModule):
            module.sub2.requires_grad_(False)
    return model


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    return (torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None
            else contextlib.nullcontext())


def train_one_epoch(net: torch.nn.Module, batches: DataLoader, optimizer: torch.optim.Optimizer,
                    scaler: torch.amp.GradScaler, device: torch.device,
                    amp_dtype: torch.dtype | None, bar=None) -> tuple[torch.Tensor, int]:
    """One pass over ``batches`` in train mode: forward (under autocast when ``amp_dtype``), loss,
    scaled backward, optimiser step.

    Returns:
        ``(sums, steps)``: float64 (4,) sums of the batch means of (loss, l1, dice, ssim) on
        ``device``, and the number of steps.
    """
    net.train()
    sums = torch.zeros(4, device=device, dtype=torch.float64)
    steps = 0
    for batch in batches:
        a, b, dm = (batch[k].to(device, non_blocking=True) for k in ("A", "B", "DM"))
        with _autocast(device, amp_dtype):
            d = net(a, b)
        loss, parts = msidtrans_loss(d, dm)
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        sums += torch.stack([parts[k] for k in LOSS_TERMS]).double()
        steps += 1
        if bar is not None:
            bar.update(1)
            if steps % 10 == 0 or steps == 1:
                bar.set_postfix(loss=f"{(sums[0] / steps).item():.4f}")
    return sums, steps


def _train(cfg: TrainConfig, device: torch.device, rank: int, world_size: int,
           t_start: float) -> TrainResult:
    out = Path(cfg.out_dir)
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)

    ckpt = load_checkpoint(cfg.resume) if cfg.resume else None
    model = _build_model(cfg, device, ckpt)
    train_ds, val_ds = build_datasets(cfg, world_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=cfg.lr_gamma)
    amp_dtype = _amp_dtype(cfg.amp, device)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)

    start_epoch, history = 1, []
    if ckpt is not None:
        try:
            optimizer.load_state_dict(ckpt["optimizer"])
            scheduler.load_state_dict(ckpt["scheduler"])
            scaler.load_state_dict(ckpt["scaler"])
        except (KeyError, ValueError, RuntimeError) as exc:
            raise ValueError(f"checkpoint {cfg.resume} does not fit this run: {exc}") from exc
        start_epoch = int(ckpt["epoch"]) + 1
        history = list(ckpt["history"])
        set_rng_state(ckpt["rng"])

    net: torch.nn.Module = model
    if world_size > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    train_sampler = DistributedSampler(train_ds, world_size, rank, shuffle=True, seed=cfg.seed,
                                       drop_last=True)
    val_sampler = DistributedSampler(val_ds, world_size, rank, shuffle=False)
    writer = CheckpointWriter(out, cfg.keep_checkpoints)

    def stop_early() -> bool:
        return cfg.patience > 0 and training_progress(history)[2] >= cfg.patience

    stopped_early = stop_early()
    for epoch in range(start_epoch, cfg.epochs + 1):
        if stopped_early:
            break
        t_epoch = time.time()
        _set_epoch(train_ds, epoch)
        train_sampler.set_epoch(epoch)
        batches = DataLoader(train_ds, batch_size=cfg.batch_size, sampler=train_sampler,
                             num_workers=cfg.workers, worker_init_fn=seed_worker,
                             generator=torch.Generator().manual_seed(cfg.seed * 1000003 + epoch),
                             pin_memory=device.type == "cuda", drop_last=True)
        bar = None
        if is_main and cfg.progress:
            from tqdm import tqdm
            bar = tqdm(total=len(batches), desc=f"epoch {epoch}/{cfg.epochs}", leave=False,
                       dynamic_ncols=True)
        sums, steps = train_one_epoch(net, batches, optimizer, scaler, device, amp_dtype, bar)
        if bar is not None:
            bar.close()
        lr = optimizer.param_groups[0]["lr"]
        scheduler.step()
        if world_size > 1:
            dist.all_reduce(sums)
        train_means = (sums / max(1, steps * world_size)).tolist()
        val_means = evaluate_loss(net, val_ds, val_sampler, cfg.batch_size, device, amp_dtype,
                                  world_size, cfg.workers)
        improved = val_means[0] < training_progress(history)[0]
        row = {"epoch": epoch, "lr": lr, "steps": steps,
               **{f"train_{k}": v for k, v in zip(LOSS_TERMS, train_means, strict=True)},
               **{f"val_{k}": v for k, v in zip(LOSS_TERMS, val_means, strict=True)},
               "best": improved, "epoch_seconds": round(time.time() - t_epoch, 3)}
        history.append(row)
        stopped_early = stop_early()
        if is_main:
            best_val, best_epoch, stale = training_progress(history)
            writer.save({
                "format": CHECKPOINT_FORMAT, "arch": "MSIDTrans",
                "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict(),
                "epoch": epoch, "best_val_loss": best_val, "best_epoch": best_epoch,
                "epochs_without_improvement": stale, "history": history, "rng": rng_state(),
                "config": dataclasses.asdict(cfg), "world_size": world_size,
            }, epoch, improved)
            _write_logs(out, history)
            print(f"epoch {epoch}: train {train_means[0]:.4f} val {val_means[0]:.4f} "
                  f"(l1 {val_means[1]:.4f} dice {val_means[2]:.4f} ssim {val_means[3]:.4f}) "
                  f"lr {lr:.3g} {row['epoch_seconds']:.0f}s{' *best*' if improved else ''}",
                  flush=True)
        if cfg.time_limit is not None and time.time() - t_start > cfg.time_limit:
            if is_main:
                print(f"time limit of {cfg.time_limit:.0f}s reached after epoch {epoch}",
                      flush=True)
            break
    if dist.is_initialized():
        dist.barrier()
    best_val, best_epoch, _ = training_progress(history)
    return TrainResult(best_val_loss=best_val, best_epoch=best_epoch,
                       epochs_run=len(history), stopped_early=stopped_early, history=history,
                       out_dir=str(out), best_model_path=str(out / "best_model.pt"),
                       last_checkpoint_path=str(writer.last_path),
                       seconds=time.time() - t_start, model=model)


@torch.no_grad()
def evaluate_loss(net: torch.nn.Module, ds: Dataset, sampler: DistributedSampler, batch_size: int,
                  device: torch.device, amp_dtype: torch.dtype | None, world_size: int = 1,
                  workers: int = 0) -> list[float]:
    """Mean (loss, l1, dice, ssim) over a dataset in eval mode, weighted by batch size and
    averaged over ranks. Leaves the model in eval mode."""
    net.eval()
    sums = torch.zeros(5, device=device, dtype=torch.float64)
    dl = DataLoader(ds, batch_size=batch_size, sampler=sampler, num_workers=workers,
                    worker_init_fn=seed_worker, generator=torch.Generator().manual_seed(0))
    for batch in dl:
        a, b, dm = (batch[k].to(device) for k in ("A", "B", "DM"))
        with _autocast(device, amp_dtype):
            d = net(a, b)
        _, parts = msidtrans_loss(d, dm)
        n = a.shape[0]
        sums += torch.stack([parts[k] * n for k in LOSS_TERMS]
                            + [torch.tensor(float(n), device=device)]).double()
    if world_size > 1:
        dist.all_reduce(sums)
    return (sums[:4] / sums[4].clamp_min(1)).tolist()


def export_weights(src: str | Path, dst: str | Path, dtype: torch.dtype = torch.float16) -> Path:
    """Writes the weights of ``src`` (a plain state_dict such as ``best_model.pt``, or a training
    checkpoint) to ``dst`` as a plain state_dict with floating tensors cast to ``dtype`` (fp16 by
    default: the bundled ``msidtrans_fast/data/msidtrans_weights.pt``, about 3.5 MB). Integer
    entries (BatchNorm ``num_batches_tracked``) keep their dtype.

    Raises:
        ValueError: ``src`` is missing, unreadable, or not of this architecture.
    """
    state = _read_weights(src)
    load_model_weights(MSIDTrans(), state, str(src))  # checks the architecture
    out = {k: v.to(dtype) if v.is_floating_point() else v for k, v in state.items()}
    dst = Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    _atomic_save(out, dst)
    return dst


# ------------------------------------------------------------------------------------------ CLI
def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="msidtrans-train",
        description="Train MSI-DTrans (original recipe: AdamW 2e-4, StepLR 0.88/epoch, batch 8, "
                    "<= 200 epochs, early stopping after 6). Multi-GPU: "
                    "torchrun --nproc_per_node N "
                    "-m msidtrans_fast.training ...")
    p.add_argument("--out", dest="out_dir", default=d.out_dir, metavar="DIR",
                   help="output folder for checkpoints and logs (default: %(default)s)")
    p.add_argument("--data", action="append", default=[], metavar="ROOT",
                   help="root in the original layout (ROOT/train and ROOT/validate, each with "
                        "sourceA, sourceB, groundtruth, decisionmap); repeatable")
    p.add_argument("--sharp", action="append", default=[], metavar="FOLDER",
                   help="folder of sharp photos for the synthetic pair generator; repeatable")
    p.add_argument("--epochs", type=int, default=d.epochs,
                   help="most epochs to train (default: %(default)s, as the original)")
    p.add_argument("--batch-size", type=int, default=d.batch_size,
                   help="batch size per process (default: %(default)s)")
    p.add_argument("--lr", type=float, default=d.lr,
                   help="AdamW learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay,
                   help="AdamW weight decay (default: %(default)s)")
    p.add_argument("--lr-gamma", type=float, default=d.lr_gamma,
                   help="StepLR factor applied to the learning rate after every epoch "
                        "(default: %(default)s)")
    p.add_argument("--patience", type=int, default=d.patience,
                   help="early stopping: epochs without a better validation loss (0: never; "
                        "default: %(default)s)")
    p.add_argument("--crop", type=int, default=d.crop,
                   help="training crop size in pixels, square (default: %(default)s)")
    p.add_argument("--resize", type=int, default=d.resize,
                   help="resize before cropping, original layout only (default: %(default)s)")
    p.add_argument("--epoch-length", type=int, default=d.epoch_length,
                   help="steps per epoch of the synthetic generator (default: %(default)s)")
    p.add_argument("--val-fraction", type=float, default=d.val_fraction,
                   help="share of the sharp photos kept for validation (fixed, seeded split; "
                        "default: %(default)s)")
    p.add_argument("--val-pairs", type=int, default=d.val_pairs,
                   help="synthetic validation pairs (fixed; default: %(default)s)")
    p.add_argument("--gray-prob", type=float, default=d.gray_prob,
                   help="share of grayscale synthetic training pairs, validation stays colour "
                        "(default: %(default)s)")
    p.add_argument("--camera-prob", type=float, default=d.camera_prob,
                   help="share of synthetic training pairs given sensor noise, 8-bit rounding and "
                        "JPEG compression in both sources, validation stays clean "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=int, default=d.seed,
                   help="seed of the weights' initialisation, the data and the split "
                        "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers,
                   help="DataLoader worker processes (default: %(default)s)")
    p.add_argument("--amp", choices=("auto", "off", "bf16", "fp16"), default=d.amp,
                   help="mixed precision; auto: bf16 on CUDA GPUs that support it, fp16 with a "
                        "gradient scaler on other GPUs, off on the CPU (default: %(default)s)")
    p.add_argument("--device", default=d.device,
                   help="auto, cpu, cuda or cuda:N (default: %(default)s: CUDA if available)")
    p.add_argument("--backend", default=d.backend,
                   help=f"one of {backends.available_backends()} (default: %(default)s)")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue a run from a training checkpoint (bit-exact)")
    p.add_argument("--init", default=None, metavar="WEIGHTS",
                   help="start from these weights (state_dict or checkpoint), fresh optimiser")
    p.add_argument("--keep-checkpoints", type=int, default=d.keep_checkpoints, metavar="N",
                   help="keep only the newest N per-epoch checkpoints (0: keep all; "
                        "default: %(default)s)")
    p.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop after the first epoch that ends past this many seconds "
                        "(default: no limit)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")
    p.add_argument("--no-progress", dest="progress", action="store_false",
                   help="no progress bar")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point ``msidtrans-train``."""
    args = build_parser().parse_args(argv)
    try:
        result = train(TrainConfig(**vars(args)))
    except ValueError as exc:
        print(f"msidtrans-train: error: {exc}", file=sys.stderr)
        return 2
    if int(os.environ.get("RANK", "0")) == 0:
        print(json.dumps({"best_val_loss": result.best_val_loss, "best_epoch": result.best_epoch,
                          "epochs_run": result.epochs_run, "stopped_early": result.stopped_early,
                          "best_model": result.best_model_path,
                          "seconds": round(result.seconds, 1)}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
