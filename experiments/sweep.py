"""Run a grid of training runs (script x env x seed x flags) and keep each finished run's results.

    python experiments/sweep.py experiments/grids/mujoco_cpu.toml --workers 1
    python experiments/sweep.py experiments/grids/mujoco_cpu.toml --algos crossq sac --status
    python experiments/sweep.py experiments/grids/mujoco_cpu.toml --launcher slurm --partition cpu --time-min 120

A grid file (TOML) names the envs, the seeds, flags common to every run and, per algorithm, the
command (a script of this repository, a preset word, flags). Each cell of the grid is one run of
the unchanged script, in its own folder `{work_dir}/{algo}/{env}/seed{seed}/` (its `runs/`, its
`log.txt`). Cells run seed by seed, so that every env has a first seed before any has a third.

The sweep is restartable: a cell whose result file exists is skipped; a cell that stopped (killed,
preempted, a session that ended) continues from its last checkpoint with `--resume` (give the
grid a `--checkpoint-freq`); a cell that failed (exit 1 or 2: diverged, refused) is not retried
unless `--retry-failed`. When a run finishes, its evaluation curve goes to
`{results_dir}/{algo}/{env}/seed{seed}.json` (small, meant to be committed) with the command, the
commit of the scripts and the machine beside it.

On a SLURM cluster (`--launcher slurm`, needs `pip install -r requirements-experiments.txt`), the cells
to run go out as one job array through submitit, one array task per cell, in the same folders (which
must be on a file system the nodes share). A task that reaches its time limit, or is preempted, stops
its run with a checkpoint and is requeued; the requeued task continues the run with `--resume`.
"""

from __future__ import annotations

import dataclasses
import datetime
import importlib.metadata
import json
import os
import platform
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Literal

import tyro

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]
EXIT_FAILED = {1, 2}  # the scripts' exit codes for a diverged run and a refused command line
# What a result depends on besides the scripts: their versions go into every result file.
PACKAGES = ("jax", "jaxlib", "flax", "optax", "numpy", "mujoco", "gymnasium")


@dataclasses.dataclass
class SweepArgs:
    grid: tyro.conf.Positional[Path]
    """the grid file (TOML), e.g. experiments/grids/mujoco_cpu.toml"""
    algos: list[str] | None = None
    """run only these algorithms of the grid (default: all, in the grid's order)"""
    envs: list[str] | None = None
    """run only these envs of the grid"""
    seeds: list[int] | None = None
    """run only these seeds of the grid"""
    work_dir: Path | None = None
    """where the runs, logs and checkpoints go (default: sweeps/{grid name} in the current folder)"""
    results_dir: Path | None = None
    """where finished runs' result files go (default: experiments/results/{grid name} of this repository)"""
    workers: int = 1
    """runs at a time on this machine (each JAX run uses every core it gets: on 2 cores, 1 is right)"""
    retry_failed: bool = False
    """run again the cells whose last attempt exited with 1 (diverged) or 2 (refused)"""
    status: bool = False
    """print the state of every cell and exit without running anything"""
    progress_every: float = 60.0
    """seconds between progress lines"""
    launcher: Literal["local", "slurm"] = "local"
    """run the cells here (`workers` at a time), or as one SLURM job array through submitit"""
    partition: str | None = None
    """SLURM: the partition (default: the cluster's default partition)"""
    time_min: int = 60
    """SLURM: the time limit of each task in minutes; at the limit a run checkpoints and its task is requeued"""
    max_timeouts: int = 10
    """SLURM: how often a task may reach its time limit and be requeued (preemptions do not count)"""
    cpus_per_task: int = 2
    """SLURM: cores per task (one run: JAX uses all it gets)"""
    mem_gb: float | None = None
    """SLURM: memory per task in GB (default: the cluster's default)"""
    array_parallelism: int = 64
    """SLURM: array tasks running at a time"""


