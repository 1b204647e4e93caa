"""Training: loss, datasets, msidtrans-train (resume, early stopping, DDP) on tiny settings."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from PIL import Image

from msidtrans_fast import datasets, losses, training
from msidtrans_fast.model import MSIDTrans

CROP = 32


# ------------------------------------------------------------------------------------ fixtures
@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One intra-op thread: tiny tensors gain nothing from more, and on a loaded machine extra
    OpenMP threads spin and slow the tests down many times over."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _photo(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A textured 'sharp photo': smooth colour gradients plus fine random texture."""
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    base = np.stack([xx, yy, 1 - xx * yy], -1)
    tex = rng.random((h, w, 1))
    return ((0.5 * base + 0.5 * tex) * 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("sharp")
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(_photo(rng, 40 + 4 * i, 48)).save(folder / f"img_{i}.png")
    return folder


def _tiny_config(sharp_dir, out, **kw) -> training.TrainConfig:
    cfg = dict(out_dir=str(out), sharp=[str(sharp_dir)], epochs=2, batch_size=2, crop=CROP,
               epoch_length=2, val_pairs=2, val_fraction=0.25, workers=0, progress=False,
               seed=3)
    cfg.update(kw)
    return training.TrainConfig(**cfg)


def _make_layout(root, n=3, size=40, counts=None):
    """The original layout with n pairs (A = B = GT = a photo, DM = its red channel)."""
    rng = np.random.default_rng(1)
    for sub in datasets.FOLDER_NAMES:
        (root / sub).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        img = _photo(rng, size, size)
        for sub in datasets.FOLDER_NAMES:
            if counts is not None and i >= counts.get(sub, n):
                continue
            arr = img[:, :, 0] if sub == "decisionmap" else img
            Image.fromarray(arr).save(root / sub / f"p{i:02d}.png")
    return root


# ---------------------------------------------------------------------------------------- loss
def test_ssim_of_identical_maps_is_one():
    x = torch.rand(2, 1, 24, 20, generator=torch.Generator().manual_seed(0))
    assert losses.ssim(x, x).item() == pytest.approx(1.0, abs=1e-6)
    y = (x + 0.3 * torch.rand(x.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    assert losses.ssim(x, y).item() < 0.95
    assert losses.ssim(x, y).item() == pytest.approx(losses.ssim(y, x).item(), abs=1e-6)


def test_ssim_matches_scikit_image_away_from_the_border():
    skimage_metrics = pytest.importorskip("skimage.metrics")
    rng = np.random.default_rng(0)
    x = rng.random((30, 34))
    y = np.clip(x + 0.2 * rng.standard_normal(x.shape), 0, 1)
    _, ref = skimage_metrics.structural_similarity(
        x, y, data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
        full=True)
    ours = losses.ssim_map(torch.tensor(x)[None, None].float(), torch.tensor(y)[None, None].float())
    r = losses.SSIM_WINDOW // 2  # zero padding (ours) and reflection (scikit-image) differ there
    np.testing.assert_allclose(ours[0, 0, r:-r, r:-r].numpy(), ref[r:-r, r:-r], atol=2e-5)


def test_loss_terms_and_gradient_through_ssim():
    g = torch.Generator().manual_seed(0)
    dm = (torch.rand(2, 1, 32, 32, generator=g) > 0.5).float()
    loss, parts = losses.msidtrans_loss(dm.clone(), dm)
    assert parts["l1"].item() == 0 and parts["ssim"].item() == pytest.approx(1.0, abs=1e-6)
    assert loss.item() == pytest.approx(0.1 * parts["dice"].item(), abs=1e-6)
    assert parts["dice"].item() < 1e-3
    # The SSIM term alone has a gradient (the original's .item() had none).
    pred = torch.rand(2, 1, 32, 32, generator=g).requires_grad_()
    (1 - losses.ssim(dm, pred)).backward()
    assert pred.grad is not None and pred.grad.abs().sum().item() > 0
    # The total loss's gradient includes the SSIM part: it differs from L1 + Dice alone.
    p1 = pred.detach().clone().requires_grad_()
    losses.msidtrans_loss(p1, dm)[0].backward()
    p2 = pred.detach().clone().requires_grad_()
    (0.7 * (p2 - dm).abs().mean() + 0.1 * losses.dice_loss(p2, dm)).backward()
    assert (p1.grad - p2.grad).abs().max().item() > 1e-6
    with pytest.raises(ValueError, match="same shape"):
        losses.msidtrans_loss(pred, dm[:, :, :16])


# ------------------------------------------------------------------------------------ datasets
@pytest.mark.parametrize("soft", [0.0, 1.0])
def test_synthetic_pairs_are_consistent(sharp_dir, soft):
    imgs = datasets.list_images(sharp_dir)
    ds = datasets.SyntheticPairs(imgs, 12, crop=CROP, seed=5, soft_edge_prob=soft)
    blurred_somewhere = 0
    for i in range(len(ds)):
        s = ds[i]
        assert s["A"].shape == s["B"].shape == s["GT"].shape == (3, CROP, CROP)
        assert s["DM"].shape == (1, CROP, CROP)
        assert set(torch.unique(s["DM"]).tolist()) <= {0.0, 1.0}
        assert s["A"].min() >= -1 and s["A"].max() <= 1
        m = s["DM"][0].bool()
        if soft:  # away from the soft edge (<= 3 sigma = 9 px) the weight is exactly 0 or 1
            pooled = torch.nn.functional.max_pool2d(
                torch.stack([m, ~m]).float()[:, None], 21, stride=1, padding=10)[:, 0]
            inside_a, inside_b = ~pooled[1].bool(), ~pooled[0].bool()
        else:
            inside_a, inside_b = m, ~m
        np.testing.assert_allclose(s["A"][:, inside_a], s["GT"][:, inside_a], atol=1e-5)
        np.testing.assert_allclose(s["B"][:, inside_b], s["GT"][:, inside_b], atol=1e-5)
        diff_a = (s["A"] - s["GT"]).abs()[:, ~m].mean()
        diff_b = (s["B"] - s["GT"]).abs()[:, m].mean()
        blurred_somewhere += int(diff_a > 0.01) + int(diff_b > 0.01)
    assert blurred_somewhere >= len(ds)  # the defocused sides really are blurred
    # Deterministic in (seed, epoch, index); a new epoch draws new pairs.
    again = datasets.SyntheticPairs(imgs, 12, crop=CROP, seed=5, soft_edge_prob=soft)
    assert torch.equal(again[3]["A"], ds[3]["A"])
    again.set_epoch(1)
    assert not torch.equal(again[3]["DM"], ds[3]["DM"])


def test_synthetic_gray_pairs_are_the_luma_of_the_colour_crop(sharp_dir):
    imgs = datasets.list_images(sharp_dir)
    hard = dict(crop=CROP, seed=2, soft_edge_prob=0.0)  # A == GT exactly where DM == 1
    colour = datasets.SyntheticPairs(imgs, 6, **hard)
    gray = datasets.SyntheticPairs(imgs, 6, gray_prob=1.0, **hard)
    for i in range(len(gray)):
        s, c = gray[i], colour[i]
        for key in ("A", "B", "GT"):
            assert torch.equal(s[key][0], s[key][1]) and torch.equal(s[key][0], s[key][2])
        # The crop is drawn before the gray choice: the same window, converted like PIL's "L".
        luma = 0.299 * c["GT"][0] + 0.587 * c["GT"][1] + 0.114 * c["GT"][2]
        np.testing.assert_allclose(s["GT"][0], luma, atol=1e-6)
        m = s["DM"][0].bool()
        np.testing.assert_allclose(s["A"][:, m], s["GT"][:, m], atol=1e-5)
    mixed = datasets.SyntheticPairs(imgs, 40, crop=CROP, seed=2, gray_prob=0.5)
    n_gray = sum(torch.equal(mixed[i]["GT"][0], mixed[i]["GT"][1]) for i in range(len(mixed)))
    assert 5 <= n_gray <= 35
    with pytest.raises(ValueError, match="gray_prob"):
        datasets.SyntheticPairs(imgs, 1, crop=CROP, gray_prob=1.5)


def test_synthetic_camera_step_keeps_pairs_consistent(sharp_dir):
    imgs = datasets.list_images(sharp_dir)
    hard = dict(crop=CROP, seed=4, soft_edge_prob=0.0)
    clean = datasets.SyntheticPairs(imgs, 12, **hard)
    cam = datasets.SyntheticPairs(imgs, 12, camera_prob=1.0, noise_std=0.02, **hard)
    cam_gray = datasets.SyntheticPairs(imgs, 12, camera_prob=1.0, gray_prob=1.0, **hard)
    for i in range(len(cam)):
        s, c, g = cam[i], clean[i], cam_gray[i]
        # The camera step comes after every other draw: same crop and mask, small changes.
        assert torch.equal(s["DM"], c["DM"])
        assert 0 < float((s["A"] - c["A"]).abs().mean()) < 0.1
        for x in (s, g):
            m = x["DM"][0].bool()
            # Sharp parts still equal GT exactly: GT took the same noise and compression.
            np.testing.assert_allclose(x["A"][:, m], x["GT"][:, m], atol=1e-6)
            np.testing.assert_allclose(x["B"][:, ~m], x["GT"][:, ~m], atol=1e-6)
            for key in ("A", "B", "GT"):  # 8-bit values, as a camera writes them
                levels = (x[key] + 1) / 2 * 255
                assert (levels - levels.round()).abs().max() < 1e-3
        for key in ("A", "B", "GT"):  # grey pairs stay grey
            assert torch.equal(g[key][0], g[key][1]) and torch.equal(g[key][0], g[key][2])
    # Both sources get noise of the same strength, so a flat area gains detail on both sides.
    flat = torch.full((3, CROP, CROP), 0.5)
    noisy_a, noisy_b = cam._camera(np.random.default_rng(0), flat, flat, gray=False)
    assert not torch.equal(noisy_a, noisy_b)
    assert noisy_a.std() > 0.002 and noisy_b.std() > 0.002
    with pytest.raises(ValueError, match="camera_prob"):
        datasets.SyntheticPairs(imgs, 1, crop=CROP, camera_prob=-0.5)
    with pytest.raises(ValueError, match="noise_std"):
        datasets.SyntheticPairs(imgs, 1, crop=CROP, noise_std=0.5)


def test_validation_split_is_fixed_and_disjoint(sharp_dir):
    imgs = datasets.list_images(sharp_dir)
    train, val = datasets.split_images(imgs, 0.25, seed=0)
    assert (train, val) == datasets.split_images(list(reversed(imgs)), 0.25, seed=0)
    assert len(val) == 2 and not set(train) & set(val) and len(train) + len(val) == len(imgs)
    fixed = datasets.SyntheticPairs(val, 2, crop=CROP, seed=1, fixed=True)
    first = fixed[0]["A"]
    fixed.set_epoch(7)
    assert torch.equal(fixed[0]["A"], first)


def test_folder_pairs_apply_one_augmentation_to_all_four(tmp_path):
    root = _make_layout(tmp_path / "train")
    ds = datasets.FolderPairs(root, resize=36, crop=28, augment=True, seed=0)
    assert len(ds) == 3
    for epoch in range(3):
        ds.set_epoch(epoch)
        for i in range(len(ds)):
            s = ds[i]
            assert s["A"].shape == (3, 28, 28) and s["DM"].shape == (1, 28, 28)
            assert torch.equal(s["A"], s["B"]) and torch.equal(s["A"], s["GT"])
            # DM is the red channel of the same image: same crop and flips.
            np.testing.assert_allclose((s["A"][0] + 1) / 2, s["DM"][0], atol=1e-6)
    val = datasets.FolderPairs(root, resize=36, crop=28, augment=False)
    val.set_epoch(5)
    assert torch.equal(val[0]["A"], datasets.FolderPairs(root, 36, 28, augment=False)[0]["A"])


def test_bad_data_gives_clear_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no image"):
        datasets.list_images(empty)
    with pytest.raises(ValueError, match="does not exist"):
        datasets.list_images(tmp_path / "missing")
    root = _make_layout(tmp_path / "mismatch", n=3, counts={"decisionmap": 2})
    with pytest.raises(ValueError, match="mismatched image counts"):
        datasets.FolderPairs(root)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "broken.png").write_bytes(b"not an image at all")
    ds = datasets.SyntheticPairs(datasets.list_images(tmp_path / "bad"), 1, crop=CROP)
    with pytest.raises(ValueError, match="cannot read image .*broken.png"):
        ds[0]
    # Through the trainer and the command line as well.
    with pytest.raises(ValueError, match="holds no image"):
        training.train(_tiny_config(empty, tmp_path / "run"))
    with pytest.raises(ValueError, match="no training data"):
        training.train(training.TrainConfig(out_dir=str(tmp_path / "run")))
    assert training.main(["--sharp", str(empty), "--out", str(tmp_path / "run")]) == 2
    with pytest.raises(ValueError, match="gray_prob must be in"):
        training.train(_tiny_config(empty, tmp_path / "run", gray_prob=-0.1))
    with pytest.raises(ValueError, match="camera_prob must be in"):
        training.train(_tiny_config(empty, tmp_path / "run", camera_prob=2.0))


# ------------------------------------------------------------------------------------ training
def test_training_steps_reduce_the_loss(sharp_dir):
    torch.manual_seed(0)
    ds = datasets.SyntheticPairs(datasets.list_images(sharp_dir), 4, crop=CROP, seed=0)
    batch = {k: torch.stack([ds[i][k] for i in range(2)]) for k in ("A", "B", "DM")}
    model = MSIDTrans()
    model.train()
    perms = [(0, 1, 2)] * 4
    opt = torch.optim.AdamW(model.parameters(), lr=2e-4, weight_decay=0)

    def step():
        loss, _ = losses.msidtrans_loss(model(batch["A"], batch["B"], perms), batch["DM"])
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    history = [step() for _ in range(10)]
    assert history[-1] < 0.8 * history[0], history


def test_train_writes_logs_checkpoints_and_resumes_bit_exactly(sharp_dir, tmp_path):
    straight = training.train(_tiny_config(sharp_dir, tmp_path / "straight", epochs=2))
    out = tmp_path / "straight"
    for name in ("checkpoint_epoch_001.pt", "checkpoint_epoch_002.pt", "last.pt", "best.pt",
                 "best_model.pt", "log.csv", "log.json"):
        assert (out / name).is_file(), name
    log = json.loads((out / "log.json").read_text())
    assert [r["epoch"] for r in log] == [1, 2] and all(r["steps"] == 2 for r in log)
    assert log[1]["lr"] == pytest.approx(2e-4 * 0.88)
    assert (out / "log.csv").read_text().splitlines()[0].startswith("epoch,lr,steps,train_loss")
    # best_model.pt is a plain state_dict that loads strictly into a fresh network.
    MSIDTrans().load_state_dict(torch.load(out / "best_model.pt", weights_only=True), strict=True)
    # ... and exports to the fp16 file format of the bundled weights.
    fp16 = training.export_weights(out / "best.pt", tmp_path / "w16.pt")
    sd16 = torch.load(fp16, weights_only=True)
    assert sd16["ReconstructD.0.weight"].dtype == torch.float16 and fp16.stat().st_size < 8e6
    best = torch.load(out / "best_model.pt", weights_only=True)
    assert torch.equal(sd16["ReconstructD.0.weight"], best["ReconstructD.0.weight"].half())

    training.train(_tiny_config(sharp_dir, tmp_path / "split", epochs=1))
    resumed = training.train(_tiny_config(
        sharp_dir, tmp_path / "split", epochs=2, workers=1,
        resume=str(tmp_path / "split" / "checkpoint_epoch_001.pt")))
    a = torch.load(out / "last.pt", weights_only=False)
    b = torch.load(tmp_path / "split" / "last.pt", weights_only=False)
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    for sa, sb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values(),
                      strict=True):
        assert torch.equal(sa["exp_avg_sq"], sb["exp_avg_sq"])
    assert [r["val_loss"] for r in straight.history] == [r["val_loss"] for r in resumed.history]
    assert resumed.epochs_run == 2 and resumed.model is not None


def test_early_stopping_and_checkpoint_errors(sharp_dir, tmp_path, capsys):
    # The command line, with the original recipe's optimiser settings and a tiny setting.
    assert training.main(["--sharp", str(sharp_dir), "--out", str(tmp_path / "es"), "--epochs",
                          "1", "--batch-size", "2", "--crop", str(CROP), "--epoch-length", "2",
                          "--val-pairs", "2", "--val-fraction", "0.25", "--workers", "0",
                          "--seed", "3", "--gray-prob", "0.5", "--camera-prob", "0.5",
                          "--no-progress"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["epochs_run"] == 1 and summary["best_epoch"] == 1
    # Make the best validation loss unbeatable: the run must stop `patience` epochs later. The best
    # epoch and the early-stopping count come from the history, not from separate entries.
    ckpt = torch.load(tmp_path / "es" / "last.pt", weights_only=False)
    ckpt["history"][-1]["val_loss"] = -1.0
    ckpt["best_val_loss"] = 99.0
    torch.save(ckpt, tmp_path / "unbeatable.pt")
    res = training.train(_tiny_config(sharp_dir, tmp_path / "es2", epochs=6, patience=2,
                                      keep_checkpoints=1, resume=str(tmp_path / "unbeatable.pt")))
    assert res.stopped_early and res.epochs_run == 3 and res.best_epoch == 1
    assert not any(r["best"] for r in res.history[1:])
    assert [p.name for p in (tmp_path / "es2").glob("checkpoint_epoch_*.pt")] == [
        "checkpoint_epoch_003.pt"]
    assert not (tmp_path / "es2" / "best.pt").exists()

    # A plain state_dict cannot be resumed (no optimiser state), but can initialise a run.
    with pytest.raises(ValueError, match="not a training checkpoint"):
        training.train(_tiny_config(sharp_dir, tmp_path / "r",
                                    resume=str(tmp_path / "es" / "best_model.pt")))
    # A checkpoint of another architecture is refused with the reason.
    wrong = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3)).state_dict()
    torch.save(wrong, tmp_path / "wrong.pt")
    with pytest.raises(ValueError, match="not an MSI-DTrans checkpoint"):
        training.train(_tiny_config(sharp_dir, tmp_path / "r", init=str(tmp_path / "wrong.pt")))
    sd = MSIDTrans().state_dict()
    sd["ReconstructD.0.weight"] = torch.zeros(1, 16, 3, 3)
    ckpt = torch.load(tmp_path / "es" / "last.pt", weights_only=False)
    ckpt["model"] = sd
    torch.save(ckpt, tmp_path / "wrong_ckpt.pt")
    with pytest.raises(ValueError, match="shape mismatches .*ReconstructD"):
        training.train(_tiny_config(sharp_dir, tmp_path / "r",
                                    resume=str(tmp_path / "wrong_ckpt.pt")))
    (tmp_path / "garbage.pt").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="cannot read checkpoint"):
        training.train(_tiny_config(sharp_dir, tmp_path / "r", resume=str(tmp_path / "garbage.pt")))


