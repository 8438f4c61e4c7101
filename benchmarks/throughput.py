"""Throughput of the training scripts against sbx-rl (Stable-Baselines-Jax) at identical settings.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/throughput.py                       # widths 256 and 2048, all scripts, with sbx
    python benchmarks/throughput.py --widths 256 --steps 300 --scripts crossq --no-peer
    python benchmarks/throughput.py --widths 256 --baseline ../before   # before/after: a worktree at an older commit

For every script (sac_jax.py once per preset) and critic width: (1) our loop as users run it, the script in
a subprocess, timed from the wall times of its TensorBoard `charts/SPS` events over sub-windows of env steps
after learning starts (the compilations before them, the final evaluation after); (2) sbx's CrossQ, SAC or
TD3 `learn()` at the same settings in this process, timed by a callback over the same sub-windows, with
nothing added to its loop that waits for the device; (1) and (2) alternate `--repeats` times; (3) the parts
of one of our env steps timed in isolation, half of the rounds before the loops and half after, with the
script's own functions on the same Args. Every figure is a median, over the sub-windows of all repeats or
over the rounds. Times are wall-clock: on a shared machine compare the rows of one run with each other.
"""

import argparse
import dataclasses
import gc
import importlib.util
import inspect
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path
from typing import NamedTuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]
warnings.simplefilter("ignore")  # Hopper-v4's "out of date" notice and the like, here and in the subprocesses
os.environ["PYTHONWARNINGS"] = "ignore"
ROUNDS, PART_SECONDS, TIMEOUT = 6, 0.3, 1800  # rounds of part timings, seconds per part and round, per run


class Variant(NamedTuple):
    script: str
    words: list[str]  # the preset word the script takes before its flags, if any
    peer: str | None  # the sbx class run at the same settings
    note: str = ""


VARIANTS = {
    "crossq": Variant("crossq_jax.py", [], "CrossQ"),
    "crossq_td3": Variant("crossq_td3_jax.py", [], "CrossQ", "vs sbx CrossQ: sbx has no CrossQ-TD3"),
    "sac": Variant("sac_jax.py", [], "SAC"),
    "redq": Variant("sac_jax.py", ["redq"], None, "no peer: sbx SAC has no random target-critic subset"),
    "droq": Variant("sac_jax.py", ["droq"], "SAC", "vs sbx SAC with dropout and LayerNorm"),
    "td3": Variant("crossq_td3_jax.py", ["td3"], "TD3"),
}
DEFAULT_SCRIPTS = ["crossq", "crossq_td3", "sac", "redq", "droq"]