@dataclasses.dataclass(frozen=True)
class Cell:
    """One run of the grid."""

    algo: str
    env: str
    seed: int
    command: tuple[str, ...]  # script, preset word and flags, without --env-id and --seed

    @property
    def env_folder(self) -> str:
        """The env id as one folder name, `/` as `-` as in the scripts' run names: `dm_control/reacher-easy-v0`
        is `dm_control-reacher-easy-v0`."""
        return self.env.replace("/", "-")

    @property
    def name(self) -> str:
        return f"{self.algo}/{self.env_folder}/seed{self.seed}"

    def argv(self) -> list[str]:
        script, *rest = self.command
        return [sys.executable, str(REPO / script), *rest, "--env-id", self.env, "--seed", str(self.seed)]


def load_grid(path: Path, algos=None, envs=None, seeds=None) -> tuple[str, list[Cell]]:
    """The grid's name and its cells, seed by seed, then env, then algorithm."""
    with open(path, "rb") as f:
        grid = tomllib.load(f)
    for field in ("name", "envs", "seeds", "algos"):
        if field not in grid:
            raise SystemExit(f"error: {path} has no `{field}`")
    unknown = sorted(set(algos or []) - set(grid["algos"]))
    if unknown:
        raise SystemExit(f"error: {path} has no algorithm {unknown[0]!r} (it has {', '.join(grid['algos'])})")
    common = shlex.split(grid.get("flags", ""))
    cells = []
    for seed in grid["seeds"]:
        for env in grid["envs"]:
            for algo, spec in grid["algos"].items():
                if (algos and algo not in algos) or (envs and env not in envs) or (seeds and seed not in seeds):
                    continue
                command = shlex.split(spec["command"])
                if not (REPO / command[0]).is_file():
                    raise SystemExit(f"error: {path}: algos.{algo} runs {command[0]}, which is not a script here")
                cells.append(Cell(algo, env, int(seed), (*command, *common)))
    return grid["name"], cells


# --- one cell: its folder, its state, its run -------------------------------------------------
def cell_dir(work_dir: Path, cell: Cell) -> Path:
    return work_dir / cell.algo / cell.env_folder / f"seed{cell.seed}"


def result_file(results_dir: Path, cell: Cell) -> Path:
    return results_dir / cell.algo / cell.env_folder / f"seed{cell.seed}.json"


def latest_run(folder: Path) -> Path | None:
    runs = sorted((folder / "runs").glob("*/"), key=lambda p: p.stat().st_mtime) if (folder / "runs").exists() else []
    return runs[-1] if runs else None


def cell_state(work_dir: Path, results_dir: Path, cell: Cell) -> str:
    """done, failed, stopped (a checkpoint to resume from) or pending."""
    if result_file(results_dir, cell).exists():
        return "done"
    folder = cell_dir(work_dir, cell)
    if (folder / "failed").exists():
        return "failed"
    run = latest_run(folder)
    if run is not None and (run / "checkpoint.npz").exists():
        return "stopped"
    return "pending"


def start_cell(work_dir: Path, results_dir: Path, cell: Cell, in_slurm_task: bool = False) -> subprocess.Popen:
    """Start (or continue from its checkpoint) the cell's run in its own folder; output to log.txt."""
    folder = cell_dir(work_dir, cell)
    argv = cell.argv()
    if cell_state(work_dir, results_dir, cell) == "stopped":
        argv += ["--resume", str(latest_run(folder))]
    else:  # a fresh start: what an attempt left without a checkpoint goes, so the folder holds one run
        shutil.rmtree(folder / "runs", ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "failed").unlink(missing_ok=True)
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONUNBUFFERED": "1"}
    # Local: a session of its own, so that a Ctrl-C in the sweep's terminal reaches only the sweep (which passes
    # on SIGTERM). SLURM task: the task's process group, so that the cluster's SIGTERM (preemption, scancel)
    # reaches the run whatever the cluster's process tracking; USR2 (submitit's time-limit signal) is the task's.
    ignore_usr2 = lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    how = {"preexec_fn": ignore_usr2} if in_slurm_task else {"start_new_session": True}
    with open(folder / "log.txt", "a") as log:  # the run writes to its own copy of the file descriptor
        log.write(f"\n# {datetime.datetime.now().isoformat(timespec='seconds')} $ {shlex.join(argv)}\n")
        log.flush()
        return subprocess.Popen(argv, cwd=folder, stdout=log, stderr=subprocess.STDOUT, env=env, **how)


