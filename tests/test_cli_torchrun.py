"""``torchrun ... msidtrans-fuse --dataset``: each process fuses its share, outputs as one run."""

import os
import socket
import subprocess
import sys

import numpy as np

from msidtrans_fast import cli, io


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _dataset(root, pairs=3):
    rng = np.random.default_rng(0)
    for sub in ("sourceA", "sourceB"):
        (root / sub).mkdir(parents=True)
    for i in range(pairs):
        sharp = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
        blurred = ((sharp.astype(np.uint16) + np.roll(sharp, 1, axis=1)) // 2).astype(np.uint8)
        io.write_image(root / "sourceA" / f"p{i}_A.png", sharp)
        io.write_image(root / "sourceB" / f"p{i}_B.png", blurred)
    return root


def test_two_gloo_processes_share_a_dataset(tmp_path):
    root = _dataset(tmp_path / "Set")
    single = tmp_path / "single"
    assert cli.main(["--dataset", str(root), "-o", str(single), "--quiet",
                     "--save-decision-map"]) == 0

    shared = tmp_path / "shared"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
         "--master-addr", "127.0.0.1", "--master-port", str(_free_port()),
         "-m", "msidtrans_fast.cli", "--dataset", str(root), "-o", str(shared),
         "--save-decision-map", "--device", "cpu"],
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    closing = [line for line in proc.stdout.splitlines() if line.startswith("fused")]
    assert len(closing) == 1 and "fused 3 pairs" in closing[0] and "2 processes" in closing[0]
    assert "pairs/s" in closing[0]
    names = sorted(p.name for p in single.iterdir())
    assert names == sorted(p.name for p in shared.iterdir()) and len(names) == 6
    for name in names:
        np.testing.assert_array_equal(io.read_image(shared / name), io.read_image(single / name))


def test_several_processes_need_a_dataset(tmp_path, monkeypatch, capsys):
    root = _dataset(tmp_path / "Set", pairs=1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    sources = [str(root / "sourceA" / "p0_A.png"), str(root / "sourceB" / "p0_B.png")]
    assert cli.main([*sources, "-o", str(tmp_path / "f.png")]) == cli.EXIT_BAD_INPUT
    assert "--dataset" in capsys.readouterr().err
