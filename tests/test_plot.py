"""experiments/plot.py: its statistics against values worked out by hand, and one redraw of a small
synthetic sweep (result files and a live TensorBoard run) into figures and a page whose prose survives."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO

sys.path.insert(0, str(REPO / "experiments"))
import plot  # (experiments/ is no package: found through sys.path)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([1, 2, 3, 4, 6, 7, 8, 100], (3 + 4 + 6 + 7) / 4),  # n = 8: two dropped at each end
        ([5, 1, 3, 2, 4], (2 + 3 + 4) / 3),  # n = 5: floor(5/4) = 1 dropped at each end
        ([0, 1, 2, 100], (1 + 2) / 2),
        ([10, 1, 4], 5.0),  # n = 3: nothing dropped (as rliable's IQM: scipy.stats.trim_mean(x, 0.25))
        ([7], 7.0),
    ],
)
def test_iqm_drops_a_quarter_of_the_runs_at_each_end(scores, expected):
    assert plot.iqm(np.array(scores)) == pytest.approx(expected)
    assert plot.iqm(np.array([scores, scores]) * 2, axis=1) == pytest.approx([2 * expected] * 2)


@pytest.mark.parametrize(
    ("scores", "expected"),
    [
        ([10, 20, 30, 40, 50], (16.0, 44.0)),  # 15% of 4 gaps = 0.6 of the first; 85% = 0.4 of the fourth
        ([0, 10], (1.5, 8.5)),
        ([3, 1, 2], (1.3, 2.7)),
        ([7], (7.0, 7.0)),
    ],
)
def test_quantile_interval_holds_the_central_70_percent(scores, expected):
    assert plot.quantile_interval(np.array(scores)) == pytest.approx(expected)


def test_bootstrap_resamples_seeds_within_each_env():
    """Env A has seeds [0, 1], env B [5, 5]. Resampling A's seeds gives {0,0} (1/4), {0,1} (1/2), {1,1} (1/4);
    the IQM of the 4 pooled scores (one dropped at each end) is then 2.5, 3 and 3. Resampling the pooled
    scores instead (not stratified) could give [5, 5, 5, 5] and so an upper bound of 5."""
    rng = np.random.default_rng(0)
    point, low, high = plot.stratified_bootstrap_iqm([np.array([0.0, 1.0]), np.array([5.0, 5.0])], 4000, rng)
    assert (point, low, high) == (3.0, 2.5, 3.0)
    same = plot.stratified_bootstrap_iqm([np.full(3, 2.0), np.full(3, 4.0)], 500, rng)
    assert same == (3.0, 3.0, 3.0)  # [2, 2, 2, 4, 4, 4]: one dropped at each end


def write_result(results: Path, algo: str, env: str, seed: int, returns: list[float]) -> None:
    path = results / algo / env.replace("/", "-") / f"seed{seed}.json"  # as sweep.py names it
    path.parent.mkdir(parents=True, exist_ok=True)
    curve = [{"step": 50_000 * (i + 1), "return": r, "train_seconds": 600.0 * (i + 1)} for i, r in enumerate(returns)]
    command = f"python {algo}_jax.py --critic-width 256 --env-id {env} --seed {seed}"
    result = {"algo": algo, "env": env, "seed": seed, "command": command, "commit": "c0ffee", "hardware": "test"}
    path.write_text(json.dumps({**result, "args": {}, "eval": curve}))


def write_live_run(run_dir, env: str, seed: int, returns: list[float], exp_name: str = "crossq_jax") -> None:
    """What a training script leaves in runs/{run_name}: args.json and TensorBoard events."""
    from tensorboard.compat.proto import event_pb2, summary_pb2
    from tensorboard.summary.writer.event_file_writer import EventFileWriter

    run_dir.mkdir(parents=True)
    (run_dir / "args.json").write_text(json.dumps({"env_id": env, "seed": seed, "exp_name": exp_name}))
    writer = EventFileWriter(str(run_dir))
    for i, value in enumerate(returns):
        step = 50_000 * (i + 1)
        for tag, v in (("charts/train_seconds", step / 100), ("eval/episodic_return", value)):
            summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=v)])
            writer.add_event(event_pb2.Event(wall_time=1.0, step=step, summary=summary))
    writer.close()


def test_redraw_writes_figures_and_the_table_between_markers(tmp_path):
    results = tmp_path / "results" / "tiny"
    for seed, hopper in zip((1, 2, 3), (1000.0, 2000.0, 6000.0), strict=True):
        write_result(results, "crossq", "Hopper-v4", seed, [hopper / 2, hopper])
        write_result(results, "crossq", "Walker2d-v4", seed, [100.0, 3914.0])
        write_result(results, "sac", "Hopper-v4", seed, [300.0 * seed, 600.0 * seed])
    work = tmp_path / "work"
    write_live_run(work / "crossq" / "Hopper-v4" / "seed4" / "runs" / "a", "Hopper-v4", 4, [1500.0, 3000.0])
    write_live_run(work / "crossq" / "Hopper-v4" / "seed1" / "runs" / "b", "Hopper-v4", 1, [9e9, 9e9])  # finished
    write_live_run(tmp_path / "runs" / "c", "Walker2d-v4", 9, [50.0], exp_name="sac_jax")  # plain runs/: exp_name
    page = tmp_path / "docs" / "results.md"
    page.parent.mkdir()
    page.write_text("# Results\n\nProse before.\n\n<!-- experiments/plot.py: tiny begins (generated, do not edit) -->\n"
                    "old table\n<!-- experiments/plot.py: tiny ends -->\n\nProse after.\n")  # fmt: skip
    readme = tmp_path / "README.md"  # shows the sweep where it has its markers: the table and one figure, no provenance
    readme.write_text("# Project\n\n<!-- experiments/plot.py: tiny begins (generated, do not edit) -->\n"
                      "<!-- experiments/plot.py: tiny ends -->\n\n## Usage\n")  # fmt: skip
    args = plot.PlotArgs(sweeps=["tiny"], live=[work, tmp_path / "runs"], results_dir=tmp_path / "results",
                         figures_dir=tmp_path / "docs" / "figures", page=page, readme=readme,
                         bootstrap_reps=200)  # fmt: skip
    assert plot.main(args) == 0

    for name in ("tiny_steps.png", "tiny_time.png", "tiny_aggregate.png"):
        import matplotlib.image

        assert matplotlib.image.imread(args.figures_dir / name).ndim == 3
    text = page.read_text()
    assert text.startswith("# Results\n\nProse before.\n\n") and text.endswith("\n\nProse after.\n")
    assert "old table" not in text and text.count("tiny begins") == 1
    # Hopper at 100k: seeds [1000, 2000, 6000] and the live seed 4's 3000, not seed 1's live copy (9e9).
    # IQM drops one at each end: (2000 + 3000) / 2; the 15th/85th percentiles: 1000 + 0.45 * 1000 and
    # 3000 + 0.55 * 3000. At 50k: [500, 1000, 1500, 3000].
    assert "| Hopper-v4 | crossq | 1250 [725, 2325] (4) | 2500 [1450, 4650] (4) | 2764 |" in text
    assert "| Hopper-v4 | sac | 600 [390, 810] (3) | 1200 [780, 1620] (3) | 1103 |" in text
    assert "| Walker2d-v4 | sac_jax | 50 [50, 50] (1) | — | — |" in text
    assert "`python crossq_jax.py --critic-width 256 --env-id ENV --seed SEED`" in text
    assert "(docs/figures/tiny_steps.png)" not in text and "(figures/tiny_steps.png)" in text  # relative to the page
    shown = readme.read_text()
    assert shown.startswith("# Project\n\n") and shown.endswith("\n\n## Usage\n")
    assert "| Hopper-v4 | crossq | 1250 [725, 2325] (4) | 2500 [1450, 4650] (4) | 2764 |" in shown
    assert "(docs/figures/tiny_aggregate.png)" in shown and "tiny_steps.png" not in shown  # one figure: the aggregate
    assert "tiny_time.png" not in shown and "Runs:" not in shown and "[docs/results.md](docs/results.md)" in shown
    plot.main(args)
    assert page.read_text() == text and readme.read_text() == shown  # a redraw of the same data changes nothing


def test_runs_stopped_early_are_read_from_their_printed_output(tmp_path):
    """A run cut short (its machine's time ran out) leaves only its sweep log.txt. Its returns come from what it
    printed, its training seconds from the SPS of progress lines of the older format (with ETA=); where a resumed run
    printed a step again, the later print wins; a run that finished is read from its result file, not from its log.
    A DMC id's / is - in the folder name."""
    env, folder = "dm_control/reacher-easy-v0", "dm_control-reacher-easy-v0"
    write_result(tmp_path / "results" / "tiny", "crossq", env, 1, [600.0, 900.0])
    start = f"# 2026-12-04T14:49:25 $ /venv/bin/python3 /repo/crossq_jax.py --critic-width 256 --env-id {env} --seed"
    logs = tmp_path / "unfinished" / "tiny" / "crossq" / folder
    for seed, lines in {
        1: [f"{start} 1", "step=50000 SPS=100 episodic_return=1.0", "step=50000 eval/episodic_return=9999.0 +- 0"],
        2: [f"{start} 2", "run x: logging to runs/x", "step=50000 SPS=100 episodic_return=1.0 ETA=? qf_loss=1.0",
            "step=50000 eval/episodic_return=100.0 +- 5.0 (10 episodes)", "stopped by SIGTERM; checkpoint written",
            f"{start} 2 --resume runs/x", "step=50000 SPS=125 episodic_return=2.0 ETA=0:00:10",
            "step=50000 eval/episodic_return=300.0 +- 5.0 (10 episodes)",
            "step=80000 SPS=80 episodic_return=3.0 qf_loss=1.0 time_left=0:00:10",
            "step=80000 eval/episodic_return=700.5 +- 1.0 (10 episodes)"],
    }.items():  # fmt: skip
        (logs / f"seed{seed}").mkdir(parents=True)
        (logs / f"seed{seed}" / "log.txt").write_text("\n" + "\n".join(lines) + "\n")

    stopped = {run.seed: run for run in plot.read_logs(tmp_path / "unfinished" / "tiny")}
    assert (stopped[2].algo, stopped[2].env) == ("crossq", env)
    assert stopped[2].curve == [
        {"step": 50_000, "return": 300.0, "train_seconds": 400.0},  # 50000 steps at 125 SPS, the resumed print
        {"step": 80_000, "return": 700.5, "train_seconds": None},  # a progress line of today: no seconds
    ]
    assert stopped[2].source["command"] == f"python crossq_jax.py --critic-width 256 --env-id {env} --seed 2"

    page = tmp_path / "results.md"
    args = plot.PlotArgs(sweeps=["tiny"], results_dir=tmp_path / "results", unfinished_dir=tmp_path / "unfinished",
                         figures_dir=tmp_path / "figures", page=page, readme=tmp_path / "README.md",
                         bootstrap_reps=50)  # fmt: skip
    assert plot.main(args) == 0
    text = page.read_text()
    # 50k: seed 1's result file (600, not its log's 9999) and seed 2's 300: IQM of two is their mean, and the
    # 15th/85th percentiles are 300 + 0.15 * 300 and 300 + 0.85 * 300. 100k: only seed 1 got there.
    assert f"| {env} | crossq | 450 [345, 555] (2) | 900 [900, 900] (1) | — |" in text
    assert "`python crossq_jax.py --critic-width 256 --env-id ENV --seed SEED`" in text
    assert "stopped before their last step, read from the output they printed" in text and ": 1 runs" in text
    assert "aggregate" not in text  # no paper reference for a DMC task: nothing to normalise by