def finish_cell(work_dir: Path, results_dir: Path, cell: Cell, returncode: int, provenance: dict) -> str:
    """Record how a run ended: its result file when it finished, a `failed` marker when it failed."""
    folder = cell_dir(work_dir, cell)
    if returncode == 0:
        write_result(result_file(results_dir, cell), cell, latest_run(folder), provenance)
        return "done"
    if returncode in EXIT_FAILED:
        (folder / "failed").write_text(f"exit {returncode}\n")
        return "failed"
    return "stopped"  # a signal: the run checkpointed (SIGTERM) or not (SIGKILL); both resume


def read_curve(run_dir: Path) -> list[dict]:
    """The run's evaluations: env step, mean return, and training seconds (evaluations excluded) so far, which the
    scripts log as `charts/train_seconds` every `--log-freq` steps (a resumed run goes on from its checkpoint's)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})  # purges what a resume superseded
    events.Reload()
    seconds = {e.step: e.value for e in events.Scalars("charts/train_seconds")}
    return eval_curve({e.step: e.value for e in events.Scalars("eval/episodic_return")}, seconds)


def eval_curve(returns: dict[int, float], seconds: dict[int, float]) -> list[dict]:
    """The points of a result file's curve from {step: mean eval return} and {step: training seconds logged there}."""
    return [
        {"step": step, "return": value, "train_seconds": seconds.get(step)} for step, value in sorted(returns.items())
    ]