def window(learning_starts: int, steps: int) -> list[int]:
    """The env steps a, a + F, ..., b that bound the sub-windows: F (the log frequency) the largest divisor of
    `learning_starts` up to steps / 10, the first two sub-windows after learning starts left out (compiling)."""
    log_freq = max(d for d in range(1, max(1, steps // 10) + 1) if learning_starts % d == 0)
    start = learning_starts + 2 * log_freq
    return list(range(start, start + log_freq * math.ceil(steps / log_freq) + 1, log_freq))


def load_script(script: str):
    """Import a training script by its path (once): the parts are timed with its own functions."""
    name = "bench_" + Path(script).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, REPO / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def run_ours(script: str, argv: list[str], bounds: list[int], repo: Path = REPO) -> np.ndarray:
    """Seconds per env step of the script's own loop in each sub-window (its charts/SPS event wall times);
    `repo`: the checkout whose copy of the script runs (this one, or --baseline's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="throughput-") as cwd:
        command = [sys.executable, str(repo / script), *argv]
        result = subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT)
        if result.returncode != 0:
            tail = (result.stderr.strip() or result.stdout.strip()).splitlines()[-3:]
            raise RuntimeError(f"{script} exited with {result.returncode}: " + " | ".join(tail))
        events = EventAccumulator(str(next((Path(cwd) / "runs").iterdir())), size_guidance={"scalars": 0})
        events.Reload()
        wall = {event.step: event.wall_time for event in events.Scalars("charts/SPS")}
    return np.diff([wall[step] for step in bounds]) / np.diff(bounds)


def mean_seconds(call: Callable[[], None], multiple: int, budget: float = PART_SECONDS) -> float:
    """Mean seconds per call over blocks of `multiple` calls (at least 3), for about `budget` seconds."""
    n, start = 0, time.perf_counter()
    while (elapsed := time.perf_counter() - start) < budget or n < 3 * multiple:
        for _ in range(multiple):
            call()
        n += multiple
    return elapsed / n


class Parts:
    """One of our env steps taken apart: the script's env, agent, buffer and jitted functions driven outside its
    loop, each part timed in rounds of about PART_SECONDS."""

    def __init__(self, module, args):
        import jax

        self.jax, self.i = jax, 0
        self.env = module.make_env(args.env_id, args.seed)()
        self.obs = self.env.reset(seed=args.seed)[0]
        obs_dim, action_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        self.agent = module.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(args.seed))
        self.metrics, self.key = module.Metrics.initial(), jax.random.PRNGKey(args.seed + 1)
        self.explore = module.explore
        self.noise = (args.exploration_noise,) if "std" in inspect.signature(module.explore).parameters else ()
        self.actions = [self.env.action_space.sample() for _ in range(1000)]
        # The buffer at the loop's capacity (it matters), holding `learning_starts` random transitions.
        self.store = jax.jit(module.buffer_add, donate_argnums=0)
        self.buffer = module.ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
        rng, f32 = np.random.default_rng(args.seed), np.float32
        for _ in range(args.learning_starts + 1):
            obs, next_obs = rng.normal(size=(2, obs_dim)).astype(f32)
            action = rng.uniform(-1, 1, action_dim).astype(f32)
            self.transition = module.Transition(obs, action, f32(rng.normal()), next_obs, f32(0.0))
            self.buffer = self.store(self.buffer, self.transition)

        def update(**changes) -> Callable[[], None]:
            changed = dataclasses.replace(args, **changes)
            takes_action_dim = "action_dim" in inspect.signature(module.make_train_step).parameters
            train_step = module.make_train_step(changed, *([action_dim] if takes_action_dim else []))
            return lambda: self.update(train_step)

        cycle = args.policy_delay // math.gcd(args.policy_delay, args.utd)  # calls until the actor schedule repeats
        self.calls = {  # name: (call, timed in blocks of this many calls)
            "action": (self.action, 1),
            "critic": (update(utd=1, policy_delay=10**9), 1),  # the actor is never updated
            "critic+actor": (update(utd=1, policy_delay=1), 1),  # the actor after every critic update
            "update": (update(), cycle),  # as configured
        }
        for call, multiple in self.calls.values():  # compile and warm up
            mean_seconds(call, multiple, budget=0)
        self.samples = {name: [] for name in ["env.step", *self.calls]}

    def env_seconds(self, n: int = 2000) -> float:
        """Mean seconds of env.step (an episode's reset lies outside the clock, in sbx's timing too)."""
        total = 0.0
        for _ in range(n):
            self.i += 1
            start = time.perf_counter()
            obs, _, terminated, truncated, _ = self.env.step(self.actions[self.i % len(self.actions)])
            total += time.perf_counter() - start
            self.obs = self.env.reset()[0] if terminated or truncated else obs
        return total / n

    def action(self) -> None:
        action, self.key = self.explore(self.agent.actor, self.obs[None].astype(np.float32), self.key, *self.noise)
        np.asarray(action)[0]

    def update(self, train_step) -> None:
        """One env step's learning as the loop does it: store, split the key, the jitted train step."""
        self.buffer = self.store(self.buffer, self.transition)
        self.key, update_key = self.jax.random.split(self.key)
        self.i += 1
        self.agent, self.metrics = train_step(self.agent, self.buffer, self.metrics, update_key, self.i)
        self.jax.block_until_ready((self.agent, self.metrics))

    def round(self) -> None:
        self.samples["env.step"].append(self.env_seconds())
        for name, (call, multiple) in self.calls.items():
            self.samples[name].append(mean_seconds(call, multiple))

    def medians(self) -> dict[str, float]:
        m = {name: float(np.median(values)) for name, values in self.samples.items()}
        return m | {"actor": max(m.pop("critic+actor") - m["critic"], 0.0)}


def peer_settings(peer: str, args, learning_starts: int) -> dict:
    """sbx's constructor arguments for the settings of `args` (sbx's own defaults differ: lr, b1, widths)."""
    settings = {"learning_starts": learning_starts, "batch_size": args.batch_size, "buffer_size": args.buffer_size}
    settings |= {"learning_rate": args.learning_rate, "gamma": args.gamma, "train_freq": 1, "gradient_steps": args.utd}
    settings |= {"policy_delay": args.policy_delay, "seed": args.seed, "verbose": 0}
    policy = {"net_arch": {"pi": [args.actor_width] * 2, "qf": [args.critic_width] * 2}, "n_critics": args.n_critics}
    policy["optimizer_kwargs"] = {"b1": args.adam_b1}
    if peer == "CrossQ":
        policy |= {"batch_norm_momentum": args.bn_momentum, "renorm_warmup_steps": args.bn_warmup_steps}
    elif peer == "SAC":
        policy |= {"dropout_rate": args.dropout_rate, "layer_norm": args.layer_norm}
        settings["tau"] = args.tau
    elif peer == "TD3":
        settings |= {"tau": args.tau, "target_policy_noise": args.policy_noise, "target_noise_clip": args.noise_clip}
        settings["exploration_noise"] = args.exploration_noise  # becomes a NormalActionNoise
    return settings | {"policy_kwargs": policy}


def run_peer(peer: str, env_id: str, settings: dict, bounds: list[int]) -> dict[str, np.ndarray]:
    """sbx's learn() up to the last bound: per sub-window, seconds per env step of the step and of its parts."""
    import gymnasium as gym
    import sbx
    from stable_baselines3.common.callbacks import BaseCallback

    warnings.simplefilter("ignore")  # the imports above turn some warnings back on
    settings = dict(settings)
    if "exploration_noise" in settings:
        from stable_baselines3.common.noise import NormalActionNoise

        n, std = gym.make(env_id).action_space.shape[0], settings.pop("exploration_noise")
        settings["action_noise"] = NormalActionNoise(np.zeros(n), np.full(n, std))
    model = getattr(sbx, peer)("MlpPolicy", env_id, **settings)
    marks: list[float] = []  # the times at the bounds passed so far
    spent = {name: np.zeros(len(bounds) - 1) for name in ["env.step", "action", "update"]}

    def timed(name: str, function: Callable) -> Callable:
        def wrapper(*a, **k):  # reads the clock, never waits for the device
            start = time.perf_counter()
            out = function(*a, **k)
            if 0 < len(marks) < len(bounds):
                spent[name][len(marks) - 1] += time.perf_counter() - start
            return out

        return wrapper

    monitor = model.env.envs[0]
    monitor.step = timed("env.step", monitor.step)
    model.predict = timed("action", model.predict)
    model.train = timed("update", model.train)

    class Clock(BaseCallback):
        def _on_step(self) -> bool:  # after every env step, before that step's update
            if self.num_timesteps in bounds:
                marks.append(time.perf_counter())
            return True

    model.learn(bounds[-1], callback=Clock())
    return {"step": np.diff(marks) / np.diff(bounds)} | {k: v / np.diff(bounds) for k, v in spent.items()}


def measure(name: str, width: int, steps: int, options, peer_rows: dict) -> list[dict]:
    """Our row (and the peer's): the loops alternated `options.repeats` times, our parts timed around them."""
    variant = VARIANTS[name]
    module = load_script(variant.script)
    bounds = window(options.learning_starts, max(10, steps // module.parse_args(variant.words).utd))
    argv = [*variant.words, "--env-id", options.env_id, "--seed", "1", "--critic-width", str(width)]
    argv += ["--learning-starts", str(options.learning_starts), "--total-timesteps", str(bounds[-1])]
    argv += ["--log-freq", str(bounds[1] - bounds[0]), "--eval-freq", "0", "--eval-episodes", "1"]
    args = module.parse_args(argv)
    log(f"[width {width}] {name}: python {variant.script} {' '.join(argv)}; env steps {bounds[0]}..{bounds[-1]}")
    ours = {"script": name, "width": width, "impl": " ".join([variant.script, *variant.words]), "utd": args.utd}
    peer, reused, times = None, False, {"step": [], "env.step": [], "action": [], "update": []}
    if variant.peer and not options.no_peer:
        settings = peer_settings(variant.peer, args, options.learning_starts)
        key = (variant.peer, options.env_id, repr(settings))  # crossq_td3 gets the sbx CrossQ row of crossq
        reused, row = key in peer_rows, {"script": name, "width": width, "impl": f"sbx {variant.peer}", "utd": args.utd}
        peer = peer_rows.setdefault(key, row)
    baseline, baseline_loop = {"script": name, "width": width, "utd": args.utd}, []
    baseline["impl"] = f"{ours['impl']} at {commit_of(options.baseline)}" if options.baseline else ""
    try:
        parts, loop = Parts(module, args), []
        for _ in range(ROUNDS // 2):
            parts.round()
        for repeat in range(options.repeats):
            loop.extend(seconds := run_ours(variant.script, argv, bounds))
            log(f"    run {repeat + 1}: {ours['impl']} {1 / np.median(seconds):.1f} env steps/s")
            if options.baseline:
                baseline_loop.extend(seconds := run_ours(variant.script, argv, bounds, options.baseline))
                log(f"    run {repeat + 1}: {baseline['impl']} {1 / np.median(seconds):.1f} env steps/s")
            if peer is not None and not reused and "error" not in peer:
                try:
                    measured = run_peer(variant.peer, options.env_id, settings, bounds)
                    log(f"    run {repeat + 1}: {peer['impl']} {1 / np.median(measured['step']):.1f} env steps/s")
                    for part, seconds in measured.items():
                        times[part].extend(seconds)
                except Exception as e:
                    peer["error"] = f"{type(e).__name__}: {e}"
        for _ in range(ROUNDS - ROUNDS // 2):
            parts.round()
        ours |= parts.medians() | {"step": float(np.median(loop))}
        del parts
    except Exception as e:  # a script that is broken or mid-edit: report it, measure the rest
        ours["error"] = f"{type(e).__name__}: {e}"
        log(f"    FAILED: {ours['error']}")
    gc.collect()
    if peer is not None and not reused and times["step"]:
        peer |= {part: float(np.median(seconds)) for part, seconds in times.items()}
    if peer is not None or variant.peer is None:
        ours["note"] = variant.note + (" (the sbx row above)" if reused else "")
    ours["peer"] = peer or {}
    if baseline_loop and "step" in ours:  # its loop only: the part columns stay empty
        step = float(np.median(baseline_loop))
        baseline |= {"step": step, "ratio": step / ours["step"], "note": "(ours / this row: the baseline)"}
    return [ours] + ([peer] if peer is not None and not reused else []) + ([baseline] if "step" in baseline else [])


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def ms(seconds: float | None) -> str:
    return "" if seconds is None else f"{seconds * 1e3:.2f} ms"


PART_COLUMNS = ("env.step", "action", "critic", "actor", "update")  # a --baseline row has none of them


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| script | critic width | implementation | env steps/s | updates/s | env.step | action | critic update "
        "| actor update | update as configured | other | update share | env steps/s ours/peer |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['script']} | {row['width']} | {row['impl']} |"
        if "step" not in row:
            lines.append(f"{head} failed: {row.get('error', 'not measured')} |" + " |" * 9)
            continue
        step, (env, action, critic, actor, update) = row["step"], [row.get(k) for k in PART_COLUMNS]
        other = None if None in (env, action, update) else step - env - action - update
        share = "" if update is None else f"{update / step:.0%}"
        ratio = row.get("ratio") or (row["peer"]["step"] / step if "step" in row.get("peer", {}) else None)
        ratio = "" if ratio is None else f"{ratio:.2f}x"
        lines.append(
            f"{head} {1 / step:.1f} | {row['utd'] / step:.1f} | {ms(env)} | {ms(action)} | {ms(critic)} | {ms(actor)} "
            f"| {ms(update)} | {ms(other)} | {share} | {' '.join(filter(None, [ratio, row.get('note', '')]))} |"
        )
    return lines


def commit_of(repo: Path) -> str:
    git = ["git", "describe", "--always", "--dirty= with uncommitted changes"]
    return subprocess.run(git, cwd=repo, capture_output=True, text=True).stdout.strip() or "unknown"


def hardware(peer: bool) -> str:
    import jax

    cpu = platform.processor() or platform.machine()
    if os.path.exists("/proc/cpuinfo"):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    sbx = f", sbx-rl {version('sbx-rl')}" if peer else ""
    return (
        f"hardware: {cpu}, {os.cpu_count()} logical cores, {memory:.1f} GiB RAM; jax {jax.__version__} "
        f"({devices}){sbx}; repository at commit {commit_of(REPO)}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256, 2048], help="critic widths (default 256 2048)")
    parser.add_argument(
        "--steps",
        type=int,
        nargs="+",
        help="per run: one, or one per width (default 500 at widths up to 256, 100 above)",
    )
    parser.add_argument("--scripts", nargs="+", default=DEFAULT_SCRIPTS, choices=list(VARIANTS))
    parser.add_argument("--repeats", type=int, default=2, help="runs of each loop, ours and sbx's alternated")
    parser.add_argument("--no-peer", action="store_true", help="skip sbx (no need to install it)")
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--learning-starts", type=int, default=1000, help="random-action env steps (default 1000)")
    parser.add_argument(
        "--baseline",
        type=Path,
        help="another checkout (a git worktree at an older commit, say): "
        "its copy of each script runs alternated with ours, a row of its own (before/after a change)",
    )
    parser.add_argument("--max-utd-width", type=int, default=256, help="wider critics skip the UTD > 1 presets")
    options = parser.parse_args()
    steps = options.steps or [500 if width <= 256 else 100 for width in options.widths]
    steps = steps * len(options.widths) if len(steps) == 1 else steps
    if len(steps) != len(options.widths):
        parser.error("--steps takes one value, or one per width")
    if options.baseline and not all((options.baseline / v.script).is_file() for v in VARIANTS.values()):
        parser.error(f"--baseline {options.baseline}: not a checkout of this repository (no training scripts there)")
    if not options.no_peer and importlib.util.find_spec("sbx") is None:
        parser.error("the peer needs sbx-rl: pip install -r benchmarks/requirements.txt (or pass --no-peer)")

    print(f"command: python benchmarks/throughput.py {' '.join(sys.argv[1:])}".rstrip())
    print(hardware(peer=not options.no_peer))
    load = lambda: "{:.1f} {:.1f} {:.1f} (1, 5, 15 min)".format(*os.getloadavg())
    print(f"load average at start: {load()}", flush=True)
    started, rows, peer_rows = time.perf_counter(), [], {}
    for width, n_steps in zip(options.widths, steps, strict=True):
        for name in options.scripts:
            utd = load_script(VARIANTS[name].script).parse_args(VARIANTS[name].words).utd
            if utd > 1 and width > options.max_utd_width:
                log(f"[width {width}] {name}: skipped, UTD {utd} above --max-utd-width {options.max_utd_width}")
                continue
            rows += measure(name, width, n_steps, options, peer_rows)
    print(f"load average at end: {load()}; {time.perf_counter() - started:.0f} s in all\n")
    sbx = "; sbx, given the same values: its parts in its loop, update = train() (batch sampling included)"
    sbx = "" if options.no_peer else sbx
    print(
        f"{options.env_id}, learning starts {options.learning_starts}, seed 1, the scripts' defaults otherwise. Per "
        "env step; ours: the parts in isolation, update = the jitted store and update(s) as configured, other = step "
        f"- env.step - action - update (below 0: the parts ran under more load than the loop){sbx}.\n"
    )
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
