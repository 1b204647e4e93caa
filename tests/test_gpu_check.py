"""``benchmarks/gpu_check.sh``: the dry run (steps listed, every import it needs checked) passes
here, without a GPU; the report turns a step folder into results.json, results.md and a summary."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from conftest import REPO_ROOT

SCRIPT = REPO_ROOT / "benchmarks" / "gpu_check.sh"
STEPS = ("build", "tests", "eval_forward", "agreement", "train_step", "memcheck", "racecheck",
         "kernels")


def test_dry_run_lists_the_steps_and_imports_everything(tmp_path):
    env = {**os.environ, "PYTHON": sys.executable}
    result = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.rstrip().endswith("dry run: ok")
    listed = [line.split()[0] for line in result.stdout.splitlines() if line.startswith("  ")
              and not line.lstrip().startswith("import")]
    assert tuple(listed) == STEPS
    assert "FAILED" not in result.stdout


def test_usage_without_an_output_folder():
    result = subprocess.run(["bash", str(SCRIPT)], capture_output=True, text=True, timeout=60,
                            check=False)
    assert result.returncode == 2 and "--dry-run" in result.stdout


def test_report_collects_the_steps(tmp_path):
    sys.path.insert(0, str(REPO_ROOT / "benchmarks"))
    import gpu_check_report

    rows = [("build", "ok", 0, 61), ("tests", "failed", 1, 99), ("memcheck", "timeout", 124, 60),
            ("racecheck", "skipped", 0, 0)]
    (tmp_path / "steps.tsv").write_text(
        "".join(f"{n}\t{s}\t{rc}\t{t}\tcmd {n}\n" for n, s, rc, t in rows))
    bench = {"benchmarks": [
        {"name": f"test_model[eval_fwd-520x1-bf16-{r}]", "group": "model-eval_fwd-520x1-bf16",
         "stats": {"median": m, "min": m, "rounds": 5},
         "extra_info": {"mode": "eval_fwd", "size": 520, "dtype": "bf16", "runner": r,
                        "peak_mem_gib": 1.5, "megapixels_per_s": 0.27 / m}}
        for r, m in (("triton", 0.010), ("pytorch_best", 0.025))]}
    (tmp_path / "eval_forward.bench.json").write_text(json.dumps(bench))
    (tmp_path / "agreement.json").write_text(json.dumps({"rows": [
        {"backend": "triton", "height": 324, "width": 480, "differ_before_check": 1e-3,
         "differ_after_check": 2e-3, "max_abs_diff_D": 0.9}]}))
    (tmp_path / "memcheck.log").write_text("4 passed\n========= ERROR SUMMARY: 0 errors\n")
    (tmp_path / "tests.xml").write_text(
        '<testsuites><testsuite tests="3" failures="1" errors="0" skipped="1">'
        '<testcase classname="t" name="a"/><testcase classname="t" name="b"><failure/></testcase>'
        '</testsuite></testsuites>')
    result = gpu_check_report.report(tmp_path)
    assert [s["status"] for s in result["steps"]] == ["ok", "failed", "timeout", "skipped"]
    assert result["tests"]["failed"] == ["t::b"] and result["memcheck"]["errors"] == 0
    md = (tmp_path / "results.md").read_text()
    assert "pytorch_best/triton 2.50x" in md and "| triton | 324x480 | 1.00e-03 |" in md
    assert json.loads((tmp_path / "results.json").read_text())["benchmarks"][0]["runner"]
