"""The GPU benchmark: crossq_jax.py against sbx-rl's CrossQ on one GPU, at critic widths 2048 and 256, in one command.

    python benchmarks/gpu.py              # on the GPU machine (a few minutes, compilations included)
    python benchmarks/gpu.py --dry-run    # on any machine: tiny widths and runs, to check it works end to end

Hopper-v4, batch 256, the paper's CrossQ settings otherwise (learning starts after 5000 random steps). For each
width: (1) env steps/s of the random warm-up and of learning (steady state, the windows that compile left out),
ours as users run it (the script in a subprocess, timed from its charts/SPS events) alternated with sbx's CrossQ
as its users run it (learn() continued window by window, timed from outside); (2) the calls of one learning env
step of ours, in microseconds: until `store` returns, until `train_step` returns (a GPU runs both
asynchronously) and until the next action has been read (the step's device work complete); (3) the kernel
counts of our compiled per-step programs (benchmarks/programs.py); and the GPU, CPU and package versions.

A GPU machine that reaches no package registry needs wheels of what its image lacks: `benchmarks/gpu_wheels.sh`
downloads them here (for its Python) and prints the command that installs them there and runs this benchmark.
"""

import argparse
import os
import platform
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version

# Ours runs in a subprocess beside this process (sbx and our parts): each takes a share of the GPU's memory
# instead of JAX's default 75%, which would leave the other none. Set before JAX is imported.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.3")

import numpy as np
from programs import COUNTED, program_counts
from throughput import REPO, Parts, hardware, load_script, log, peer_settings, quiet, run_ours, run_peer

SCRIPT = "crossq_jax.py"
# (widths, learning starts, env steps per SPS window, windows of warm-up, windows of learning, repeats)
FULL = ([2048, 256], 5000, 500, 8, 6, 2)
DRY_RUN = ([32, 16], 300, 50, 4, 4, 1)


def windows(learning_starts: int, every: int, n_warmup: int, n_learning: int) -> tuple[list[int], int]:
    """Bounds of the SPS windows (warm-up ones ending at learning_starts; learning ones from two windows after
    it, past the compilations), and how many of the windows between the bounds are warm-up ones."""
    warmup = list(range(learning_starts - n_warmup * every, learning_starts + 1, every))
    learning = list(range(learning_starts + 2 * every, learning_starts + (2 + n_learning) * every + 1, every))
    return warmup + learning, n_warmup


def steps_per_second(seconds: list[np.ndarray], n_warmup: int) -> tuple[float, float]:
    """(warm-up, learning) env steps/s: medians over the repeats' windows, the one across learning_starts left out."""
    warmup = np.concatenate([s[:n_warmup] for s in seconds])
    learning = np.concatenate([s[n_warmup + 1 :] for s in seconds])
    return 1 / float(np.median(warmup)), 1 / float(np.median(learning))


def package_versions(names: list[str]) -> str:
    def of(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "not installed"

    return ", ".join(f"{name} {of(name)}" for name in names)


def machine(peer: bool) -> list[str]:
    """The machine, the GPU and the versions of what the timings depend on."""
    query = ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
    gpu = subprocess.run(query, capture_output=True, text=True).stdout.strip() if shutil.which(query[0]) else "none"
    return [
        f"{hardware(peer)}; Python {platform.python_version()}",
        f"nvidia-smi: {gpu}; XLA_PYTHON_CLIENT_MEM_FRACTION={os.environ['XLA_PYTHON_CLIENT_MEM_FRACTION']}",
        "packages: " + package_versions(["jaxlib", "flax", "optax", "mujoco", "gymnasium", "numpy"]),
        *(["peer: " + package_versions(["sbx-rl", "stable-baselines3", "torch"])] if peer else []),
    ]


def main() -> None:
    quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="tiny widths and runs: checks that it works")
    parser.add_argument("--no-peer", action="store_true", help="ours only (sbx-rl not installed)")
    parser.add_argument("--widths", type=int, nargs="+", help="critic widths (default 2048 256; dry run 32 16)")
    options = parser.parse_args()
    widths, learning_starts, every, n_warmup, n_learning, repeats = DRY_RUN if options.dry_run else FULL
    widths = options.widths or widths
    bounds, n_warmup = windows(learning_starts, every, n_warmup, n_learning)
    module, started = load_script(SCRIPT), time.perf_counter()
    print(f"command: python benchmarks/gpu.py {' '.join(sys.argv[1:])}".rstrip(), flush=True)
    rows, calls, counts = [], {}, {}
    for width in widths:
        argv = ["--env-id", "Hopper-v4", "--seed", "1", "--critic-width", str(width)]
        argv += ["--learning-starts", str(learning_starts), "--total-timesteps", str(bounds[-1])]
        argv += ["--log-freq", str(every), "--eval-freq", "0", "--eval-episodes", "1"]
        args = module.parse_args(argv)
        log(f"[width {width}] python {SCRIPT} {' '.join(argv)}")
        seconds = {"ours": [], "sbx": []}
        for repeat in range(repeats):
            for which in ["ours", "sbx"][:: 1 if repeat % 2 == 0 else -1]:  # which goes first swaps every repeat
                if which == "ours":
                    seconds["ours"].append(run_ours(SCRIPT, argv, bounds, REPO))
                elif not options.no_peer:
                    settings = peer_settings("CrossQ", args, learning_starts)
                    seconds["sbx"].append(run_peer("CrossQ", args.env_id, settings, bounds))
                else:
                    continue
                log(
                    f"    {which} run {repeat + 1}: {1 / np.median(seconds[which][-1][n_warmup + 1 :]):.0f} env steps/s"
                )
        ours = steps_per_second(seconds["ours"], n_warmup)
        rows.append((width, SCRIPT, *ours, ""))
        if seconds["sbx"]:
            sbx = steps_per_second(seconds["sbx"], n_warmup)
            rows.append((width, "sbx CrossQ", *sbx, f"ours {ours[1] / sbx[1]:.2f}x"))
        parts = Parts(module, args)
        calls[width] = parts.call_times()
        counts[width] = program_counts(module, argv)
        log(f"    calls: {', '.join(f'{k} {v:.0f} us' for k, v in calls[width].items())}")

    print("\n".join(machine(peer=not options.no_peer)))
    print(f"{time.perf_counter() - started:.0f} s in all\n")
    print(
        f"Hopper-v4, batch 256, learning starts {learning_starts}; medians of {every}-step windows, "
        f"{repeats} run(s) of each\n"
    )
    print("| critic width | implementation | random warm-up env steps/s | learning env steps/s | ratio |")
    print("|---|---|---|---|---|")
    for width, impl, warmup, learning, ratio in rows:
        print(f"| {width} | {impl} | {warmup:.0f} | {learning:.0f} | {ratio} |")
    print("\nOne learning env step of ours (as configured), median microseconds from the step's start:\n")
    names = list(next(iter(calls.values())))
    print("| critic width | " + " | ".join(names) + " |\n|---|" + "---|" * len(names))
    for width, times in calls.items():
        print(f"| {width} | " + " | ".join(f"{t:.0f}" for t in np.cumsum(list(times.values()))) + " |")
    print("\nOur compiled per-step programs (benchmarks/programs.py):\n")
    print("| critic width | program | " + " | ".join(COUNTED) + " |\n|---|---|" + "---|" * len(COUNTED))
    for width, programs in counts.items():
        for program, count in programs.items():
            print(f"| {width} | {program} | " + " | ".join(str(count[c]) for c in COUNTED) + " |")


if __name__ == "__main__":
    main()