def write_result(path: Path, cell: Cell, run_dir: Path, provenance: dict) -> None:
    result = {
        "algo": cell.algo,
        "env": cell.env,
        "seed": cell.seed,
        "command": "python " + shlex.join([*cell.command, "--env-id", cell.env, "--seed", str(cell.seed)]),
        **provenance,
        "finished": datetime.datetime.now().isoformat(timespec="seconds"),
        "args": json.loads((run_dir / "args.json").read_text()),
        "eval": read_curve(run_dir),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(path)


def provenance() -> dict:
    """The commit of the scripts (with a note if the tree differs from it), the machine and its GPUs (the runs'
    JAX uses them when its CUDA build is installed), and the versions of the packages the results depend on."""
    git = lambda *a: subprocess.run(["git", "-C", str(REPO), *a], capture_output=True, text=True).stdout.strip()
    scripts = [p.name for p in REPO.glob("*.py")]  # the training scripts, at the top of the repository
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()  # a task's share
    dirty = " with uncommitted changes" if git("status", "--porcelain", *scripts) else ""
    query = ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"]
    gpus = subprocess.run(query, capture_output=True, text=True).stdout.split("\n") if shutil.which(query[0]) else []
    gpus = [name.strip() for name in gpus if name.strip()]
    return {
        "commit": git("rev-parse", "HEAD") + dirty,
        "hardware": f"{cpu or platform.processor()}, {cores} cores, {platform.system()}"
        + (f", {len(gpus)} x {gpus[0]}" if gpus else ""),
        "versions": {name: package_version(name) for name in PACKAGES},
    }


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


# --- progress -------------------------------------------------------------------------------------
def last_progress(work_dir: Path, cell: Cell) -> str:
    """`step N, M SPS` from the last progress line the run printed (`step=N SPS=M ...`)."""
    try:
        lines = (cell_dir(work_dir, cell) / "log.txt").read_text().splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        fields = dict(word.split("=", 1) for word in line.split() if "=" in word)
        if "step" in fields and "SPS" in fields:
            return f"step {fields['step']}, {fields['SPS']} SPS"
    return "starting"


def print_status(work_dir: Path, results_dir: Path, cells: list[Cell], active: dict[Cell, str]) -> None:
    """A line of counts, then one per running cell; `active`: the cells running (or queued on SLURM) now."""
    states = [active.get(cell) or cell_state(work_dir, results_dir, cell) for cell in cells]
    names = [s for s in ("done", "running", "queued", "stopped", "pending", "failed") if s != "queued" or s in states]
    stamp = datetime.datetime.now().strftime("%H:%M:%S")
    print(f"[{stamp}] " + ", ".join(f"{states.count(s)} {s}" for s in names) + f" of {len(cells)}", flush=True)
    for cell, state in active.items():
        if state == "running":
            print(f"    {cell.name}: {last_progress(work_dir, cell)}", flush=True)


# --- the local launcher -------------------------------------------------------------------------
def run_local(args: SweepArgs, work_dir: Path, results_dir: Path, cells: list[Cell]) -> int:
    """Run the cells that need running, `workers` at a time; returns how many failed."""
    todo = [c for c in cells if cell_state(work_dir, results_dir, c) in ("pending", "stopped")]
    if args.retry_failed:
        todo += [c for c in cells if cell_state(work_dir, results_dir, c) == "failed"]
    todo.sort(key=cells.index)
    prov = provenance()
    print(f"sweep: {len(todo)} of {len(cells)} runs to go, {args.workers} at a time; scripts at {prov['commit']}")
    running: dict[Cell, subprocess.Popen] = {}
    stopping: list[int] = []

    def stop(signum, frame):  # pass the signal on: each run checkpoints, and resumes next time
        stopping.append(signum)
        for process in running.values():
            process.send_signal(signal.SIGTERM)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    failed, next_report = 0, 0.0
    while todo or running:
        while todo and len(running) < args.workers and not stopping:
            cell = todo.pop(0)
            running[cell] = start_cell(work_dir, results_dir, cell)
        for cell, process in list(running.items()):
            if process.poll() is not None:
                del running[cell]
                outcome = finish_cell(work_dir, results_dir, cell, process.returncode, prov)
                failed += outcome == "failed"
                print(f"{cell.name}: {outcome} (exit {process.returncode})", flush=True)
        if stopping and not running:
            print(f"sweep stopped by {signal.Signals(stopping[0]).name}; run the same command to continue")
            return 128 + stopping[0]
        if time.monotonic() >= next_report:
            print_status(work_dir, results_dir, cells, dict.fromkeys(running, "running"))
            next_report = time.monotonic() + args.progress_every
        time.sleep(1.0)
    print_status(work_dir, results_dir, cells, {})
    return 1 if failed else 0


# --- the SLURM launcher (submitit) -----------------------------------------------------------------
@dataclasses.dataclass
class CellTask:
    """What one array task runs: the cell's run, started or continued from its checkpoint, then its result.

    Time limit: submitit's USR2 (90 s before) calls `checkpoint()`, which stops the run with SIGTERM
    (the scripts write a checkpoint, then exit) and hands submitit a fresh CellTask to requeue; that
    task continues the run with `--resume`. Preemption (SIGTERM to every process of the job, then a
    requeue by SLURM): the run gets the SIGTERM itself, and the requeued task continues it the same way.
    """

    work_dir: Path
    results_dir: Path
    cell: Cell

    def __call__(self) -> str:
        state = cell_state(self.work_dir, self.results_dir, self.cell)
        if state in ("done", "failed"):  # recorded before this task was requeued
            return state
        self.outcome: str | None = None
        self.got_sigterm = False
        signal.signal(signal.SIGTERM, self.note_sigterm)  # (submitit's handler only logs it)
        self.process = start_cell(self.work_dir, self.results_dir, self.cell, in_slurm_task=True)
        while self.process.poll() is None:
            time.sleep(1.0)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR2})  # a USR2 now waits until the outcome is kept
        try:
            return self.finish()
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGUSR2})

    def note_sigterm(self, signum, frame) -> None:
        self.got_sigterm = True  # the cluster signals the whole job: the run got it too

    def finish(self) -> str:
        if self.outcome is None:
            returncode = self.process.returncode
            self.outcome = finish_cell(self.work_dir, self.results_dir, self.cell, returncode, provenance())
            print(f"{self.cell.name}: {self.outcome} (exit {returncode})", flush=True)
        return self.outcome

    def checkpoint(self):
        """submitit's hook on USR2: stop the run with a checkpoint; what to requeue."""
        import submitit

        if getattr(self, "process", None) is not None:
            if self.process.poll() is None and not self.got_sigterm:
                self.process.send_signal(signal.SIGTERM)  # once: a second one means "exit without a checkpoint"
            while self.process.poll() is None:
                time.sleep(0.5)
            self.finish()
        return submitit.helpers.DelayedSubmission(CellTask(self.work_dir, self.results_dir, self.cell))


