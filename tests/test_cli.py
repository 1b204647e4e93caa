"""End-to-end tests of ``msidtrans-fuse`` through a subprocess (``python -m msidtrans_fast.cli``).

Each subprocess imports torch, so cases are grouped: one run per output mode, two at a time; the
bad-input cases all run through ``main()`` in this process and a representative set of them also
as subprocesses. Results are compared with :func:`msidtrans_fast.fuse` in this process,
using the "contrast" weights of test_fuse_api (a decision map that mixes both sources).
"""

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from msidtrans_fast import fuse, io, pipeline, weights
from msidtrans_fast.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_fuse_api import make_contrast_state_dict, smooth_image  # noqa: E402

ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_cli(*args, cwd=None):
    """Runs the command; returns (exit code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "msidtrans_fast.cli", *map(str, args)],
                          capture_output=True, text=True, timeout=600, env=ENV, cwd=cwd)
    return proc.returncode, proc.stdout, proc.stderr


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """Small sources in every supported kind, a dataset folder and contrast weights."""
    root = tmp_path_factory.mktemp("cli")
    w = root / "contrast.pt"
    torch.save(make_contrast_state_dict(), w)
    rgb8 = [smooth_image(s) for s in (1, 2)]
    gray16 = [smooth_image(s, shape=(24, 32), dtype=np.uint16) for s in (3, 4)]
    stack16 = [smooth_image(s, dtype=np.uint16) for s in (5, 6, 7)]
    paths = {"rgb8": [io.write_image(root / f"rgb8_{i}.png", a) for i, a in enumerate(rgb8)],
             "gray16": [io.write_image(root / f"g16_{i}.png", a) for i, a in enumerate(gray16)],
             "stack16": [io.write_image(root / f"frame_{i}.tif", a)
                         for i, a in enumerate(stack16)]}
    data = root / "MyData"
    for sub in ("sourceA", "sourceB"):
        (data / sub).mkdir(parents=True)
    gray8 = [smooth_image(s, shape=(24, 32)) for s in (8, 9)]
    io.write_image(data / "sourceA" / "p1-A.png", rgb8[0])
    io.write_image(data / "sourceB" / "p1-B.png", rgb8[1])
    Image.fromarray(gray8[0]).save(data / "sourceA" / "p2-A.jpg", quality=95)
    Image.fromarray(gray8[1]).save(data / "sourceB" / "p2-B.jpg", quality=95)
    return {"root": root, "weights": w, "paths": paths, "dataset": data,
            "arrays": {"rgb8": rgb8, "gray16": gray16, "stack16": stack16}}


def test_pairs_stacks_and_dataset_match_the_api(tree):
    root, w = tree["root"], tree["weights"]
    model = weights.load_model(w, "cpu")
    out = root / "out"
    out.mkdir()
    runs = {
        "rgb8": [*tree["paths"]["rgb8"], "-o", out / "rgb8.png", "--save-decision-map"],
        "gray16": [*tree["paths"]["gray16"], "-o", out / "g16.tif", "--threshold", "0.05"],
        "stack16": [*tree["paths"]["stack16"], "-o", out / "stack.tif", "--save-decision-map"],
        "dataset": ["--dataset", tree["dataset"], "-o", out / "results", "--save-decision-map"],
    }
    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(runs, pool.map(lambda a: run_cli(*a, "--weights", w), runs.values()),
                           strict=True))
    for name, (code, stdout, stderr) in results.items():
        assert code == 0, f"{name}: {stderr}"
        assert "Traceback" not in stderr
        assert " in " in stdout and " s on cpu" in stdout, stdout  # closing line with the time

    arrays = tree["arrays"]
    fused, dm = fuse(arrays["rgb8"], model=model, return_decision_map=True)
    np.testing.assert_array_equal(io.read_image(out / "rgb8.png"), fused)
    np.testing.assert_array_equal(io.read_image(out / "rgb8-dm.png"), dm.astype(np.uint8) * 255)
    assert 0 < dm.mean() < 1

    got = io.read_image(out / "g16.tif")
    assert got.dtype == np.uint16 and got.shape == (24, 32)
    np.testing.assert_array_equal(got, fuse(arrays["gray16"], model=model, threshold=0.05))

    fused, labels = fuse(arrays["stack16"], model=model, return_decision_map=True)
    got = io.read_image(out / "stack.tif")
    assert got.dtype == np.uint16 and got.shape == (24, 32, 3)
    np.testing.assert_array_equal(got, fused)
    np.testing.assert_array_equal(io.read_image(out / "stack-dm.png"),
                                  pipeline.decision_map_image(labels, 3))
    assert "fused a stack of 3 images" in results["stack16"][1]

    results_dir = out / "results"
    assert sorted(p.name for p in results_dir.iterdir()) == [
        "MyData-01-dm.png", "MyData-01.png", "MyData-02-dm.png", "MyData-02.png"]
    np.testing.assert_array_equal(io.read_image(results_dir / "MyData-01.png"),
                                  fuse(arrays["rgb8"], model=model))
    ds = tree["dataset"]
    pair2 = fuse([ds / "sourceA" / "p2-A.jpg", ds / "sourceB" / "p2-B.jpg"], model=model)
    got = io.read_image(results_dir / "MyData-02.png")
    assert got.shape == (24, 32) and got.dtype == np.uint8
    np.testing.assert_array_equal(got, pair2)
    assert "fused 2 pairs" in results["dataset"][1]


def test_overwrite_with_default_weights(tree, tmp_path):
    """Without --weights the bundled weights run; only their absence warns of untrained ones."""
    target = tmp_path / "fused.png"
    target.write_bytes(b"old")
    code, stdout, stderr = run_cli(*tree["paths"]["rgb8"], "-o", target, "--overwrite",
                                   "--quiet")
    assert code == 0, stderr
    assert stdout == ""
    if weights.BUNDLED_WEIGHTS.is_file():
        assert "UNTRAINED" not in stderr
    else:
        assert "UNTRAINED" in stderr and "not meaningful" in stderr.lower()
    assert io.read_image(target).shape == (24, 32, 3)
    assert sorted(os.listdir(tmp_path)) == ["fused.png"]


def test_help_explains_every_option():
    code, stdout, _ = run_cli("--help")
    assert code == 0
    for option in ("--dataset", "--sample", "--weights", "--device", "--dtype", "--threshold",
                   "--decision-rule", "--save-decision-map", "--overwrite", "--skip-existing",
                   "--quiet", "-o", "examples:"):
        assert option in stdout


@pytest.mark.slow
def test_sample_pair(tmp_path):
    code, stdout, stderr = run_cli("--sample", "-o", tmp_path / "s", "--save-decision-map",
                                   "--threshold", "0")
    assert code == 0, stderr
    fused = io.read_image(tmp_path / "s" / "sample-fused.png")
    assert fused.shape == (324, 480, 3) and fused.dtype == np.uint8
    assert io.read_image(tmp_path / "s" / "sample-fused-dm.png").shape == (324, 480)
    assert ("UNTRAINED" in stderr) != weights.BUNDLED_WEIGHTS.is_file()


def test_bad_input_exits_2_with_one_line_and_touches_nothing(tree, tmp_path, capsys):
    root, w = tree["root"], tree["weights"]
    a, b = tree["paths"]["rgb8"]
    existing = tmp_path / "exists.png"
    existing.write_bytes(b"keep me")
    text = tmp_path / "notes.png"
    text.write_text("not an image")
    small = io.write_image(tmp_path / "small.png", smooth_image(1)[:20])
    empty = tmp_path / "Empty"
    (empty / "sourceA").mkdir(parents=True)
    (empty / "sourceB").mkdir()
    odd = tmp_path / "Odd"
    for sub, n in (("sourceA", 2), ("sourceB", 1)):
        (odd / sub).mkdir(parents=True)
        for i in range(n):
            io.write_image(odd / sub / f"{i}.png", smooth_image(i))
    partial = tmp_path / "partial"  # the second pair's output exists: nothing may be written
    partial.mkdir()
    (partial / "MyData-02.png").write_bytes(b"old")
    other_arch = tmp_path / "other.pt"
    torch.save(torch.nn.Linear(2, 2).state_dict(), other_arch)
    new = tmp_path / "new.png"

    cases = [  # (arguments, text the one-line message must contain)
        ([a, tmp_path / "missing.png", "-o", new], "missing.png"),
        ([a, text, "-o", new], "notes.png"),
        ([a, tmp_path, "-o", new], "directory"),
        ([a, small, "-o", new], "small.png"),
        ([a, "-o", new], "at least two"),
        ([a, b, "-o", existing], "exists.png"),
        (["--dataset", empty, "-o", tmp_path / "o1"], "Empty"),
        (["--dataset", odd, "-o", tmp_path / "o2"], "mismatched"),
        (["--dataset", tree["dataset"], "-o", partial, "--weights", w], "MyData-02.png"),
        ([a, b, "-o", new, "--device", "tpu"], "tpu"),
        ([a, b, "-o", new, "--dtype", "int8"], "int8"),
        ([a, b, "-o", new, "--weights", other_arch], "other.pt"),
        ([a, b, "-o", new, "--weights", tmp_path / "nowhere.pt"], "nowhere.pt"),
        ([a, b, "-o", new, "--threshold", "-1"], "threshold"),
        ([a, b, "-o", tmp_path / "f.gif"], "f.gif"),
        ([a, b], "-o"),
        ([a, b, "-o", new, "--sample"], "exactly one"),
    ]
    if not torch.cuda.is_available():
        cases.append(([a, b, "-o", new, "--device", "cuda"], "CUDA is not available"))
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    # every case in this process through main() (same code path, no torch start-up per case) ...
    results = []
    cwd = os.getcwd()
    os.chdir(root)
    try:
        for args, _ in cases:
            capsys.readouterr()
            code = main([str(x) for x in args])
            out, err = capsys.readouterr()
            results.append((code, out, err))
    finally:
        os.chdir(cwd)
    # ... and a representative set end to end, as a user runs it (exit status, no traceback)
    end_to_end = [0, 1, 3, 5, 8, 9]
    with ThreadPoolExecutor(2) as pool:
        results += list(pool.map(lambda i: run_cli(*cases[i][0], cwd=root), end_to_end))
    for (args, needle), (code, _out, stderr) in zip(cases + [cases[i] for i in end_to_end],
                                                    results, strict=True):
        lines = [line for line in stderr.splitlines() if "warning:" not in line]
        assert code == 2, (args, stderr)
        assert len(lines) == 1 and lines[0].startswith("msidtrans-fuse: error: "), (args, stderr)
        assert needle in lines[0], (args, lines[0])
    after = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    assert after == before, "bad input must not create or change any file"
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


def test_out_of_memory_is_detected_or_caught(tree, tmp_path, monkeypatch, capsys):
    from msidtrans_fast import cli

    # before running: a CUDA device reporting too little free memory for what the decision stage
    # needs refuses the size; a decision stage that needs little is not refused
    class CudaDecider:
        device = torch.device("cuda")

        def __init__(self, bytes_per_pixel):
            self.bytes_per_pixel = bytes_per_pixel

        def memory_needed(self, height, width):
            return self.bytes_per_pixel * height * width

    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (2**30, 2**34))
    whole_image = CudaDecider(pipeline.BYTES_PER_PIXEL_FP32)
    with pytest.raises(MemoryError, match="GiB"):
        cli._check_memory(whole_image, (4000, 3000), sys.stderr)
    cli._check_memory(whole_image, (24, 32), sys.stderr)
    cli._check_memory(CudaDecider(8), (4000, 3000), sys.stderr)
    advice = cli._oom_advice(torch.device("cuda"), torch.float32, (3000, 4000))
    assert "--dtype" in advice and "--device cpu" in advice and "4000x3000" in advice

    # while running: the error is caught, reported in one line with advice, exit code 1
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 9.00 GiB")

    monkeypatch.setattr(pipeline, "fuse_sources", out_of_memory)
    a, b = tree["paths"]["rgb8"]
    code = main([str(a), str(b), "-o", str(tmp_path / "f.png"), "--weights",
                 str(tree["weights"])])
    err = capsys.readouterr().err
    assert code == 1
    assert "out of memory" in err and "--dtype" in err and "Traceback" not in err
    assert not (tmp_path / "f.png").exists()


def test_dataset_outputs_do_not_depend_on_background_io(tree, tmp_path, monkeypatch, capsys):
    from msidtrans_fast import cli

    outputs = {}
    for threads in (0, 2):
        monkeypatch.setattr(cli, "IO_THREADS", threads)
        out = tmp_path / f"threads{threads}"
        assert main(["--dataset", str(tree["dataset"]), "-o", str(out), "--weights",
                     str(tree["weights"]), "--save-decision-map", "--quiet"]) == 0
        outputs[threads] = {p.name: io.read_image(p) for p in sorted(out.iterdir())}
    assert list(outputs[0]) == ["MyData-01-dm.png", "MyData-01.png", "MyData-02-dm.png",
                                "MyData-02.png"]
    assert list(outputs[0]) == list(outputs[2])
    for name, image in outputs[0].items():
        np.testing.assert_array_equal(image, outputs[2][name])
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("threads", [0, 2])
def test_write_failure_is_one_line_and_exit_1(tree, tmp_path, monkeypatch, capsys, threads):
    from msidtrans_fast import cli

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(cli, "IO_THREADS", threads)
    monkeypatch.setattr(cli, "_write_job", disk_full)
    out = tmp_path / "out"
    code = main(["--dataset", str(tree["dataset"]), "-o", str(out), "--weights",
                 str(tree["weights"]), "--quiet"])
    err = capsys.readouterr().err
    assert code == 1
    assert err.count("\n") == 1 and "No space left on device" in err and "Traceback" not in err
    assert list(out.iterdir()) == []
