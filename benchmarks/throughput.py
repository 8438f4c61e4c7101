"""Throughput of the training scripts against the peer, sbx-rl (Stable-Baselines-Jax), at identical settings.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/throughput.py                                  # widths 256 and 2048, all scripts, with sbx
    python benchmarks/throughput.py --widths 256 --steps 300 --scripts crossq --no-peer

For every script (sac_jax.py once per preset) and every critic width, in one run:

1. The training loop, as users run it: the script itself in a subprocess (`python crossq_jax.py
   --critic-width W --learning-starts L --total-timesteps b --log-freq F --eval-freq 0 ...`). Its
   time per env step comes from the wall times of its TensorBoard `charts/SPS` events at env steps
   a = L + 2F, a + F, ..., b: sub-windows of F steps. The random-action phase and the compilations
   lie before a, the final evaluation after b. Each sub-window holds one logging step (F ~ steps / 10,
   where the scripts default to 1000): its cost, a few ms, is spread over F steps.
2. The peer: sbx's CrossQ (SAC, TD3) in this process with the same settings, its `learn()` timed by
   a callback over the same sub-windows; env.step, the action, host-side batch sampling and the
   jitted update are timed inside the same run. Ours and the peer's loops alternate (`--repeats`,
   default ours, sbx, ours, sbx); a row's figures are those of the median sub-window over its
   repeats, which keeps bursts of load from other processes out.
3. The parts of our step, in isolation, in this process, with the script's own functions
   (`make_env`, `explore`, `make_train_step`, ...) on the same settings, in rounds before and after
   the loops (medians): env.step; the exploration action (jitted call and transfer back); one env
   step's update with the actor never updated (the critic update) and with the actor updated after
   every critic update (the difference is the actor update); one env step's update as configured
   (`--utd`, `--policy-delay`). An update includes the separate jitted store where a script has one.
4. The two updates side by side: ours as configured and sbx's `train()` (host-side batch sampling
   and its jitted update), alternated call block by call block in this process: the least noisy
   comparison of the part that dominates a step on a CPU.

Times are wall-clock. The machine may be shared with other work: compare the rows of one run with
each other, not with another run's; the load average is printed at the start and the end.
"""

import argparse
import dataclasses
import gc
import importlib.util
import inspect
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
warnings.simplefilter("ignore")  # Hopper-v4's "out of date" notice and the like, in this process and the subprocesses
os.environ["PYTHONWARNINGS"] = "ignore"


@dataclasses.dataclass(frozen=True)
class Variant:
    script: str
    preset: str | None  # the preset word the script takes before its flags
    label: str
    peer: str | None  # "crossq", "sac" or "td3": the sbx class with the same settings
    peer_note: str = ""


VARIANTS = {
    "crossq": Variant("crossq_jax.py", None, "CrossQ (SAC base)", "crossq"),
    "crossq_td3": Variant(
        "crossq_td3_jax.py", None, "CrossQ (TD3 base)", "crossq", "sbx has no CrossQ-TD3: nearest peer, sbx CrossQ"
    ),
    "sac": Variant("sac_jax.py", None, "SAC", "sac"),
    "redq": Variant(
        "sac_jax.py", "redq", "REDQ (UTD 20)", None, "no sbx peer: sbx SAC has no random target-critic subset"
    ),
    "droq": Variant("sac_jax.py", "droq", "DroQ (UTD 20)", "sac", "sbx SAC with dropout and LayerNorm"),
    "td3": Variant("crossq_td3_jax.py", "td3", "TD3 baseline", "td3"),
}
DEFAULT_SCRIPTS = ["crossq", "crossq_td3", "sac", "redq", "droq"]


# MEASUREMENT WINDOW: env steps a..b cut into sub-windows at the script's logging steps
@dataclasses.dataclass(frozen=True)
class Window:
    learning_starts: int
    log_freq: int
    start: int  # env step a: the first learning steps (compilations included) lie before it
    end: int  # env step b

    @property
    def steps(self) -> int:
        return self.end - self.start

    @property
    def boundaries(self) -> list[int]:
        return list(range(self.start, self.end + 1, self.log_freq))


