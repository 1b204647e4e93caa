"""Command-line options: help texts, output checks before any work, dtypes, --skip-existing."""

import argparse
import os
import tempfile

import numpy as np
import pytest
import torch

from msidtrans_fast import cli, evaluate, fuse, io, pipeline, training, weights


def _parsers():
    return {"msidtrans-fuse": cli.build_parser(), "msidtrans-train": training.build_parser(),
            "msidtrans-eval": evaluate.build_parser()}


@pytest.mark.parametrize("name", ["msidtrans-fuse", "msidtrans-train", "msidtrans-eval"])
def test_every_option_has_a_description_and_its_default(name):
    parser = _parsers()[name]
    formatter = parser._get_formatter()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        label = action.option_strings or [action.dest]
        assert action.help and action.help.strip(), f"{name} {label[0]} has no help"
        text = formatter._expand_help(action)
        default = action.default
        if default not in (None, False, True, []):
            assert str(default) in text, f"{name} {label[0]}: default {default!r} not in {text!r}"


@pytest.fixture()
def pair(tmp_path):
    rng = np.random.default_rng(0)
    paths = []
    for name in ("a.png", "b.png"):
        paths.append(io.write_image(tmp_path / name, rng.integers(0, 256, (16, 16, 3), np.uint8)))
    return paths


@pytest.fixture()
def no_network(monkeypatch):
    """Fails the test if the network is loaded: the checks must come first."""
    def refuse(*args, **kwargs):
        raise AssertionError("the network was loaded before the outputs were checked")

    monkeypatch.setattr(pipeline, "make_decider", refuse)


def _one_error_line(capsys):
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "warning:" not in line]
    assert len(lines) == 1 and lines[0].startswith("msidtrans-fuse: error: "), err
    return lines[0]


@pytest.mark.parametrize("target", ["/sys/fused.png", "/proc/fused.png"])
def test_unwritable_output_is_refused_before_any_work(pair, target, no_network, capsys):
    try:  # a kernel file system refuses new files, even to root
        fd, probe = tempfile.mkstemp(dir=os.path.dirname(target))
    except OSError:
        pass
    else:
        os.close(fd)
        os.unlink(probe)
        pytest.skip(f"{os.path.dirname(target)} accepts new files here")
    assert cli.main([str(pair[0]), str(pair[1]), "-o", target]) == 2
    line = _one_error_line(capsys)
    assert target in line and "cannot write" in line


def test_unwritable_dataset_folder_is_refused_before_any_work(pair, tmp_path, no_network, capsys):
    root = tmp_path / "Set"
    for sub, src in (("sourceA", pair[0]), ("sourceB", pair[1])):
        (root / sub).mkdir(parents=True)
        (root / sub / "1.png").write_bytes(src.read_bytes())
    assert cli.main(["--dataset", str(root), "-o", "/sys/msidtrans-out/results"]) == 2
    assert "/sys" in _one_error_line(capsys)


def test_output_below_a_file_says_it_is_a_file(pair, tmp_path, no_network, capsys):
    afile = tmp_path / "notes"
    afile.write_text("x")
    assert cli.main([str(pair[0]), str(pair[1]), "-o", str(afile / "x.png")]) == 2
    line = _one_error_line(capsys)
    assert "is a file, not a folder" in line and "does not exist" not in line
    assert cli.main(["--sample", "-o", str(afile / "sub")]) == 2
    assert "notes" in _one_error_line(capsys)


def test_float16_is_refused_on_the_cpu_with_a_hint(pair, tmp_path, no_network, capsys):
    assert cli.main([str(pair[0]), str(pair[1]), "-o", str(tmp_path / "f.png"), "--device",
                     "cpu", "--dtype", "float16"]) == 2
    line = _one_error_line(capsys)
    assert "float16" in line and "bfloat16" in line
    assert not (tmp_path / "f.png").exists()


@pytest.mark.parametrize("native", [True, False])
def test_closing_line_names_the_precision_auto_picked(pair, tmp_path, capsys, monkeypatch,
                                                      native):
    monkeypatch.setattr(weights, "cpu_native_bf16", lambda: native)
    assert cli.main([str(pair[0]), str(pair[1]), "-o", str(tmp_path / "out-auto.png"), "--device",
                     "cpu"]) == 0
    closing = capsys.readouterr().out
    picked = "float32 with bfloat16 products" if native else "float32"
    assert f"({picked}, picked by --dtype auto;" in closing, closing
    assert cli.main([str(pair[0]), str(pair[1]), "-o", str(tmp_path / "out-mixed.png"), "--device",
                     "cpu", "--dtype", "mixed"]) == 0
    assert "(float32 with bfloat16 products;" in capsys.readouterr().out


def test_float16_is_refused_on_the_cpu_by_the_api(pair):
    with pytest.raises(ValueError, match="bfloat16"):
        fuse(pair, device="cpu", dtype="float16")


def test_skip_existing_continues_an_interrupted_dataset_run(pair, tmp_path, capsys):
    root = tmp_path / "Set"
    for sub, src in (("sourceA", pair[0]), ("sourceB", pair[1])):
        (root / sub).mkdir(parents=True)
        for i in (1, 2, 3):
            (root / sub / f"{i}.png").write_bytes(src.read_bytes())
    out = tmp_path / "out"
    assert cli.main(["--dataset", str(root), "-o", str(out), "--save-decision-map"]) == 0
    full = {p.name: p.read_bytes() for p in out.iterdir()}
    # an interrupted run: the second pair's decision map and the third pair are missing
    (out / "Set-02-dm.png").unlink()
    (out / "Set-03.png").unlink()
    (out / "Set-03-dm.png").unlink()
    (out / "Set-01.png").write_bytes(b"kept as it is")
    capsys.readouterr()
    assert cli.main(["--dataset", str(root), "-o", str(out), "--save-decision-map",
                     "--skip-existing"]) == 0
    closing = capsys.readouterr().out
    assert "fused 2 pairs" in closing and "kept 1 already fused" in closing
    assert (out / "Set-01.png").read_bytes() == b"kept as it is"
    for name in ("Set-02.png", "Set-02-dm.png", "Set-03.png", "Set-03-dm.png"):
        assert (out / name).read_bytes() == full[name], name
    # nothing left to do
    assert cli.main(["--dataset", str(root), "-o", str(out), "--save-decision-map",
                     "--skip-existing"]) == 0
    assert "nothing to fuse" in capsys.readouterr().out
    assert cli.main(["--dataset", str(root), "-o", str(out), "--skip-existing",
                     "--overwrite"]) == 2
    assert "not both" in _one_error_line(capsys)


def test_garbage_weights_message_names_only_the_problem(pair, tmp_path, capsys):
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(np.random.default_rng(0).bytes(300))
    assert cli.main([str(pair[0]), str(pair[1]), "-o", str(tmp_path / "f.png"), "--weights",
                     str(garbage)]) == 2
    line = _one_error_line(capsys)
    assert "garbage.pt" in line and "not a PyTorch checkpoint" in line
    assert "weights_only" not in line and "False" not in line
    code_file = tmp_path / "code.pt"
    torch.save({"model": {"w": torch.zeros(1)}, "hook": print}, code_file)
    with pytest.raises(ValueError, match="refused") as error:
        training.load_checkpoint(code_file)
    assert "weights_only" not in str(error.value)
