"""Collects what ``benchmarks/gpu_check.sh`` wrote into one JSON file and one Markdown table.

    python benchmarks/gpu_check_report.py OUTDIR          # writes OUTDIR/results.{json,md}
    python benchmarks/gpu_check_report.py --check-imports # what the dry run checks

Inputs in OUTDIR: ``steps.tsv`` (step, status, exit code, seconds, command), the
pytest-benchmark files ``*.bench.json``, ``agreement.json``, the tests' ``tests.xml`` (JUnit) and
the sanitizer logs (``memcheck.log``, ``racecheck.log``: their ``ERROR SUMMARY`` lines). A short
summary goes to stdout: the eval-forward comparison first.
"""

from __future__ import annotations

import argparse
import importlib
import json
import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent

#: Every module a step of the script imports (the dry run checks them all).
IMPORTS = ("torch", "triton", "numpy", "PIL", "pywt", "pytest", "pytest_benchmark",
           "msidtrans_fast", "msidtrans_fast.attention", "msidtrans_fast.embedding",
           "msidtrans_fast.triton_backend", "msidtrans_fast.pipeline", "msidtrans_fast.weights",
           "msidtrans_fast.io", "msidtrans_fast.ops", "msidtrans_fast.losses",
           "baselines", "bench_model", "bench_attention", "bench_ops", "decision_agreement")
#: Names the steps use from those modules.
ATTRIBUTES = {"msidtrans_fast.pipeline": ("to_network_input", "binarise", "BINARY_LEVEL"),
              "msidtrans_fast.weights": ("load_model",), "msidtrans_fast.io": ("read_image",),
              "msidtrans_fast.ops": ("compiled",), "baselines": ("build_runner",)}


def check_imports() -> int:
    sys.path.insert(0, str(HERE))
    failed = 0
    for name in IMPORTS:
        try:
            module = importlib.import_module(name)
            missing = [a for a in ATTRIBUTES.get(name, ()) if not hasattr(module, a)]
            if missing:
                raise AttributeError(f"no {', '.join(missing)}")
            print(f"  import {name}: ok")
        except Exception as error:  # noqa: BLE001 - every failure is reported, then counted
            failed += 1
            print(f"  import {name}: FAILED ({type(error).__name__}: {error})")
    return failed


def _steps(out: Path) -> list[dict]:
    path = out / "steps.tsv"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        name, status, rc, seconds, command = line.split("\t", 4)
        rows.append({"step": name, "status": status, "exit_code": int(rc),
                     "seconds": float(seconds), "command": command})
    return rows