def make_window(learning_starts: int, steps: int) -> Window:
    """Log every F env steps, F the largest divisor of `learning_starts` up to steps / 10; two sub-windows
    after learning starts are left out, then about `steps` steps (a multiple of F) are measured."""
    log_freq = max(d for d in range(1, learning_starts + 1) if learning_starts % d == 0 and d <= max(1, steps // 10))
    start = learning_starts + 2 * log_freq
    return Window(learning_starts, log_freq, start, start + log_freq * max(1, math.ceil(steps / log_freq)))


def sub_window_seconds(times: list[float], window: Window) -> np.ndarray:
    """Seconds per env step in each sub-window, from the times at the window's boundaries."""
    return np.diff(np.asarray(times)) / window.log_freq


def median_index(values) -> int:
    return int(np.argsort(values)[len(values) // 2])


# ENVIRONMENT REPORT
def hardware() -> list[str]:
    import jax

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read().splitlines()
        cpu = next(line.split(":", 1)[1].strip() for line in info if line.startswith("model name"))
        flags = next(line.split(":", 1)[1].split() for line in info if line.startswith("flags"))
        notable = [flag for flag in ["avx2", "avx512f", "amx_tile"] if flag in flags]
        cpu += f" ({' '.join(notable)}{', virtual machine' if 'hypervisor' in flags else ''})"
    except (OSError, StopIteration):
        pass
    memory = ""
    try:
        with open("/proc/meminfo") as f:
            kib = int(next(line.split()[1] for line in f if line.startswith("MemTotal")))
        memory = f", {kib / 2**20:.1f} GiB RAM"
    except (OSError, StopIteration, ValueError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    lines = [
        f"hardware: {cpu}, {os.cpu_count()} logical cores ({usable} usable){memory}; {platform.system()} "
        f"{platform.release()}",
        f"jax {jax.__version__}, backend {jax.default_backend()} ({devices}); Python {platform.python_version()}",
        "packages: " + ", ".join(f"{name} {version(name)}" for name in PACKAGES),
        f"repository: {git_revision()}",
    ]
    return lines


PACKAGES = ["flax", "optax", "gymnasium", "mujoco", "sbx-rl", "stable_baselines3", "torch"]


def version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as get

    try:
        return get(package)
    except PackageNotFoundError:
        return "not installed"


def git_revision() -> str:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=REPO, capture_output=True, text=True)
    except OSError:
        return "unknown (no git)"
    dirty = " with uncommitted changes" if status.stdout.strip() else ""
    return f"commit {commit.stdout.strip() or 'unknown'}{dirty}"


def load_average() -> str:
    return " ".join(f"{x:.1f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


# OUR SCRIPTS: the training loop as a subprocess, the parts in this process
_modules: dict[str, object] = {}


def load_script(script: str):
    """Import a training script from its path (once): its functions are what the parts are timed with."""
    if script not in _modules:
        name = "bench_" + Path(script).stem
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        _modules[script] = module
    return _modules[script]


def parse_script_args(module, argv: list[str]):
    """The script's Args for this command line, through the script's own parser where it has one."""
    if hasattr(module, "parse_args"):
        return module.parse_args(list(argv))
    import tyro

    return tyro.cli(module.Args, args=list(argv))


def run_training_loop(variant: Variant, argv: list[str], window: Window, timeout: float) -> np.ndarray:
    """Seconds per env step of the script's own loop in each sub-window of env steps a..b (TensorBoard wall times)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="throughput-") as cwd:
        command = [sys.executable, str(REPO / variant.script), *argv]
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=timeout)
        if result.returncode != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise RuntimeError(f"exit code {result.returncode}: " + " | ".join(tail))
        run_dirs = sorted((Path(cwd) / "runs").iterdir())
        accumulator = EventAccumulator(str(run_dirs[-1]), size_guidance={"scalars": 0})
        accumulator.Reload()
        wall = {event.step: event.wall_time for event in accumulator.Scalars("charts/SPS")}
    missing = [step for step in window.boundaries if step not in wall]
    if missing:
        raise RuntimeError(f"no charts/SPS event at env step(s) {missing}")
    return sub_window_seconds([wall[step] for step in window.boundaries], window)


class Harness:
    """One script's agent, buffer, env and jitted functions, driven outside its training loop."""

    def __init__(self, module, args, fill: int):
        import jax
        import jax.numpy as jnp

        self.module, self.args = module, args
        self.env = module.make_env(args.env_id, args.seed)()
        self.obs, _ = self.env.reset(seed=args.seed)
        self.obs_dim, self.action_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        made = module.create_agent(args, self.obs_dim, self.action_dim, jax.random.PRNGKey(args.seed))
        # create_agent returns the agent (a NamedTuple), or (actor module, critic module, agent).
        if isinstance(made, tuple) and not hasattr(made, "_fields"):
            self.networks, self.agent = dict(zip(("actor", "critic"), made[:-1], strict=False)), made[-1]
        else:
            self.networks, self.agent = {}, made
        self.metrics = module.Metrics.initial()
        self.store = jax.jit(module.buffer_add, donate_argnums=0)
        self.explore = module.explore if hasattr(module, "explore") else module.make_policy(self.networks["actor"])[0]
        self.explore_takes_std = "std" in inspect.signature(self.explore).parameters
        self.keys = list(jax.random.split(jax.random.PRNGKey(args.seed + 1), 64))
        self.calls = 0

        # The buffer at the size the loop uses (its capacity matters), holding `fill` random transitions.
        rng = np.random.default_rng(args.seed)
        buffer = module.ReplayBuffer.create(args.buffer_size, self.obs_dim, self.action_dim)
        rows = {
            "obs": rng.normal(size=(fill, self.obs_dim)),
            "actions": rng.uniform(-1, 1, size=(fill, self.action_dim)),
            "rewards": rng.normal(size=fill),
            "next_obs": rng.normal(size=(fill, self.obs_dim)),
            "terminations": np.zeros(fill),
        }
        filled = {name: getattr(buffer, name).at[:fill].set(value.astype(np.float32)) for name, value in rows.items()}
        self.buffer = buffer._replace(**filled, position=jnp.int32(fill), size=jnp.int32(fill))
        f32 = np.float32
        self.transition = module.Transition(
            self.obs.astype(f32), np.zeros(self.action_dim, f32), f32(1.0), self.obs.astype(f32), f32(0.0)
        )
        self.actions = [self.env.action_space.sample() for _ in range(1000)]

    def make_train_step(self, **changes):
        """The script's jitted per-env-step update, built by the script for Args with `changes`."""
        args = dataclasses.replace(self.args, **changes)
        available = {"args": args, "action_dim": self.action_dim, **self.networks}
        names = inspect.signature(self.module.make_train_step).parameters
        return self.module.make_train_step(*(available[name] for name in names))

    def update_call(self, train_step) -> Callable[[], None]:
        """One env step's update as the loop makes it: the jitted store where the script has a separate
        one, then the train step; blocks until the results are there, as the loop's next action does."""
        import jax

        names = list(inspect.signature(train_step).parameters)
        writes_buffer = "transition" in names

        def call() -> None:
            if not writes_buffer:
                self.buffer = self.store(self.buffer, self.transition)
            self.calls += 1
            values = {
                "agent": self.agent,
                "buffer": self.buffer,
                "transition": self.transition,
                "metrics": self.metrics,
                "key": self.keys[self.calls % len(self.keys)],
                "step": self.calls,
            }
            out = train_step(*(values[name] for name in names))
            if writes_buffer:
                self.agent, self.buffer, self.metrics = out
            else:
                self.agent, self.metrics = out
            jax.block_until_ready((self.agent, self.metrics))

        return call

    def example_arguments(self, train_step) -> list:
        values = {
            "agent": self.agent,
            "buffer": self.buffer,
            "transition": self.transition,
            "metrics": self.metrics,
            "key": self.keys[0],
            "step": 1,
        }
        return [values[name] for name in inspect.signature(train_step).parameters]

    def action_call(self) -> None:
        obs = self.obs[None].astype(np.float32)
        extra = (self.args.exploration_noise,) if self.explore_takes_std else ()
        action, self.keys[0] = self.explore(self.agent.actor, obs, self.keys[0], *extra)
        np.asarray(action)[0]

    def env_steps(self, n: int) -> float:
        """Mean seconds of env.step over n calls (resets on episode end happen outside the clock)."""
        total = 0.0
        for i in range(n):
            action = self.actions[i % len(self.actions)]
            start = time.perf_counter()
            obs, _, terminated, truncated, _ = self.env.step(action)
            total += time.perf_counter() - start
            self.obs = obs
            if terminated or truncated:
                self.obs, _ = self.env.reset()
        return total / n

    def key_split(self, n: int) -> float:
        """The loop's host-side `key, update_key = jax.random.split(key)`: its eager dispatches."""
        import jax

        key = self.keys[1]
        start = time.perf_counter()
        for _ in range(n):
            key, _ = jax.random.split(key)
        jax.block_until_ready(key)
        return (time.perf_counter() - start) / n


def mean_seconds(call: Callable[[], None], n: int) -> float:
    start = time.perf_counter()
    for _ in range(n):
        call()
    return (time.perf_counter() - start) / n


def calls_for(seconds_per_call: float, budget: float, least: int, multiple: int = 1) -> int:
    n = int(min(max(budget / max(seconds_per_call, 1e-6), least), 5000))
    return multiple * math.ceil(n / multiple)


def copies_of_buffer(harness: Harness, train_step) -> tuple[int, float]:
    """Whole replay-buffer arrays that the compiled update copies at every call: (count, MB per call)."""
    text = train_step.lower(*harness.example_arguments(train_step)).compile().as_text()
    capacity = harness.args.buffer_size
    sizes = {"f32": 4, "s32": 4, "f64": 8, "f16": 2, "bf16": 2}
    found = re.findall(rf"= (\w+)\[({capacity}(?:,\d+)*)\]\S* copy\(", text)
    megabytes = sum(sizes.get(dtype, 4) * math.prod(int(d) for d in dims.split(",")) for dtype, dims in found) / 1e6
    return len(found), megabytes


@dataclasses.dataclass
class Parts:
    env: float  # env.step
    action: float  # jitted exploration call and the action's transfer to numpy
    critic: float  # one env step's update at UTD 1 with the actor never updated
    critic_and_actor: float  # the same with the actor updated after every critic update
    configured: float  # one env step's update as configured: utd critic updates, actor every policy_delay-th
    key_split: float  # the loop's eager key split
    buffer_copies: int
    copied_mb: float

    @property
    def actor(self) -> float:
        return max(self.critic_and_actor - self.critic, 0.0)


class PartTimer:
    """Times the parts of one of our env steps in rounds; `result()` gives the medians over the rounds."""

    def __init__(self, harness: Harness, budget: float):
        self.harness = harness
        args = harness.args
        self.critic_step = harness.update_call(harness.make_train_step(utd=1, policy_delay=10**9))
        self.both_step = harness.update_call(harness.make_train_step(utd=1, policy_delay=1))
        configured = harness.make_train_step()
        self.configured_step = harness.update_call(configured)
        self.cycle = args.policy_delay // math.gcd(
            args.policy_delay, args.utd
        )  # calls until the actor schedule repeats

        # Compile and warm up; size each part's sample for about `budget` seconds per round.
        harness.env_steps(20)
        self.sizes = {"env": calls_for(harness.env_steps(50), budget, 100)}
        for name, call, multiple in [
            ("action", harness.action_call, 1),
            ("critic", self.critic_step, 1),
            ("critic_and_actor", self.both_step, 1),
            ("configured", self.configured_step, self.cycle),
        ]:
            for _ in range(2 * multiple):
                call()
            least = 100 if name == "action" else 3
            self.sizes[name] = calls_for(mean_seconds(call, multiple), budget, least, multiple)
        self.copies, self.copied_mb = copies_of_buffer(harness, configured)
        self.samples: dict[str, list[float]] = {name: [] for name in [*self.sizes, "key_split"]}

    def round(self) -> None:
        h, samples, sizes = self.harness, self.samples, self.sizes
        samples["env"].append(h.env_steps(sizes["env"]))
        samples["action"].append(mean_seconds(h.action_call, sizes["action"]))
        samples["critic"].append(mean_seconds(self.critic_step, sizes["critic"]))
        samples["critic_and_actor"].append(mean_seconds(self.both_step, sizes["critic_and_actor"]))
        samples["configured"].append(mean_seconds(self.configured_step, sizes["configured"]))
        samples["key_split"].append(h.key_split(200))

    def result(self) -> Parts:
        median = {name: float(np.median(values)) for name, values in self.samples.items()}
        return Parts(**median, buffer_copies=self.copies, copied_mb=self.copied_mb)


# THE PEER: sbx in this process, timed inside its own learn()
PEER_CLASSES = {"crossq": "CrossQ", "sac": "SAC", "td3": "TD3"}


def peer_settings(kind: str, args, critic_width: int, window: Window) -> dict:
    """sbx's constructor arguments for the same settings as `args` (sbx's own defaults differ: lr, b1, widths)."""
    settings = {
        "learning_starts": window.learning_starts,
        "batch_size": args.batch_size,
        "buffer_size": args.buffer_size,
        "learning_rate": args.learning_rate,
        "gamma": args.gamma,
        "train_freq": 1,
        "gradient_steps": args.utd,
        "policy_delay": args.policy_delay,
        "seed": args.seed,
        "verbose": 0,
    }
    policy = {
        "net_arch": {"pi": [args.actor_width] * 2, "qf": [critic_width] * 2},
        "n_critics": args.n_critics,
        "optimizer_kwargs": {"b1": args.adam_b1},
    }
    if kind == "crossq":
        policy |= {"batch_norm_momentum": args.bn_momentum, "renorm_warmup_steps": args.bn_warmup_steps}
    elif kind == "sac":
        policy |= {"dropout_rate": args.dropout_rate, "layer_norm": args.layer_norm}
        settings["tau"] = args.tau
    elif kind == "td3":
        settings |= {"tau": args.tau, "target_policy_noise": args.policy_noise, "target_noise_clip": args.noise_clip}
        settings["exploration_noise"] = args.exploration_noise  # becomes a NormalActionNoise
    return settings | {"policy_kwargs": policy}


PEER_PARTS = ["step", "env", "action", "update", "host_batch"]


def run_peer(kind: str, env_id: str, settings: dict, window: Window):
    """sbx's learn() over env steps 0..b: per sub-window of a..b, the seconds per env step of the whole
    step and of its parts ({name: array}); and the trained model."""
    import gymnasium as gym
    import jax
    import sbx
    from stable_baselines3.common.callbacks import BaseCallback

    settings = dict(settings)
    if "exploration_noise" in settings:
        from stable_baselines3.common.noise import NormalActionNoise

        n, std = model_action_dim(env_id), settings.pop("exploration_noise")
        settings["action_noise"] = NormalActionNoise(np.zeros(n), np.full(n, std))
    gym.logger.min_level = gym.logger.ERROR  # Hopper-v4's "out of date" notice
    model = getattr(sbx, PEER_CLASSES[kind])("MlpPolicy", env_id, **settings)

    n_sub = len(window.boundaries) - 1
    spent = {name: np.zeros(n_sub) for name in ["env", "action", "train", "update"]}
    marks: list[float] = []  # the times of the sub-window boundaries passed so far

    def timed(name: str, function: Callable, block: bool = False) -> Callable:
        def wrapper(*a, **k):
            start = time.perf_counter()
            out = function(*a, **k)
            if block:
                jax.block_until_ready(out)
            if 0 < len(marks) <= n_sub:
                spent[name][len(marks) - 1] += time.perf_counter() - start
            return out

        return wrapper

    monitor = model.env.envs[0]
    monitor.step = timed("env", monitor.step)
    model.predict = timed("action", model.predict)
    model.train = timed("train", model.train)  # host-side batch sampling and conversion, then _train
    model._train = timed("update", model._train, block=True)  # the jitted update (all gradient steps)
    boundaries = set(window.boundaries)

    class Clock(BaseCallback):
        """Called after every env step (and before that step's update)."""

        def _on_step(self) -> bool:
            if self.num_timesteps in boundaries:
                marks.append(time.perf_counter())
            return True

    model.learn(window.end, callback=Clock())
    f = window.log_freq
    parts = {
        "step": sub_window_seconds(marks, window),
        "env": spent["env"] / f,
        "action": spent["action"] / f,
        "update": spent["update"] / f,
        "host_batch": (spent["train"] - spent["update"]) / f,
    }
    return parts, model


def model_action_dim(env_id: str) -> int:
    import gymnasium as gym

    env = gym.make(env_id)
    n = env.action_space.shape[0]
    env.close()
    return n


# THE RUN
@dataclasses.dataclass
class Row:
    name: str  # variant name
    impl: str  # "crossq_jax.py" or "sbx CrossQ"
    width: int
    utd: int
    window: Window
    policy_delay: int = 1
    step: float | None = None  # seconds per env step in the loop
    env: float | None = None
    action: float | None = None
    update: float | None = None
    host_batch: float = 0.0
    parts: Parts | None = None
    error: str | None = None
    peer: "Row | None" = None
    peer_reused: bool = False  # the peer row was measured for another script (crossq_td3 takes crossq's)
    updates_side_by_side: tuple[float, float] | None = None  # (ours, sbx train()) seconds, alternated

    @property
    def other(self) -> float:
        return self.step - self.env - self.action - self.update - self.host_batch

    @property
    def sum_of_parts(self) -> float:
        p = self.parts
        return p.env + p.action + self.utd * p.critic + self.utd / self.policy_delay * p.actor


_peer_cache: dict[tuple, Row] = {}


def measure(name: str, width: int, steps: int, options) -> Row:
    """Our loop and the peer's, alternated `options.repeats` times, with our parts timed around them."""
    variant = VARIANTS[name]
    module = load_script(variant.script)
    preset = [variant.preset] if variant.preset else []
    window = make_window(options.learning_starts, max(10, steps // parse_script_args(module, preset).utd))
    argv = [*preset, "--env-id", options.env_id, "--seed", "1", "--critic-width", str(width)]
    argv += ["--actor-width", str(options.actor_width), "--batch-size", str(options.batch_size)]
    argv += ["--buffer-size", str(options.buffer_size), "--learning-starts", str(options.learning_starts)]
    argv += ["--total-timesteps", str(window.end), "--log-freq", str(window.log_freq)]
    argv += ["--eval-freq", "0", "--eval-episodes", "1"]
    args = parse_script_args(module, argv)
    row = Row(name, variant.script, width, args.utd, window, args.policy_delay)
    log(f"[width {width}] {name}: python {variant.script} {' '.join(argv)}")
    log(
        f"    steady state: env steps {window.start}..{window.end} in sub-windows of {window.log_freq}, "
        f"{options.repeats} runs; parts timed in this process before and after"
    )

    peer, settings, cache_key = None, None, None
    if variant.peer and not options.no_peer:
        settings = peer_settings(variant.peer, args, width, window)
        cache_key = (variant.peer, options.env_id, repr(settings))
        if cache_key in _peer_cache:
            row.peer, row.peer_reused = _peer_cache[cache_key], True
            log(f"    peer: the sbx {PEER_CLASSES[variant.peer]} row measured above ({variant.peer_note})")
        else:
            peer = Row(name, f"sbx {PEER_CLASSES[variant.peer]}", width, args.utd, window, args.policy_delay)
    ours_seconds, peer_parts, model = [], {key: [] for key in PEER_PARTS}, None
    try:
        harness = Harness(module, args, fill=options.learning_starts)
        timer = PartTimer(harness, options.part_seconds)
        for _ in range(options.rounds // 2):
            timer.round()
        for repeat in range(options.repeats):
            started = time.perf_counter()
            seconds = run_training_loop(variant, argv, window, options.timeout)
            ours_seconds.extend(seconds)
            log(
                f"    run {repeat + 1}: {variant.script} {1 / np.median(seconds):.1f} env steps/s "
                f"({time.perf_counter() - started:.0f} s)"
            )
            if peer is not None and peer.error is None:
                try:
                    started, model = time.perf_counter(), None
                    parts, model = run_peer(variant.peer, options.env_id, settings, window)
                    for key in PEER_PARTS:
                        peer_parts[key].extend(parts[key])
                    log(
                        f"    run {repeat + 1}: {peer.impl} {1 / np.median(parts['step']):.1f} env steps/s "
                        f"({time.perf_counter() - started:.0f} s, sbx-rl {version('sbx-rl')})"
                    )
                except Exception as e:
                    peer.error = f"{type(e).__name__}: {e}"
                    log(f"    {peer.impl} FAILED: {peer.error}")
        for _ in range(options.rounds - options.rounds // 2):
            timer.round()
        row.parts = timer.result()
        row.step = float(np.median(ours_seconds))
        row.env, row.action, row.update = row.parts.env, row.parts.action, row.parts.configured
        if model is not None:
            row.updates_side_by_side = side_by_side(timer, model, args, options)
    except Exception as e:  # a script that is broken or mid-edit: report it, measure the rest
        row.error = f"{type(e).__name__}: {e}"
        log(f"    FAILED: {row.error}")
    if peer is not None:
        if peer_parts["step"]:
            k = median_index(peer_parts["step"])  # the median sub-window, with its own split
            peer.step, peer.env, peer.action = peer_parts["step"][k], peer_parts["env"][k], peer_parts["action"][k]
            peer.update, peer.host_batch = peer_parts["update"][k], peer_parts["host_batch"][k]
        elif peer.error is None:
            peer.error = "not measured"
        row.peer = _peer_cache[cache_key] = peer
    del model
    gc.collect()
    return row


def side_by_side(timer: PartTimer, model, args, options) -> tuple[float, float]:
    """Median seconds of our configured update and of sbx's train() (host-side sampling, then its jitted
    update; same UTD), call blocks alternated in this process."""

    def peer_update() -> None:
        model.train(gradient_steps=args.utd, batch_size=args.batch_size)

    for _ in range(2 * timer.cycle):
        peer_update()
    n_peer = calls_for(mean_seconds(peer_update, timer.cycle), options.part_seconds, 3, timer.cycle)
    ours, theirs = [], []
    for _ in range(options.rounds):
        ours.append(mean_seconds(timer.configured_step, timer.sizes["configured"]))
        theirs.append(mean_seconds(peer_update, n_peer))
    return float(np.median(ours)), float(np.median(theirs))


def log(message: str) -> None:
    print(message, flush=True)


def ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{seconds * 1e3:.2f}"


def report(rows: list[Row], options) -> None:
    header = (
        f"{'script':<11} {'implementation':<18} {'env st/s':>8} {'upd/s':>7} {'step ms':>8} | {'env.step':>8} "
        f"{'action':>7} {'update':>8} {'batch':>6} {'other':>7} | {'update%':>7} {'ours/peer':>9}"
    )
    for width in sorted({row.width for row in rows}):
        log("")
        log(f"critic width {width} (actor {options.actor_width}), ms per env step in the steady state.")
        log("update: the jitted update(s) of one env step; batch: sbx's host-side replay sampling; other: the rest")
        log("of the loop (Python, transfers, logging). Ours: loop step from the training run, parts timed in")
        log("isolation; sbx: all from inside its run. ours/peer: env steps per second, ours over sbx's.")
        log(header)
        log("-" * len(header))
        for row in (r for r in rows if r.width == width):
            log(table_line(row, row, is_peer=False))
            if row.peer:
                log(table_line(row.peer, row, is_peer=True))
        log("")
        log("our step against the sum of its parts measured in isolation; diagnostics:")
        for row in (r for r in rows if r.width == width and r.parts and r.step):
            p = row.parts
            pieces = f"env.step {ms(p.env)} + action {ms(p.action)} + {row.utd} x critic {ms(p.critic)}"
            pieces += f" + {row.utd}/{row.policy_delay} x actor {ms(p.actor)}"
            log(
                f"  {row.name:<11} step {ms(row.step)} ms = {row.step / row.sum_of_parts:.2f} x sum of parts "
                f"({pieces} = {ms(row.sum_of_parts)} ms)"
            )
            extra = f"host-side key split {ms(p.key_split)} ms per step"
            if p.buffer_copies:
                extra += f"; the compiled update copies {p.buffer_copies} whole replay-buffer arrays "
                extra += f"({p.copied_mb:.0f} MB) per env step"
            else:
                extra += "; no whole-buffer copies in the compiled update"
            log(f"  {'':<11} {extra}")
        pairs = [r for r in rows if r.width == width and r.updates_side_by_side]
        if pairs:
            log("updates side by side in this process (alternated blocks of calls; sbx: train() = host-side")
            log("sampling + jitted update):")
        for row in pairs:
            ours, theirs = row.updates_side_by_side
            log(
                f"  {row.name:<11} ours {ms(ours)} ms, {row.peer.impl} {ms(theirs)} ms per env step: "
                f"ours takes {ours / theirs:.2f} x sbx's time"
            )
        if any(r.step and r.parts and r.other < 0 for r in rows if r.width == width):
            log("(a negative 'other' means the isolated parts were timed under more load than the loop: noise)")
    targets(rows, options)
    markdown(rows, options)


def table_line(row: Row, ours: Row, is_peer: bool) -> str:
    name = "" if is_peer else row.name
    if row.error or row.step is None:
        return f"{name:<11} {row.impl:<18} failed: {row.error}"
    ratio = ""
    if not is_peer and row.peer and row.peer.step:
        ratio = f"{row.peer.step / row.step:.2f}x"
    elif not is_peer and VARIANTS[row.name].peer is None:
        ratio = "no peer"
    line = (
        f"{name:<11} {row.impl:<18} {1 / row.step:>8.1f} {row.utd / row.step:>7.1f} {ms(row.step):>8} | "
        f"{ms(row.env):>8} {ms(row.action):>7} {ms(row.update):>8} {ms(row.host_batch):>6} {ms(row.other):>7} | "
        f"{row.update / row.step:>7.0%} {ratio:>9}"
    )
    note = VARIANTS[ours.name].peer_note if is_peer else ""
    if is_peer and ours.peer_reused:
        note = f"{note}; the row above, not re-run" if note else "the row above, not re-run"
    if not is_peer and VARIANTS[row.name].peer is None and VARIANTS[row.name].peer_note:
        note = VARIANTS[row.name].peer_note
    return f"{line}  ({note})" if note else line


def targets(rows: list[Row], options) -> None:
    log("")
    log("Targets (issue 6), crossq_jax.py:")
    for row in (r for r in rows if r.name == "crossq"):
        if not row.step or not row.parts:
            log(f"  width {row.width}: not measured ({row.error})")
            continue
        ratio = row.step / row.sum_of_parts
        verdict = "met" if ratio <= 1.10 else "NOT met"
        log(f"  width {row.width}: step time {ratio:.2f} x the sum of its parts (target <= 1.10): {verdict}")
        if row.peer and row.peer.step:
            goal = 1.1 if row.width <= 256 else 1.0
            speed = row.peer.step / row.step
            verdict = "met" if speed >= goal else "NOT met"
            log(f"  width {row.width}: {speed:.2f} x sbx CrossQ's env steps/s (target >= {goal}): {verdict}")
            side = ""
            if row.updates_side_by_side:
                ours, theirs = row.updates_side_by_side
                side = f"; side by side, our update takes {ours / theirs:.2f} x the time of sbx's train()"
            log(
                f"  {'':<{len(f'width {row.width}')}}  jitted update: {row.update / row.step:.0%} of our step, "
                f"{row.peer.update / row.peer.step:.0%} of sbx's{side}"
            )
    utd_rows = [r for r in rows if r.utd > 1 and r.parts and r.step]
    if utd_rows:
        log("UTD > 1 (sac_jax.py presets): time per critic update inside the one jitted call per env step,")
        log("against the same update made one call at a time (UTD 1, actor share included); the loop's time")
        log("outside the update per env step (one Python iteration whatever the UTD):")
    for row in utd_rows:
        p = row.parts
        inside = p.configured / row.utd
        alone = p.critic + p.actor / row.policy_delay
        log(
            f"  {row.name} width {row.width}: {ms(inside)} ms per update in the UTD-{row.utd} call, {ms(alone)} ms "
            f"one call each ({inside / alone:.2f}x); outside the update {ms(row.step - row.update)} ms per env step"
        )
    if options.no_peer:
        log("(peer skipped: --no-peer)")


def markdown(rows: list[Row], options) -> None:
    log("")
    log("Markdown (README):")
    log("")
    log(
        "| script | critic width | implementation | env steps/s | updates/s | env.step | action | jitted update "
        "| other | update share | env steps/s ours/peer |"
    )
    log("|---|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        for r in [row, row.peer] if row.peer else [row]:
            if not r.step:
                log(f"| {row.name} | {r.width} | {r.impl} | failed | | | | | | | |")
                continue
            ratio = f"{row.peer.step / row.step:.2f}x" if r is row and row.peer and row.peer.step else ""
            log(
                f"| {row.name} | {r.width} | {r.impl} | {1 / r.step:.1f} | {r.utd / r.step:.1f} | {ms(r.env)} ms "
                f"| {ms(r.action)} ms | {ms(r.update)} ms | {ms(r.other + r.host_batch)} ms | {r.update / r.step:.0%} "
                f"| {ratio} |"
            )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 2048], help="critic widths (default 256 2048)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=[500, 100],
        help="steady-state env steps per run and width: one value for all widths or one per width (default\n"
        "500 100); a UTD-k preset runs steps / k env steps (as many critic updates)",
    )
    parser.add_argument(
        "--repeats", type=int, default=2, help="runs of each loop, ours and sbx's alternated (default 2)"
    )
    parser.add_argument(
        "--scripts",
        nargs="+",
        default=DEFAULT_SCRIPTS,
        choices=list(VARIANTS),
        help=f"what to time (default {' '.join(DEFAULT_SCRIPTS)}; also td3: crossq_td3_jax.py's TD3 baseline)",
    )
    parser.add_argument("--no-peer", action="store_true", help="skip sbx (no need to install it)")
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--learning-starts", type=int, default=1000, help="random-action env steps (default 1000)")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--actor-width", type=int, default=256)
    parser.add_argument("--buffer-size", type=int, default=1_000_000)
    parser.add_argument(
        "--max-utd-width", type=int, default=256, help="widths above this skip the UTD-20 presets (default 256)"
    )
    parser.add_argument("--rounds", type=int, default=6, help="rounds of part timings (default 6)")
    parser.add_argument("--part-seconds", type=float, default=0.4, help="about this long per part per round")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to one training subprocess")
    options = parser.parse_args()
    steps = options.steps * len(options.widths) if len(options.steps) == 1 else options.steps
    if len(steps) != len(options.widths):
        parser.error("--steps takes one value, or one per width")
    if not options.no_peer:
        try:
            import sbx  # noqa: F401
        except ImportError:
            parser.error("the peer needs sbx-rl: pip install -r benchmarks/requirements.txt (or pass --no-peer)")

    log("Throughput benchmark: our training scripts against sbx-rl at identical settings")
    log(f"command: python benchmarks/throughput.py {' '.join(sys.argv[1:])}".rstrip())
    for line in hardware():
        log(line)
    log(f"load average at start: {load_average()} (1, 5, 15 min)")
    log(
        f"settings: {options.env_id}, batch {options.batch_size}, actor width {options.actor_width}, replay buffer "
        f"{options.buffer_size}, learning_starts {options.learning_starts} (the scripts' default is 5000), seed 1; "
        "each script's own defaults otherwise (sbx given the same values)"
    )
    log("")
    started = time.perf_counter()
    rows = []
    for width, n_steps in zip(options.widths, steps, strict=True):
        for name in options.scripts:
            variant = VARIANTS[name]
            if not (REPO / variant.script).exists():
                log(f"[width {width}] {name}: skipped, {variant.script} does not exist yet")
                continue
            module = load_script(variant.script)
            utd = parse_script_args(module, [variant.preset] if variant.preset else []).utd
            if utd > 1 and width > options.max_utd_width:
                log(f"[width {width}] {name}: skipped, UTD {utd} above --max-utd-width {options.max_utd_width}")
                continue
            rows.append(measure(name, width, n_steps, options))
    report(rows, options)
    log("")
    log(f"load average at end: {load_average()}; total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