def slurm_jobs(work_dir: Path, cells: list[Cell]) -> dict[Cell, str]:
    """The cells whose array task is in the SLURM queue, and its state there: running or queued."""
    markers = {cell: cell_dir(work_dir, cell) / "slurm_job" for cell in cells}
    job_ids = {path.read_text().strip(): cell for cell, path in markers.items() if path.exists()}
    if not job_ids or shutil.which("squeue") is None:
        return {}
    # (Not `--jobs`: squeue refuses a list that names a job it has forgotten.)
    squeue = ["squeue", "--me", "--array", "--noheader", "--format=%i %T"]
    lines = subprocess.run(squeue, capture_output=True, text=True).stdout.splitlines()
    active = {}
    for job_id, state in (line.split() for line in lines if line.strip()):
        if job_id in job_ids:
            active[job_ids[job_id]] = "running" if state in ("RUNNING", "COMPLETING", "CONFIGURING") else "queued"
    return active


def run_slurm(args: SweepArgs, name: str, work_dir: Path, results_dir: Path, cells: list[Cell]) -> int:
    """Submit the cells that need running (and are not in the queue) as one job array, then watch it."""
    import submitit  # only this launcher needs it: pip install -r requirements-experiments.txt

    queued = slurm_jobs(work_dir, cells)
    wanted = ("pending", "stopped", "failed") if args.retry_failed else ("pending", "stopped")
    todo = [c for c in cells if c not in queued and cell_state(work_dir, results_dir, c) in wanted]
    if todo:
        executor = submitit.SlurmExecutor(folder=work_dir / "slurm" / "%j", max_num_timeout=args.max_timeouts)
        options = {"partition": args.partition, "mem": f"{round(args.mem_gb * 1024)}M" if args.mem_gb else None}
        executor.update_parameters(
            job_name=f"sweep-{name}",
            time=args.time_min,
            cpus_per_task=args.cpus_per_task,
            array_parallelism=args.array_parallelism,
            **{key: value for key, value in options.items() if value is not None},
        )
        for cell in todo:  # (a retried cell's marker goes now: inside a task, `failed` means "this time")
            cell_dir(work_dir, cell).mkdir(parents=True, exist_ok=True)
            (cell_dir(work_dir, cell) / "failed").unlink(missing_ok=True)
        jobs = executor.submit_array([CellTask(work_dir, results_dir, cell) for cell in todo])
        for cell, job in zip(todo, jobs, strict=True):
            (cell_dir(work_dir, cell) / "slurm_job").write_text(job.job_id + "\n")
        print(f"sweep: job array {jobs[0].job_id.split('_')[0]} submitted", flush=True)
    print(
        f"sweep: {len(todo)} of {len(cells)} runs submitted, {len(queued)} in the queue already "
        "(Ctrl-C stops the watching, not the jobs)",
        flush=True,
    )
    next_report = 0.0
    try:
        while active := slurm_jobs(work_dir, cells):
            if time.monotonic() >= next_report:
                print_status(work_dir, results_dir, cells, active)
                next_report = time.monotonic() + args.progress_every
            time.sleep(min(5.0, args.progress_every))
    except KeyboardInterrupt:
        print("\nstopped watching; the jobs go on (`--status` shows them)")
        return 0
    print_status(work_dir, results_dir, cells, {})
    return 0 if all(cell_state(work_dir, results_dir, c) == "done" for c in cells) else 1


def main(args: SweepArgs) -> int:
    name, cells = load_grid(args.grid, args.algos, args.envs, args.seeds)
    work_dir = (args.work_dir or Path("sweeps") / name).resolve()
    results_dir = (args.results_dir or REPO / "experiments" / "results" / name).resolve()
    if args.status:
        active = slurm_jobs(work_dir, cells)
        print_status(work_dir, results_dir, cells, active)
        for cell in cells:
            print(f"    {cell.name}: {active.get(cell) or cell_state(work_dir, results_dir, cell)}")
        return 0
    if args.launcher == "slurm":
        return run_slurm(args, name, work_dir, results_dir, cells)
    return run_local(args, work_dir, results_dir, cells)


if __name__ == "__main__":
    sys.exit(main(tyro.cli(SweepArgs)))
