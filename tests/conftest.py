"""Helpers shared by the tests of the three training scripts."""

import collections
import dataclasses
import importlib
import json
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
# And most test runs are tiny: their time goes to XLA compiling, not running, so they compile without
# LLVM's optimisations (a 1000-step Pendulum run of new shapes: 20.5 s -> 15.8 s on the 2-core machine).
# The learning checks, thousands of width-128 updates, compile as users' runs do (OPTIMISED_XLA).
OPTIMISED_XLA = {"XLA_FLAGS": os.environ.get("XLA_FLAGS", "")}
os.environ["XLA_FLAGS"] = (OPTIMISED_XLA["XLA_FLAGS"] + " --xla_backend_optimization_level=0").strip()

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = ["crossq_jax.py", "crossq_td3_jax.py", "sac_jax.py"]
sys.path.insert(0, str(REPO / "benchmarks"))  # the tests import the tools' `programs` and `throughput`
from throughput import lead_of  # noqa: E402  (train()'s `lead`, as the benchmarks compute it too)


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook, which reads the groups
def pytest_collection_modifyitems(config, items):
    """Order and group the tests for the two worker processes of README's command (`-n 2`).

    The learning checks (minutes each) go first, so that they run beside the many short tests instead
    of after them, with one worker waiting alone for the last. The tests that share a module-scoped
    fixture (one training run per script, say) are grouped by it and its parameter, so that
    `--dist loadgroup` (pyproject.toml) sends each group to one worker and the fixture is made once,
    not once per worker."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: the rest keep their order
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        fixtures = item._fixtureinfo.name2fixturedefs
        shared = [name for name, definitions in fixtures.items() if definitions[-1].scope == "module"]
        # A parametrized one decides (a fixture built on it is made once per value too); else the first.
        group = [f"{name}={params[name]}" for name in shared if name in params] or shared[:1]
        if group:
            item.add_marker(pytest.mark.xdist_group(f"{item.module.__name__}:{','.join(group)}"))


def pytest_sessionfinish(session, exitstatus):
    shutil.rmtree(JAX_CACHE, ignore_errors=True)


def module_of(script: str):
    """The training script `script` as an imported module (`import crossq_jax` from the repo root)."""
    return importlib.import_module(script[:-3])


# The synthetic transitions of the unit tests: 3-dimensional observations, 2-dimensional actions.
OBS_DIM, ACTION_DIM = 3, 2
SMALL = {"critic_width": 16, "actor_width": 16, "batch_size": 8, "learning_starts": 8, "buffer_size": 64}


def small_args(script_or_module, preset: str | None = None, **overrides):
    """A script's Args for `preset` (through its own parser; None: its defaults) with tiny networks and batches,
    then `overrides`."""
    module = module_of(script_or_module) if isinstance(script_or_module, str) else script_or_module
    args = module.parse_args([preset] if preset else [])
    return dataclasses.replace(args, **{**SMALL, **overrides})


def filled_buffer(module, args, n: int = 16, seed: int = 0, obs=None, next_obs=None, terminal_every: int = 0):
    """A replay buffer of `module` holding `n` random transitions (OBS_DIM, ACTION_DIM); with `obs`/`next_obs`,
    every row has those states; with `terminal_every` k, rows 0, k, 2k, ... are terminal."""
    import jax.numpy as jnp

    rng = np.random.default_rng(seed)
    buffer = module.ReplayBuffer.create(args.buffer_size, OBS_DIM, ACTION_DIM)
    for i in range(n):
        transition = module.Transition(
            jnp.asarray(rng.normal(size=OBS_DIM) if obs is None else obs, jnp.float32),
            jnp.asarray(rng.uniform(-1, 1, ACTION_DIM), jnp.float32),
            jnp.float32(rng.normal()),
            jnp.asarray(rng.normal(size=OBS_DIM) if next_obs is None else next_obs, jnp.float32),
            jnp.float32(terminal_every > 0 and i % terminal_every == 0),
        )
        buffer = module.buffer_add(buffer, transition)
    return buffer


def learning_steps(module, args, agent, buffer, n_steps: int, metrics=None, seed: int = 1):
    """Yield (agent, metrics) after each of `n_steps` learning env steps of `module`'s training loop, from its
    first: the script's jitted train_step with the actor schedule the loop computes (the next actions drawn for
    a zero observation). The yielded state is donated to the next step: copy what you keep."""
    import jax

    train_step = module.make_train_step(args, buffer.actions.shape[1])
    metrics = module.Metrics.initial() if metrics is None else metrics
    keys = {"update": jax.random.PRNGKey(seed), "explore": jax.random.PRNGKey(seed + 1)}
    obs = np.zeros((1, buffer.obs.shape[1]), np.float32)
    for step in range(args.learning_starts + 1, args.learning_starts + n_steps + 1):
        agent, metrics, keys, _ = train_step(agent, metrics, buffer, keys, obs, lead_of(args, step))
        yield agent, metrics


def train_steps(module, args, agent, buffer, n_steps: int = 1, metrics=None, seed: int = 1):
    """(agent, metrics) after `n_steps` learning env steps (see `learning_steps`)."""
    return collections.deque(learning_steps(module, args, agent, buffer, n_steps, metrics, seed), maxlen=1).pop()


def fake_checkpoint(module, path: Path, args) -> str:
    """A checkpoint of `module` holding only the host state that parse_args reads (the run's args, and the
    entries every checkpoint has), no arrays: enough for --resume's parsing and its refusals."""
    import crossq_utils

    script = crossq_utils.script_name(module)
    host_state = {"script": script, "args": dataclasses.asdict(args), "run_name": "fake", "global_step": 0}
    host_state |= {"train_seconds": 0.0, "eval_return": float("nan"), "rngs": {}, "episode_start_rng": None}
    host_state |= {"episodic_return": float("nan")}
    crossq_utils.write_checkpoint(module, str(path), {}, host_state)
    return str(path)


