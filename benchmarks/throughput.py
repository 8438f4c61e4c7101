"""Throughput of the training scripts against sbx-rl (Stable-Baselines-Jax) at identical settings.

    pip install -r requirements.txt -r benchmarks/requirements.txt
    python benchmarks/throughput.py                       # widths 256 and 2048, all scripts, with sbx
    python benchmarks/throughput.py --widths 256 --steps 300 --scripts crossq --no-peer
    python benchmarks/throughput.py --widths 256 --baseline ../before   # before/after: a worktree at an older commit

For every script (sac_jax.py once per preset) and critic width: (1) our loop as users run it, the script in
a subprocess, timed from the wall times of its TensorBoard `charts/SPS` events over sub-windows of env steps
after learning starts (the compilations before them, the final evaluation after); (2) sbx's CrossQ, SAC or
TD3 at the same settings in this process, as its users run it: `learn()` past the compilations, then one
`learn()` per sub-window continuing the same run, timed from outside (no callback, nothing wrapped);
(1) and (2) alternate `--repeats` times; (3) the parts of one of our env steps timed in isolation, half of
the rounds before the loops and half after, with the script's own functions on the same Args. Every figure
is a median, over the sub-windows of all repeats or over the rounds. Times are wall-clock: on a shared
machine compare the rows of one run with each other.
"""

import argparse
import dataclasses
import importlib.util
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

import numpy as np

REPO = Path(__file__).resolve().parents[1]
ROUNDS, PART_SECONDS = 6, 0.3  # rounds of part timings, seconds per part and round
# name: (script, the preset word it takes before its flags, the sbx class run at the same settings, a note)
VARIANTS = {
    "crossq": ("crossq_jax.py", [], "CrossQ", ""),
    "crossq_td3": ("crossq_td3_jax.py", [], "CrossQ", "vs sbx CrossQ: sbx has no CrossQ-TD3"),
    "sac": ("sac_jax.py", [], "SAC", ""),
    "redq": ("sac_jax.py", ["redq"], None, "no peer: sbx SAC has no random target-critic subset"),
    "droq": ("sac_jax.py", ["droq"], "SAC", "vs sbx SAC with dropout and LayerNorm"),
    "td3": ("crossq_td3_jax.py", ["td3"], "TD3", ""),
}


def load_script(script: str, repo: Path = REPO):
    """Import a training script by its path (once per checkout): the parts are timed with its own functions."""
    name = ("bench_" if repo == REPO else "baseline_") + Path(script).stem
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, repo / script)
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return sys.modules[name]


def lead_of(args, step: int) -> int:
    """The critic updates of env step `step` before the first one the actor follows, as the scripts' train() has it."""
    updates_before = (step - args.learning_starts - 1) * args.utd
    return min(args.policy_delay - 1 - updates_before % args.policy_delay, args.utd)


def noise_of(args) -> tuple:
    """What the script's `explore` takes after the key: the TD3 base's exploration noise, nothing for the SAC base."""
    return (args.exploration_noise,) if hasattr(args, "exploration_noise") else ()