def _benchmarks(out: Path) -> list[dict]:
    rows = []
    for path in sorted(out.glob("*.bench.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue  # a step stopped while writing: its log says why
        for bench in data.get("benchmarks", []):
            rows.append({"file": path.name, "group": bench.get("group"), "name": bench["name"],
                         "median_ms": bench["stats"]["median"] * 1e3,
                         "min_ms": bench["stats"]["min"] * 1e3,
                         "rounds": bench["stats"]["rounds"], **bench.get("extra_info", {})})
    return rows


def _tests(out: Path) -> dict | None:
    path = out / "tests.xml"
    if not path.exists():
        return None
    try:
        suite = ET.parse(path).getroot()
    except ET.ParseError:
        return None
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{c.get('classname')}::{c.get('name')}" for c in suite.iter("testcase")
                        if c.find("failure") is not None or c.find("error") is not None]
    return counts


def _sanitizer(out: Path, tool: str) -> dict | None:
    path = out / f"{tool}.log"
    if not path.exists():
        return None
    text = path.read_text(errors="replace")
    summaries = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", text)]
    passed = re.findall(r"(\d+) passed", text)
    return {"error_summaries": summaries, "errors": sum(summaries),
            "tests_passed": int(passed[-1]) if passed else None}


def _eval_table(benches: list[dict]) -> list[str]:
    """Eval forward: ours against the best PyTorch port, per size and dtype."""
    cases = {}
    for b in benches:
        if b.get("mode") == "eval_fwd":
            cases.setdefault((b["size"], b["dtype"]), {})[b["runner"]] = b
    lines = []
    for (size, dtype), runners in sorted(cases.items()):
        parts = [f"{name} {r['median_ms']:.1f} ms ({r['peak_mem_gib']:.2f} GiB)"
                 for name, r in sorted(runners.items())]
        ours, best = runners.get("triton"), runners.get("pytorch_best")
        ratio = f", pytorch_best/triton {best['median_ms'] / ours['median_ms']:.2f}x" if (
            ours and best) else ""
        lines.append(f"eval forward {size}x{size} {dtype}: " + "; ".join(parts) + ratio)
    return lines


def report(out: Path) -> dict:
    benches = _benchmarks(out)
    agreement = None
    if (out / "agreement.json").exists():
        agreement = json.loads((out / "agreement.json").read_text())
    env = {}
    if (out / "env.json").exists():
        env = json.loads((out / "env.json").read_text())
    result = {"environment": env, "steps": _steps(out), "tests": _tests(out),
              "memcheck": _sanitizer(out, "memcheck"), "racecheck": _sanitizer(out, "racecheck"),
              "agreement": agreement, "benchmarks": benches}
    (out / "results.json").write_text(json.dumps(result, indent=1))

    md = ["# GPU check", ""]
    if env:
        md += ["Environment: " + ", ".join(f"{k} {v}" for k, v in env.items()), ""]
    md += ["| step | status | exit code | seconds |", "|---|---|---|---|"]
    md += [f"| {s['step']} | {s['status']} | {s['exit_code']} | {s['seconds']:.0f} |"
           for s in result["steps"]]
    summary = _eval_table(benches)
    if result["tests"]:
        t = result["tests"]
        summary.append(f"tests: {t['tests']} run, {t['failures'] + t['errors']} failed, "
                       f"{t['skipped']} skipped" + (f" ({', '.join(t['failed'][:5])})"
                                                    if t["failed"] else ""))
    for tool in ("memcheck", "racecheck"):
        if result[tool]:
            summary.append(f"{tool}: {result[tool]['errors']} errors reported "
                           f"({result[tool]['tests_passed']} tests passed under it)")
    if agreement:
        md += ["", "## bf16 against fp32: pixels whose decision differs", "",
               "| backend | H x W | before check | after check | max abs dD |",
               "|---|---|---|---|---|"]
        for r in agreement["rows"]:
            md.append(f"| {r['backend']} | {r['height']}x{r['width']} | "
                      f"{r['differ_before_check']:.2e} | {r['differ_after_check']:.2e} | "
                      f"{r['max_abs_diff_D']:.3f} |")
        worst = max(r["differ_after_check"] for r in agreement["rows"])
        summary.append(f"bf16 vs fp32 decisions: at most {worst:.2e} of the pixels differ after "
                       "the consistency check")
    if benches:
        md += ["", "## Benchmarks (medians)", "",
               "| group | name | median ms | min ms | TFLOP/s | MP/s | peak GiB/MiB |",
               "|---|---|---|---|---|---|---|"]
        for b in benches:
            peak = b.get("peak_mem_gib", b.get("peak_mem_mib", ""))
            md.append(f"| {b['group']} | {b['name']} | {b['median_ms']:.3f} | "
                      f"{b['min_ms']:.3f} | {b.get('tflops', '')} | "
                      f"{b.get('megapixels_per_s', '')} | {peak} |")
    md += ["", "## Summary", ""] + [f"- {line}" for line in summary]
    (out / "results.md").write_text("\n".join(md) + "\n")
    print("\n".join(summary))
    return result


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", nargs="?", type=Path)
    p.add_argument("--check-imports", action="store_true")
    a = p.parse_args(argv)
    if a.check_imports:
        return 1 if check_imports() else 0
    if a.out is None:
        p.error("give the output folder")
    report(a.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