def train_in(folder: Path, module, args) -> dict:
    """`module.train(args)` in-process, with `folder` as the working directory (where `runs/` lands)."""
    previous = os.getcwd()
    os.chdir(folder)
    try:
        return module.train(args)
    finally:
        os.chdir(previous)


def script_env(extra: dict | None = None) -> dict:
    """The environment of a script the tests start: theirs, on the CPU, quiet, with `extra` on top."""
    return {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "ignore", **(extra or {})}


def start_script(script: str, *args: str, cwd: Path) -> subprocess.Popen:
    """Start one of the training scripts as a user would, in `cwd`, its output readable as it comes."""
    return subprocess.Popen(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=script_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def run_script(
    script: str, *args: str, cwd: Path, timeout: float = 600, env: dict | None = None
) -> subprocess.CompletedProcess:
    """Run one of the training scripts as a user would, in `cwd` (where its `runs/` folder lands);
    `env`: variables to set beside the tests' own."""
    return subprocess.run(
        [sys.executable, str(REPO / script), *args],
        cwd=cwd,
        env=script_env(env),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Sets `sys.argv` and runs the file as `__main__` for each input, catching its exit status and stderr.
MAIN_WITH_EACH = r"""
import contextlib, io, json, os, resource, runpy, signal, sys, traceback
script, inputs = sys.argv[1], json.loads(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))  # as `python script.py` puts it first: crossq_utils.py is found there
sys.path.append(os.path.join(os.path.dirname(script), "tests"))  # --env-id broken_envs:... (where tests/ is)
# Should a refusal regress, the run would try to take terabytes or train for hours: let it fail
# inside 8 GiB and 120 s instead of taking the memory and time of the machine the tests share.
resource.setrlimit(resource.RLIMIT_AS, (8 << 30, 8 << 30))
def not_refused(signum, frame):
    raise TimeoutError("still running after 120 s: the run was not refused")
signal.signal(signal.SIGALRM, not_refused)
results = {}
for name, argv in inputs.items():
    before, stderr = set(os.listdir(".")), io.StringIO()
    sys.argv = [script, *argv]
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        try:
            signal.alarm(120)
            runpy.run_path(script, run_name="__main__")
            status = 0
        except SystemExit as e:
            status = e.code
        except BaseException:
            traceback.print_exc()
            status = "uncaught exception"
        signal.alarm(0)
    results[name] = {"status": status, "stderr": stderr.getvalue(), "new": sorted(set(os.listdir(".")) - before)}
print(json.dumps(results))
"""


def run_main_with_each(script: str, inputs: dict[str, list[str]], cwd: Path, timeout: float = 1200) -> dict:
    """Each command line of `inputs` given to `script` as `python script.py ...` would, all in one Python
    process (the imports are paid once): {input id: {"status": exit status, "stderr": ..., "new": files
    it left in `cwd`}}. For the refusals, which must exit before any compute."""
    process = subprocess.run(
        [sys.executable, "-c", MAIN_WITH_EACH, str(REPO / script), json.dumps(inputs)],
        cwd=cwd,
        env=script_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    return json.loads(process.stdout.splitlines()[-1])


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

    def run(script: str, *flags: str, timeout: float = 600, env: dict | None = None) -> dict[str, list]:
        cwd = tmp_path_factory.mktemp("run")
        result = run_script(script, *flags, cwd=cwd, timeout=timeout, env=env)
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
gym.register("HugeRewardAfter100-v0", entry_point=lambda: BadRewardAfter(100, 1e30))  # for a checkpoint every step
# Finite in float64, inf in the float32 the replay buffer stores: the env's fault, not a diverged training.
gym.register("Float32OverflowAfter300-v0", entry_point=lambda: BadRewardAfter(300, 1e39))