def run_ours(script: str, argv: list[str], bounds: list[int], repo: Path) -> np.ndarray:
    """Seconds per env step of `repo`'s copy of the script in each sub-window (its charts/SPS event wall times)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    with tempfile.TemporaryDirectory(prefix="throughput-") as cwd:
        result = subprocess.run([sys.executable, str(repo / script), *argv], cwd=cwd, capture_output=True, text=True)
        if result.returncode != 0:
            sys.exit(f"{repo / script} exited with {result.returncode}:\n{result.stderr[-2000:]}")
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

        self.module, self.i = module, 0
        self.env = module.make_env(args.env_id, args.seed)()
        self.obs = self.env.reset(seed=args.seed)[0]
        obs_dim, action_dim = self.env.observation_space.shape[0], self.env.action_space.shape[0]
        self.agent = module.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(args.seed))
        self.metrics = module.Metrics.initial()
        self.keys = {"update": jax.random.PRNGKey(args.seed + 1), "explore": jax.random.PRNGKey(args.seed + 2)}
        self.noise = noise_of(args)
        self.actions = [self.env.action_space.sample() for _ in range(1000)]
        # The buffer at the loop's capacity (it matters), holding `learning_starts` random transitions.
        self.store = jax.jit(module.store_step, donate_argnums=0)
        self.buffer = module.ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
        rng = np.random.default_rng(args.seed)
        for _ in range(args.learning_starts + 1):
            obs, next_obs = rng.normal(size=(2, obs_dim))
            self.step_data = module.pack_step(obs, rng.uniform(-1, 1, action_dim), rng.normal(), 0.0, next_obs, obs)
            self.buffer, _ = self.store(self.buffer, self.step_data)

        def update(**changes) -> Callable[..., list[float]]:
            changed = dataclasses.replace(args, **changes)
            train_step = module.make_train_step(changed, action_dim)
            return lambda clock=None: self.update(train_step, changed, clock)

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
        """The first learning step's draw, alone: `explore` and reading its action (later steps draw inside their
        train_step, so the update rows below include it)."""
        np.asarray(self.module.explore(self.agent.actor, self.obs[None], self.keys["explore"], *self.noise))[0]

    def update(self, train_step, args, clock: Callable[[], float] | None = None) -> list[float]:
        """One learning env step's device work as the loop does it: store, train_step (the step's updates and the
        next action), read the action. With `clock`, the times at which each call returned and the action was read."""
        self.i += 1
        lead = lead_of(args, args.learning_starts + self.i)
        times = [clock()] if clock else []
        self.buffer, obs = self.store(self.buffer, self.step_data)
        times += [clock()] if clock else []
        self.agent, self.metrics, self.keys, action = train_step(
            self.agent, self.metrics, self.buffer, self.keys, obs, lead
        )
        times += [clock()] if clock else []
        np.asarray(action)[0]
        return times + ([clock()] if clock else [])

    def call_times(self, n: int = 200) -> dict[str, float]:
        """Median microseconds of one learning env step's calls as configured: until `store` returns, until
        `train_step` returns (both dispatch work and return early on a GPU), and until its action has been read."""
        deltas = np.diff([self.calls["update"][0](time.perf_counter) for _ in range(n)], axis=1)
        names = ["store returns", "train_step returns", "action read"]
        return dict(zip(names, np.median(deltas, axis=0) * 1e6, strict=True))

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
        settings["exploration_noise"] = args.exploration_noise  # becomes a NormalActionNoise below
    return settings | {"policy_kwargs": policy}


def run_peer(peer: str, env_id: str, settings: dict, bounds: list[int]) -> np.ndarray:
    """Seconds per env step of sbx's learn() in each sub-window, as its users run it (no callback, nothing
    wrapped): learn() up to the first bound (compiling), then one learn() per sub-window that continues the same
    run and episode (`reset_num_timesteps=False`), timed from outside."""
    import gymnasium as gym
    import sbx
    from stable_baselines3.common.noise import NormalActionNoise

    warnings.simplefilter("ignore")  # the imports above turn some warnings back on
    settings = dict(settings)
    if "exploration_noise" in settings:
        n, std = gym.make(env_id).action_space.shape[0], settings.pop("exploration_noise")
        settings["action_noise"] = NormalActionNoise(np.zeros(n), np.full(n, std))
    model = getattr(sbx, peer)("MlpPolicy", env_id, **settings)
    model.learn(bounds[0])
    seconds = []
    for steps in np.diff(bounds):
        start = time.perf_counter()
        model.learn(int(steps), reset_num_timesteps=False)
        seconds.append((time.perf_counter() - start) / steps)
    return np.array(seconds)


def measure(name: str, width: int, steps: int, options, peer_rows: dict) -> list[dict]:
    """Our row, the peer's (once per distinct sbx setting) and the baseline's: the loops alternated
    `options.repeats` times, our parts timed around them."""
    script, words, peer, note = VARIANTS[name]
    module = load_script(script)
    # Sub-windows of F env steps (F the largest divisor of learning_starts up to steps / 10, so that a
    # charts/SPS event falls on each bound), the first two after learning starts left out (compiling).
    steps = max(10, steps // module.parse_args(words).utd)
    log_freq = max(d for d in range(1, max(1, steps // 10) + 1) if options.learning_starts % d == 0)
    start = options.learning_starts + 2 * log_freq
    bounds = list(range(start, start + log_freq * math.ceil(steps / log_freq) + 1, log_freq))
    argv = [*words, "--env-id", options.env_id, "--seed", "1", "--critic-width", str(width)]
    argv += ["--learning-starts", str(options.learning_starts), "--total-timesteps", str(bounds[-1])]
    argv += ["--log-freq", str(log_freq), "--eval-freq", "0", "--eval-episodes", "1"]
    args = module.parse_args(argv)
    log(f"[width {width}] {name}: python {script} {' '.join(argv)}; env steps {bounds[0]}..{bounds[-1]}")
    row = lambda impl, **more: {"script": name, "width": width, "impl": impl, "utd": args.utd} | more
    ours, loops = row(" ".join([script, *words])), {"ours": [], "baseline": []}
    repos = {"ours": REPO} | ({"baseline": options.baseline} if options.baseline else {})
    peer_row, new_peer, loops["peer"] = None, False, []
    if peer and not options.no_peer:
        settings = peer_settings(peer, args, options.learning_starts)
        key = (peer, options.env_id, repr(settings))  # crossq_td3 shares the sbx CrossQ row of crossq
        new_peer = key not in peer_rows
        peer_row = peer_rows.setdefault(key, row(f"sbx {peer}"))
    if peer_row is not None or peer is None:
        ours["note"] = note + ("" if new_peer or peer is None else " (the sbx row above)")
    parts = Parts(module, args)
    for _ in range(ROUNDS // 2):
        parts.round()
    for repeat in range(options.repeats):
        for which, repo in list(repos.items())[:: 1 if repeat % 2 == 0 else -1]:  # ABBA: the first of a pair is slower
            loops[which].extend(seconds := run_ours(script, argv, bounds, repo))
            log(f"    run {repeat + 1}: {script} in {repo} {1 / np.median(seconds):.1f} env steps/s")
        if new_peer:
            loops["peer"].extend(seconds := run_peer(peer, options.env_id, settings, bounds))
            log(f"    run {repeat + 1}: sbx {peer} {1 / np.median(seconds):.1f} env steps/s")
    for _ in range(ROUNDS - ROUNDS // 2):
        parts.round()
    ours |= parts.medians() | {"step": float(np.median(loops["ours"]))}
    if new_peer:
        peer_row["step"] = float(np.median(loops["peer"]))
    if peer_row is not None:
        ours["ratio"] = peer_row["step"] / ours["step"]
    rows = [ours, *([peer_row] if new_peer else [])]
    if options.baseline:  # its loop only: the part columns stay empty
        step = float(np.median(loops["baseline"]))
        impl = f"{ours['impl']} at {commit_of(options.baseline)}"
        rows.append(row(impl, step=step, ratio=step / ours["step"], note="(ours / this row: the baseline)"))
    return rows


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def table(rows: list[dict]) -> list[str]:
    ms = lambda seconds: "" if seconds is None else f"{seconds * 1e3:.2f} ms"
    lines = [
        "| script | critic width | implementation | env steps/s | updates/s | env.step | action | critic update "
        "| actor update | update as configured | other | update share | env steps/s ours/other row |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        step, (env, action, critic, actor, update) = r["step"], [r.get(k) for k in PARTS]
        other = None if None in (env, update) else step - env - update  # the update includes the next action
        share = "" if update is None else f"{update / step:.0%}"
        ratio = f"{r['ratio']:.2f}x" if "ratio" in r else ""
        lines.append(
            f"| {r['script']} | {r['width']} | {r['impl']} | {1 / step:.1f} | {r['utd'] / step:.1f} | {ms(env)} "
            f"| {ms(action)} | {ms(critic)} | {ms(actor)} | {ms(update)} | {ms(other)} | {share} "
            f"| {' '.join(filter(None, [ratio, r.get('note', '')]))} |"
        )
    return lines


PARTS = ("env.step", "action", "critic", "actor", "update")  # ours only: the peer and --baseline rows have none


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


def quiet() -> None:
    """No warnings (Hopper-v4's "out of date" notice and the like), here and in the scripts this process starts."""
    warnings.simplefilter("ignore")
    os.environ["PYTHONWARNINGS"] = "ignore"


def main() -> None:
    quiet()
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--widths", type=int, nargs="+", default=[256, 2048], help="critic widths (default 256 2048)")
    add("--steps", type=int, nargs="+", help="per run: one, or one per width (default 500 up to width 256, 100 above)")
    add("--scripts", nargs="+", default=["crossq", "crossq_td3", "sac", "redq", "droq"], choices=VARIANTS)
    add("--repeats", type=int, default=2, help="runs of each loop, ours and sbx's alternated")
    add("--no-peer", action="store_true", help="skip sbx (no need to install it)")
    add("--env-id", default="Hopper-v4")
    add("--learning-starts", type=int, default=1000, help="random-action env steps (default 1000)")
    add(
        "--baseline",
        type=Path,
        help="another checkout (a git worktree at an older commit, say): its copy of each "
        "script runs alternated with ours (which goes first swaps every repeat), a row of its own (before/after)",
    )
    add("--max-utd-width", type=int, default=256, help="wider critics skip the UTD > 1 presets")
    options = parser.parse_args()
    steps = options.steps or [500 if width <= 256 else 100 for width in options.widths]
    steps = steps * len(options.widths) if len(steps) == 1 else steps
    if len(steps) != len(options.widths):
        parser.error("--steps takes one value, or one per width")
    if options.baseline and not all((options.baseline / v[0]).is_file() for v in VARIANTS.values()):
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
            script, words = VARIANTS[name][:2]
            if (utd := load_script(script).parse_args(words).utd) > 1 and width > options.max_utd_width:
                log(f"[width {width}] {name}: skipped, UTD {utd} above --max-utd-width {options.max_utd_width}")
                continue
            rows += measure(name, width, n_steps, options, peer_rows)
    print(f"load average at end: {load()}; {time.perf_counter() - started:.0f} s in all\n")
    print(
        f"{options.env_id}, learning starts {options.learning_starts}, seed 1, the scripts' defaults otherwise. Per "
        "env step; ours: the parts in isolation, action = the first learning step's draw alone, update = the store, "
        "the update(s) as configured and the next action drawn and read (critic / actor update: the same with one "
        "critic update, and its actor update), other = step - env.step - update (below 0: the parts ran under more "
        "load than the loop).\n"
    )
    print("\n".join(table(rows)))


if __name__ == "__main__":
    main()
