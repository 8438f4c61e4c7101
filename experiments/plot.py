"""Draw a sweep's results the way the paper does, and write its table into docs/results.md.

    python experiments/plot.py                                  # every sweep in experiments/results (and unfinished)
    python experiments/plot.py --sweeps mujoco_cpu --live sweeps/mujoco_cpu   # plus the runs still going

Reads each finished run's result file (`experiments/results/{sweep}/{algo}/{env}/seed{seed}.json`, written
by sweep.py) and, with `--live`, the TensorBoard events of runs not finished, still going or stopped (a sweep's
work dir or any `runs/` folder; a finished run's result file wins over its live copy), and the printed output
of runs stopped before their last step whose output was committed (`experiments/unfinished/{sweep}/{algo}/{env}/
seed{seed}/log.txt`: a sweep's log of a run cut short, for example where a lent GPU's time ran out). Per env and
algorithm, over seeds:

- IQM: the interquartile mean, as rliable (Agarwal et al. 2021) computes it: sort, drop floor(n/4) runs
  at each end, average the rest (scipy.stats.trim_mean(x, 0.25)). With 3 seeds nothing is dropped.
- the 70% quantile interval: from the 15th to the 85th percentile of the seeds' returns (numpy's
  linear interpolation between order statistics), the band of the paper's Figures 5 and 6.
- the aggregate over envs: each env's returns divided by a reference (REFERENCE below: the paper's
  CrossQ return at 100k env steps, so 1.0 means "as good as the paper's CrossQ at 100k"),
  the IQM of all (env, seed) scores, and a 95% confidence interval from a stratified bootstrap (seeds
  resampled with replacement within each env; percentile interval), as rliable does.

Figures go to docs/figures/{sweep}_steps.png (return against env steps, Figure 5),
{sweep}_time.png (return against training wall-clock, Figure 6) and {sweep}_aggregate.png; the table of
IQM at fixed steps and the runs' provenance go into docs/results.md between this sweep's markers, so
the prose around them stays, and the table and one figure (the aggregate, where there is one) into README.md
where it has the sweep's markers.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import tyro

sys.path.insert(0, str(Path(__file__).resolve().parent))  # sweep.py, beside this file
from sweep import eval_curve, read_curve  # the sweep's own reading of a run's evaluations

REPO = Path(__file__).resolve().parents[1]
# The paper's numbers at 100k env steps (CrossQ at critic width 2048, and the baselines; returns, the
# 10-seed means of the authors' code published by the SimbaV2 and BRO authors).
# CrossQ's column normalises the aggregate; the table shows the matching one.
PAPER_100K = {
    "CrossQ": {"Hopper-v4": 2764, "Walker2d-v4": 3914, "HalfCheetah-v4": 8112, "Ant-v4": 2299, "Humanoid-v4": 2603},
    "SAC": {"Hopper-v4": 1103, "Walker2d-v4": 690, "HalfCheetah-v4": 6156, "Ant-v4": 747, "Humanoid-v4": 632},
    "REDQ": {"Hopper-v4": 2750, "Walker2d-v4": 3459, "HalfCheetah-v4": 7823, "Ant-v4": 3287, "Humanoid-v4": 1319},
    "DroQ": {"Hopper-v4": 1813, "Walker2d-v4": 2277, "HalfCheetah-v4": 7744, "Ant-v4": 1365, "Humanoid-v4": 1278},
}
REFERENCE = PAPER_100K["CrossQ"]
PAPER_NAME = {"crossq": "CrossQ", "sac": "SAC", "redq": "REDQ", "droq": "DroQ"}  # our algo -> paper's column
COLORS = {"crossq": "tab:red", "sac": "tab:blue", "crossq_td3": "tab:orange", "td3": "tab:green"}
BEGIN, END = "<!-- experiments/plot.py: {} begins (generated, do not edit) -->", "<!-- experiments/plot.py: {} ends -->"


@dataclasses.dataclass
class PlotArgs:
    sweeps: list[str] | None = None
    """the sweeps to draw (folders of `results_dir`; default: all of them)"""
    live: list[Path] = dataclasses.field(default_factory=list)
    """folders of runs still going (a sweep's work dir, or any `runs/` folder) to add to the one sweep drawn"""
    results_dir: Path = REPO / "experiments" / "results"
    """where sweep.py keeps the finished runs' result files"""
    unfinished_dir: Path = REPO / "experiments" / "unfinished"
    """where the output (log.txt, in the sweep's layout) of runs stopped before their last step is kept"""
    figures_dir: Path = REPO / "docs" / "figures"
    """where the PNG figures go"""
    page: Path = REPO / "docs" / "results.md"
    """the Markdown page whose generated block (between this sweep's markers) gets the table"""
    readme: Path = REPO / "README.md"
    """a second page that gets the table and one figure (not the runs' provenance) where it has the sweep's markers"""
    table_steps: list[int] = dataclasses.field(default_factory=lambda: [50_000, 100_000])
    """the env steps of the table's columns"""
    bootstrap_reps: int = 2000
    """bootstrap resamples of the aggregate's confidence interval"""


# --- the statistics -------------------------------------------------------------------------------
def iqm(scores: np.ndarray, axis: int = -1) -> np.ndarray:
    """Interquartile mean: drop floor(n/4) of the n scores at each end, average the rest (rliable's IQM)."""
    ordered = np.sort(np.asarray(scores, dtype=float), axis=axis)
    n = ordered.shape[axis]
    cut = int(0.25 * n)
    return np.take(ordered, np.arange(cut, n - cut), axis=axis).mean(axis=axis)


def quantile_interval(scores: np.ndarray, coverage: float = 0.7) -> tuple[float, float]:
    """The central `coverage` of the scores: from the (1-c)/2 to the (1+c)/2 quantile (linear interpolation)."""
    low, high = np.quantile(np.asarray(scores, dtype=float), [(1 - coverage) / 2, (1 + coverage) / 2])
    return float(low), float(high)


def stratified_bootstrap_iqm(
    scores_per_env: list[np.ndarray], reps: int, rng: np.random.Generator, confidence: float = 0.95
) -> tuple[float, float, float]:
    """IQM of all (env, seed) scores, and its percentile bootstrap interval: each resample draws every
    env's seeds again with replacement (as many as it has), then takes the IQM of them all together."""
    point = float(iqm(np.concatenate(scores_per_env)))
    resampled = [s[rng.integers(0, len(s), size=(reps, len(s)))] for s in scores_per_env]
    estimates = iqm(np.concatenate(resampled, axis=1), axis=1)
    low, high = np.quantile(estimates, [(1 - confidence) / 2, (1 + confidence) / 2])
    return point, float(low), float(high)


# --- the data -------------------------------------------------------------------------------------
@dataclasses.dataclass
class Run:
    algo: str
    env: str
    seed: int
    curve: list[dict]  # [{step, return, train_seconds}], as in the result files
    source: dict  # the result file's provenance (command, commit, hardware, args), or {"live": run_dir}


def read_results(folder: Path) -> list[Run]:
    runs = []
    for path in sorted(folder.glob("*/*/seed*.json")):
        result = json.loads(path.read_text())
        source = {key: value for key, value in result.items() if key != "eval"}
        runs.append(Run(result["algo"], result["env"], int(result["seed"]), result["eval"], source))
    return runs


def read_live(folder: Path) -> list[Run]:
    """Every run below `folder`; in a sweep's layout ({algo}/{env}/seed{N}/runs/{run}) the algorithm is
    the grid's name for it, elsewhere the script's `exp_name`. The newest run of a (algo, env, seed) wins."""
    runs = {}
    for args_file in sorted(folder.rglob("args.json"), key=lambda p: p.stat().st_mtime):
        run_dir, args = args_file.parent, json.loads(args_file.read_text())
        in_sweep = run_dir.parent.name == "runs" and run_dir.parents[1].name == f"seed{args['seed']}"
        algo = run_dir.parents[3].name if in_sweep else args["exp_name"]
        try:
            curve = read_curve(run_dir)
        except KeyError:  # nothing logged yet
            continue
        if curve:
            runs[algo, args["env_id"], args["seed"]] = Run(algo, args["env_id"], args["seed"], curve, {"live": run_dir})
    return list(runs.values())


def read_logs(folder: Path) -> list[Run]:
    """Runs stopped before their last step, from what they printed (the log.txt of each {algo}/{env}/seed{N} cell
    of a sweep): the curve read_curve makes from TensorBoard, here from the printed returns (to 0.1), with training
    seconds only from logs of before 2026-12-08 (their progress lines' SPS was env steps per training second, with an
    ETA= field; SPS now counts its phase alone). A run continued after a stop prints a step
    again: the last print wins, as read_curve keeps the newest events."""
    runs = []
    for log in sorted(folder.glob("*/*/seed*/log.txt")):
        returns, seconds, commands = {}, {}, []
        for line in log.read_text().splitlines():
            if (match := re.match(r"step=(\d+) SPS=(\d+) ", line)) and " ETA=" in line:  # before SPS counted phases
                seconds[int(match[1])] = int(match[1]) / int(match[2]) if int(match[2]) else None
            elif match := re.match(r"step=(\d+) eval/episodic_return=(\S+) ", line):
                returns[int(match[1])] = float(match[2])
            elif line.startswith("# ") and " $ " in line:  # sweep.py's line before each start of the run
                commands.append(shlex.split(line.split(" $ ", 1)[1]))
        if not returns:
            continue
        first = commands[0]  # interpreter, script path, flags: as python <script> <flags>
        command = "python " + shlex.join([Path(first[1]).name, *first[2:]])
        # The env id and seed as the run had them (a folder name has the env id's / as -).
        algo, env, seed = log.parts[-4], first[first.index("--env-id") + 1], int(first[first.index("--seed") + 1])
        runs.append(
            Run(
                algo,
                env,
                seed,
                eval_curve(returns, seconds),
                {"log": log, "command": command, "env": env, "seed": seed},
            )
        )
    return runs


def by_env_and_algo(runs: list[Run]) -> dict[str, dict[str, list[Run]]]:
    grouped: dict[str, dict[str, list[Run]]] = defaultdict(lambda: defaultdict(list))
    for run in sorted(runs, key=lambda r: (r.env, r.algo, r.seed)):
        grouped[run.env][run.algo].append(run)
    return grouped


def at_steps(runs: list[Run], field: str = "return") -> dict[int, np.ndarray]:
    """{env step: the seeds' values there}, for every step that at least one seed has reached."""
    values = defaultdict(list)
    for run in runs:
        for point in run.curve:
            if point[field] is not None:
                values[point["step"]].append(point[field])
    return {step: np.asarray(values[step], dtype=float) for step in sorted(values)}


# --- the figures ----------------------------------------------------------------------------------
def color(algo: str, algos: list[str]) -> str:
    return COLORS.get(algo) or f"C{algos.index(algo) % 10}"


def steps_axis(ax) -> None:
    from matplotlib.ticker import FuncFormatter

    ax.set_xlabel("env steps")
    ax.xaxis.set_major_formatter(FuncFormatter(lambda x, _: f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"))


def curve_figure(grouped, x_axis: str, path: Path) -> None:
    """One panel per env: per algorithm the IQM over seeds and its 70% quantile band (Figures 5 and 6)."""
    import matplotlib.pyplot as plt

    envs, algos = sorted(grouped), sorted({a for env in grouped.values() for a in env})
    fig, axes = plt.subplots(1, len(envs), figsize=(4.2 * len(envs), 3.4), squeeze=False)
    longest = max(p["train_seconds"] or 0 for e in grouped.values() for rs in e.values() for r in rs for p in r.curve)
    unit, per = ("hours", 3600.0) if longest > 3 * 3600 else ("minutes", 60.0)
    starred = False  # whether any panel shows a paper number (DeepMind Control tasks have none)
    for ax, env in zip(axes[0], envs, strict=True):
        for algo, runs in sorted(grouped[env].items()):
            returns = at_steps(runs)
            steps = np.array(list(returns))
            if x_axis == "steps":
                x = steps
            else:  # the seeds' median training time to reach each step
                seconds = at_steps(runs, "train_seconds")
                steps = np.array([s for s in steps if s in seconds])
                x = np.array([np.median(seconds[s]) for s in steps]) / per
            band = np.array([quantile_interval(returns[s]) for s in steps])
            c = color(algo, algos)
            ax.plot(
                x, [iqm(returns[s]) for s in steps], color=c, label=f"{algo} ({len(runs)} seed{'s' * (len(runs) > 1)})"
            )
            ax.fill_between(x, band[:, 0], band[:, 1], color=c, alpha=0.2, linewidth=0)
            if x_axis == "steps" and env in PAPER_100K.get(PAPER_NAME.get(algo, ""), {}):
                paper = PAPER_100K[PAPER_NAME[algo]][env]
                ax.plot([100_000], [paper], marker="*", markersize=11, color=c, markeredgecolor="black", linestyle="")
                starred = True
        ax.set_title(env)
        if x_axis == "steps":
            steps_axis(ax)
        else:
            ax.set_xlabel(f"training wall-clock ({unit})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8, loc="upper left")
    axes[0][0].set_ylabel("IQM return (70% quantile interval)")
    if starred:
        fig.text(
            0.5, -0.02, "stars: the paper's return at 100k steps (critic width 2048, mean of 10 seeds)", ha="center"
        )
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def aggregate_curves(grouped, reps: int) -> dict[str, list[tuple[int, float, float, float]]]:
    """Per algorithm, at each step every normalisable env has reached: (step, IQM, CI low, CI high)."""
    rng = np.random.default_rng(0)
    envs = [env for env in sorted(grouped) if env in REFERENCE]
    curves = {}
    for algo in sorted({a for env in envs for a in grouped[env]}):
        if not all(algo in grouped[env] for env in envs):
            continue  # an aggregate over some of the envs would not compare with the others'
        per_env = [{s: v / REFERENCE[env] for s, v in at_steps(grouped[env][algo]).items()} for env in envs]
        common = sorted(set.intersection(*(set(d) for d in per_env)))
        curves[algo] = [(s, *stratified_bootstrap_iqm([d[s] for d in per_env], reps, rng)) for s in common]
    return curves


def aggregate_figure(curves, envs: list[str], path: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    for algo, points in curves.items():
        steps, point, low, high = (np.array(column) for column in zip(*points, strict=True))
        c = color(algo, list(curves))
        ax.plot(steps, point, color=c, label=algo)
        ax.fill_between(steps, low, high, color=c, alpha=0.2, linewidth=0)
    ax.axhline(1.0, color="gray", linestyle="--", linewidth=1, label="paper's CrossQ at 100k (width 2048)")
    ax.set_title(f"aggregate over {len(envs)} envs")
    steps_axis(ax)
    ax.set_ylabel("IQM of return / paper's CrossQ at 100k\n(95% stratified bootstrap CI)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


# --- the page -------------------------------------------------------------------------------------
def cell(values: np.ndarray | None) -> str:
    if values is None or len(values) == 0:
        return "—"
    low, high = quantile_interval(values)
    return f"{iqm(values):.0f} [{low:.0f}, {high:.0f}] ({len(values)})"


def table(grouped, table_steps: list[int]) -> str:
    steps = " | ".join(f"{s // 1000}k steps" for s in table_steps)
    lines = [
        f"| env | algorithm | {steps} | paper at 100k |",
        "|" + "---|" * (3 + len(table_steps)),
    ]
    for env in sorted(grouped):
        for algo, runs in sorted(grouped[env].items()):
            returns = at_steps(runs)
            paper = PAPER_100K.get(PAPER_NAME.get(algo, ""), {}).get(env)
            row = [cell(returns.get(s)) for s in table_steps] + [str(paper) if paper else "—"]
            lines.append(f"| {env} | {algo} | " + " | ".join(row) + " |")
    return "\n".join(lines)


def provenance(runs: list[Run]) -> str:
    """Per algorithm: the command, the scripts' commits, the machines, the steps and seeds behind the numbers."""
    lines = []
    for algo in sorted({r.algo for r in runs}):
        mine = [r for r in runs if r.algo == algo]
        finished = [r.source for r in mine if "commit" in r.source]
        stopped = [r.source for r in mine if "log" in r.source]
        generic = lambda s: s["command"].replace(f"--env-id {s['env']} --seed {s['seed']}", "--env-id ENV --seed SEED")
        seeds = {env: sorted(r.seed for r in mine if r.env == env) for env in sorted({r.env for r in mine})}
        last = sorted({max(p["step"] for p in r.curve) for r in mine})
        commands = "; ".join(f"`{c}`" for c in sorted({generic(s) for s in finished + stopped}))
        lines += [
            f"- **{algo}**: " + (commands or "no run finished (each run's command: the log.txt beside its runs/)"),
            f"    - seeds: {'; '.join(f'{env} {s}' for env, s in seeds.items())}; last evaluated step: "
            + ", ".join(map(str, last)),
        ]
        if finished:
            lines.append(f"    - scripts at commit {', '.join(sorted({s['commit'] for s in finished}))}")
            lines.append(f"    - on {'; '.join(sorted({s['hardware'] for s in finished}))}")
        if live := [r.source["live"] for r in mine if "live" in r.source]:
            lines.append(f"    - not finished, read from their TensorBoard events: {len(live)} runs")
        if stopped:
            folder = os.path.commonpath([s["log"].parents[3] for s in stopped])
            where = os.path.relpath(folder, REPO) if folder.startswith(str(REPO)) else folder
            lines.append(f"    - stopped before their last step, read from the output they printed ({where}): "
                         f"{len(stopped)} runs")  # fmt: skip
    return "\n".join(lines)


def update_page(page: Path, name: str, block: str) -> None:
    """Replace this sweep's generated block of the page (or add one at its end); the rest stays as written."""
    begin, end = BEGIN.format(name), END.format(name)
    text = page.read_text() if page.exists() else "# Results\n"
    generated = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        text = text[: text.index(begin)] + generated + text[text.index(end) + len(end) :]
    else:
        text = text.rstrip("\n") + f"\n\n{generated}\n"
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(text)


def draw_sweep(args: PlotArgs, name: str, runs: list[Run]) -> None:
    grouped = by_env_and_algo(runs)
    args.figures_dir.mkdir(parents=True, exist_ok=True)
    figures = {"steps": f"{name}_steps.png", "time": f"{name}_time.png"}
    for x_axis in ("steps", "time"):
        curve_figure(grouped, x_axis, args.figures_dir / figures[x_axis])
    envs = [env for env in sorted(grouped) if env in REFERENCE]
    curves = aggregate_curves(grouped, args.bootstrap_reps) if len(envs) > 1 else {}  # (one env: its own figure)
    if curves:
        figures["aggregate"] = f"{name}_aggregate.png"
        aggregate_figure(curves, envs, args.figures_dir / figures["aggregate"])

    titles = {"steps": "return against env steps", "time": "return against training wall-clock",
              "aggregate": f"aggregate over {', '.join(envs)}"}  # fmt: skip

    def block(page: Path, full: bool) -> str:
        """This sweep's generated block of `page`: the table and figures, with the runs' provenance in full; else the
        table and one figure, the aggregate over envs where there is one (the README's glance)."""
        link = lambda path: os.path.relpath(path, page.parent)
        shown = [key for key in ("steps", "time", "aggregate") if key in figures]
        if not full:
            shown = ["aggregate" if "aggregate" in figures else "steps"]
        lines = [
            f"IQM over seeds [70% quantile interval] (seeds) of `eval/episodic_return`, sweep `{name}`:",
            "",
            table(grouped, args.table_steps),
            "",
            *(f"![{titles[key]}]({link(args.figures_dir / figures[key])})" for key in shown),
            "",
        ]
        if full:
            return "\n".join([*lines, "Runs:", "", provenance(runs)])
        return "\n".join([*lines, f"Commands, commits, seeds and machines: [{link(args.page)}]({link(args.page)})."])

    update_page(args.page, name, block(args.page, full=True))
    pages = str(args.page)
    if args.readme.exists() and BEGIN.format(name) in args.readme.read_text():
        update_page(args.readme, name, block(args.readme, full=False))
        pages += f" and {args.readme}"
    print(f"{name}: runs drawn: {len(runs)}; figures in {args.figures_dir}; table in {pages}")


def main(args: PlotArgs) -> int:
    import matplotlib

    matplotlib.use("Agg")
    folders = lambda top: {p.name for p in top.iterdir() if p.is_dir()} if top.is_dir() else set()
    found = sorted(folders(args.results_dir) | folders(args.unfinished_dir))
    names = args.sweeps or found
    if args.live and len(names) != 1:
        raise SystemExit("error: --live adds runs to one sweep: name it with --sweeps")
    if not names:
        raise SystemExit(f"error: no sweep in {args.results_dir}")
    for name in names:
        # One copy of each run: its result file if it finished, else its TensorBoard events, else its output.
        copies = [*read_logs(args.unfinished_dir / name), *(r for folder in args.live for r in read_live(folder))]
        runs = list({(r.algo, r.env, r.seed): r for r in copies + read_results(args.results_dir / name)}.values())
        if not runs:
            raise SystemExit(f"error: sweep {name} has no runs with an evaluation yet")
        draw_sweep(args, name, runs)
    return 0


if __name__ == "__main__":
    sys.exit(main(tyro.cli(PlotArgs)))
