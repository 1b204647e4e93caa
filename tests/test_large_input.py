"""A 1024x1024 pair runs in eval mode on the CPU (the original needs ~26 GB for tu2 alone)."""

import json
import subprocess
import sys

import pytest
from conftest import REPO_ROOT


@pytest.mark.slow
def test_1024_pair_eval_forward_on_cpu_and_report_peak_memory(capsys):
    # A separate process, so that the peak resident memory measured is this forward's alone.
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "cpu_forward.py"), "--size", "1024",
         "--repeats", "1"], capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-2000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    with capsys.disabled():
        print(f"\n1024x1024 eval forward on CPU: {row['median_s']} s, "
              f"peak RSS {row['peak_rss_mib']} MiB, {row['threads']} threads")
    assert row["size"] == 1024
    assert row["peak_rss_mib"] < 12 * 1024  # 24 GB machines; the original would need > 26 GB
