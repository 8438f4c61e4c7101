"""Helpers shared by the tests of the three training scripts."""

import importlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest

# Most of a short test run is XLA compiling the same update again: in each script subprocess, and in
# each in-process train() (its jitted closures are new functions). JAX's persistent compilation cache,
# one per test session, turns every compile after the first into a file read. Set before JAX is
# imported (the imports above don't import it), so that this process and every script the tests
# start (they inherit the environment) use it.
JAX_CACHE = tempfile.mkdtemp(prefix="jax-compilation-cache-")
os.environ["JAX_COMPILATION_CACHE_DIR"] = JAX_CACHE
os.environ["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
os.environ["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["crossq_jax.py", "crossq_td3_jax.py", "sac_jax.py"]


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(JAX_CACHE, ignore_errors=True)


def module_of(script: str):
    """The training script `script` as an imported module (`import crossq_jax` from the repo root)."""
    return importlib.import_module(script[:-3])


def train_in(folder: Path, module, args) -> dict:
    """`module.train(args)` in-process, with `folder` as the working directory (where `runs/` lands)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return module.train(args)
    finally:
        os.chdir(previous)


def run_script(script: str, *args: str, cwd: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run one of the training scripts as a user would, in `cwd` (where its `runs/` folder lands)."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def run_dirs(cwd: Path) -> list[Path]:
    return sorted((cwd / "runs").iterdir()) if (cwd / "runs").exists() else []


def read_scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar a run logged to TensorBoard, as {tag: [(step, value), ...]}."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    accumulator = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    accumulator.Reload()
    return {tag: [(e.step, e.value) for e in accumulator.Scalars(tag)] for tag in accumulator.Tags()["scalars"]}


@pytest.fixture
def finished_run(tmp_path_factory):
    """`finished_run(script, *flags)` runs a script to completion in a fresh folder and returns the
    TensorBoard scalars of its one run; a failed run fails the test with the script's stderr."""

    def run(script: str, *flags: str, timeout: float = 600) -> dict[str, list[tuple[int, float]]]:
        cwd = tmp_path_factory.mktemp("run")
        result = run_script(script, *flags, cwd=cwd, timeout=timeout)
        assert result.returncode == 0, result.stderr
        (run_dir,) = run_dirs(cwd)
        return read_scalars(run_dir)

    return run


@pytest.fixture
def script_runner(tmp_path):
    """`script_runner(script, *args)` runs a script in a fresh folder and returns (result, tmp_path)."""

    def run(script: str, *args: str, timeout: float = 600):
        return run_script(script, *args, cwd=tmp_path, timeout=timeout), tmp_path

    return run


class BadRewardAfter(gym.Env):
    """A small continuous env whose reward turns into `bad_reward` from step `bad_step` on."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (2,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, bad_step: int = 300, bad_reward: float = float("nan")):
        self.bad_step, self.bad_reward, self.t = bad_step, bad_reward, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), {}

    def step(self, action):
        self.t += 1
        reward = self.bad_reward if self.t >= self.bad_step else float(-(action**2).sum())
        return self.np_random.uniform(-1, 1, 2).astype(np.float32), reward, False, self.t % 50 == 0, {}


# Misbehaving envs for the divergence tests: a NaN reward (an env bug), and a finite reward of
# 1e30 whose squared TD error overflows float32 (a loss that diverges).
gym.register("NaNRewardAfter300-v0", entry_point=BadRewardAfter)
gym.register("HugeRewardAfter300-v0", entry_point=lambda: BadRewardAfter(300, 1e30))
