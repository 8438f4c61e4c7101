"""The benchmarks run end to end, so that they do not rot between the (rare) machines they are made for."""

import importlib.util
import re
import subprocess
import sys

from conftest import REPO, script_env


def test_the_gpu_benchmark_runs_end_to_end_in_its_dry_run():
    """benchmarks/gpu.py --dry-run: tiny widths and runs on this machine, every table filled (sbx's rows where
    sbx-rl is installed). On the GPU machine the same code runs at widths 2048 and 256."""
    peer = importlib.util.find_spec("sbx") is not None
    command = [sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--dry-run", *([] if peer else ["--no-peer"])]
    result = subprocess.run(command, cwd=REPO, env=script_env(), capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = result.stdout
    for width in (32, 16):
        rate = re.search(rf"^\| {width} \| crossq_jax\.py \| (\d+) \| (\d+) \|", out, re.M)
        assert rate and int(rate.group(1)) > int(rate.group(2)) > 0, out  # random steps outpace learning ones
        assert (
            re.search(rf"^\| {width} \| sbx CrossQ \| \d+ \| \d+ \| ours \d+\.\d\dx \|", out, re.M) is not None
        ) == peer
        calls = re.search(rf"^\| {width} \| (\d+) \| (\d+) \| (\d+) \|$", out, re.M)
        assert calls and 0 < int(calls.group(1)) < int(calls.group(2)) < int(calls.group(3)), out
        programs = re.findall(rf"^\| {width} \| (store|explore|train_step: [^|]+) \|((?: \d+ \|)+)$", out, re.M)
        assert [name for name, _ in programs] == ["store", "explore", "train_step: lead 1", "train_step: lead 0"]
        for _, counts in programs:
            kernels, *_, conditional, _ = (int(n) for n in counts.strip(" |").split(" | "))
            assert kernels > 0 and conditional == 0