def test_bf16_autocast_on_cpu_trains(sharp_dir, tmp_path):
    res = training.train(_tiny_config(sharp_dir, tmp_path / "bf16", epochs=1, epoch_length=1,
                                      amp="bf16"))
    assert np.isfinite(res.history[0]["train_loss"]) and np.isfinite(res.best_val_loss)


# ----------------------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, sharp: str, out: str, result_dir: str):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world),
                      RANK=str(rank), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    cfg = training.TrainConfig(out_dir=out, sharp=[sharp], epochs=1, batch_size=1, crop=CROP,
                               epoch_length=2, val_pairs=2, val_fraction=0.25, workers=0,
                               progress=False, seed=rank * 0 + 11, device="cpu")
    res = training.train(cfg)
    torch.save({"model": res.model.state_dict(), "history": res.history},
               os.path.join(result_dir, f"rank{rank}.pt"))


def test_ddp_two_cpu_processes_hold_identical_weights(sharp_dir, tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_available() or not torch.distributed.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(sharp_dir), str(tmp_path / "out"),
                                str(tmp_path)), nprocs=2, join=True)
    r0 = torch.load(tmp_path / "rank0.pt", weights_only=False)
    r1 = torch.load(tmp_path / "rank1.pt", weights_only=False)
    torch.manual_seed(11)
    init = MSIDTrans().state_dict()
    changed = 0
    for k, v in r0["model"].items():
        if k.endswith(("running_mean", "running_var", "num_batches_tracked")):
            continue  # buffers: rank 0's are broadcast at each forward, updated locally after
        assert torch.equal(v, r1["model"][k]), k
        changed += int(not torch.equal(v, init[k]))
    assert changed > 100  # the step really updated the weights
    # Losses are averaged over both ranks (only the timing may differ).
    def strip(h):
        return [{k: v for k, v in r.items() if k != "epoch_seconds"} for r in h]

    assert strip(r0["history"]) == strip(r1["history"])
    assert (tmp_path / "out" / "checkpoint_epoch_001.pt").is_file()
