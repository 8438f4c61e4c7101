"""experiments/sweep.py on a tiny grid: run here (stopped mid-run, continued, finished cells skipped), and
on a real one-node SLURM cluster that the test starts itself (each run stopped once, and still finished)."""

import importlib.metadata
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from conftest import REPO, script_env

sys.path.insert(0, str(REPO / "experiments"))
import sweep  # (experiments/ is no package: found through sys.path)

SWEEP = REPO / "experiments" / "sweep.py"
# Two evaluations (at 300 and 600) and a checkpoint at 300, from which a stopped run continues.
TINY_RUN = (
    "--critic-width 32 --actor-width 32 --total-timesteps 600 --learning-starts 300 "
    "--eval-freq 300 --eval-episodes 1 --log-freq 100 --checkpoint-freq 300"
)


def write_grid(folder: Path, seeds: list[int]) -> Path:
    grid = folder / "grid.toml"
    grid.write_text(
        f'name = "tiny"\nenvs = ["Pendulum-v1"]\nseeds = {seeds}\nflags = "{TINY_RUN}"\n\n'
        '[algos.crossq]\ncommand = "crossq_jax.py"\n'
    )
    return grid


def sweep_command(folder: Path, *flags: str) -> list[str]:
    grid = folder / "grid.toml"
    return [sys.executable, str(SWEEP), str(grid), "--work-dir", str(folder / "work"),
            "--results-dir", str(folder / "results"), "--progress-every", "2", *flags]  # fmt: skip


def cell_folder(folder: Path, seed: int) -> Path:
    return folder / "work" / "crossq" / "Pendulum-v1" / f"seed{seed}"


def result_file(folder: Path, seed: int) -> Path:
    return folder / "results" / "crossq" / "Pendulum-v1" / f"seed{seed}.json"


def has_checkpoint(folder: Path, seed: int) -> bool:
    return any((cell_folder(folder, seed) / "runs").glob("*/checkpoint.npz"))


def wait_for(condition, what: str, sweep: subprocess.Popen, timeout: float = 600) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if sweep.poll() is not None:
            pytest.fail(f"the sweep ended (exit {sweep.returncode}) before {what}:\n{sweep.stdout.read()}")
        if time.monotonic() > deadline:
            sweep.kill()
            pytest.fail(f"no {what} after {timeout} s:\n{sweep.stdout.read()}")
        time.sleep(0.2)


def run_pid(folder: Path, seed: int) -> int:
    """The pid of the cell's run: the crossq_jax.py process whose working folder is the cell's (Linux /proc)."""
    cell = cell_folder(folder, seed).resolve()
    for proc in Path("/proc").iterdir():
        try:
            if (
                proc.name.isdigit()
                and (proc / "cwd").resolve() == cell
                and b"crossq_jax.py" in (proc / "cmdline").read_bytes()
            ):
                return int(proc.name)
        except OSError:  # gone meanwhile, or not ours to read
            continue
    pytest.fail(f"no run of seed {seed} in {cell}: it finished before the test could stop it")


def proc_status(pid: int) -> dict[str, str] | None:
    """The fields of /proc/{pid}/status (Linux), or None when the process is gone."""
    try:
        lines = Path(f"/proc/{pid}/status").read_text().splitlines()
    except FileNotFoundError:
        return None
    return dict(line.split(":\t", 1) for line in lines if ":\t" in line)


def pause_at_checkpoints(folder: Path, seeds: list[int], sweep: subprocess.Popen) -> dict[int, int]:
    """SIGSTOP each seed's run as soon as its first checkpoint exists, whichever comes first, so that no run
    reaches its end before the test has stopped it (a tiny run needs only seconds from there). Returns once
    every run has stopped: a SIGTERM sent earlier could be taken before the SIGSTOP (the kernel delivers the
    lower-numbered signal first) and leave a stopped run that has seen its SIGTERM."""
    paused: dict[int, int] = {}

    def pause_new() -> bool:
        for seed in seeds:
            if seed not in paused and has_checkpoint(folder, seed):
                paused[seed] = run_pid(folder, seed)
                os.kill(paused[seed], signal.SIGSTOP)
        states = [proc_status(pid) for pid in paused.values()]
        return len(paused) == len(seeds) and all(s is not None and s["State"].startswith("T") for s in states)

    wait_for(pause_new, f"stopped runs of seeds {seeds} at their checkpoints", sweep)
    return paused


def continue_when_sigterm_waits(pid: int, timeout: float = 60) -> None:
    """SIGCONT to a paused run once a SIGTERM is pending for it, so that it acts on that SIGTERM first thing
    (at once if something else, such as SLURM, has continued it already)."""
    deadline = time.monotonic() + timeout
    signalled = False
    while not signalled and time.monotonic() < deadline:
        if (status := proc_status(pid)) is None:  # it ended
            return
        pending = int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)
        signalled = bool(pending & (1 << (signal.SIGTERM - 1))) or not status["State"].startswith("T")
        time.sleep(0.1)
    os.kill(pid, signal.SIGCONT)  # also when the test fails below: no paused process is left behind
    assert signalled, f"no SIGTERM reached the paused run (pid {pid}) in {timeout} s"


def check_finished_after_one_stop(folder: Path, seed: int) -> None:
    """The cell's result file holds both evaluations of the whole run, which started once and continued once."""
    result = json.loads(result_file(folder, seed).read_text())
    assert [e["step"] for e in result["eval"]] == [300, 600]
    assert all(math.isfinite(e["return"]) and e["train_seconds"] > 0 for e in result["eval"])
    assert result["eval"][0]["train_seconds"] < result["eval"][1]["train_seconds"]  # counted across the stop
    assert (result["algo"], result["env"], result["seed"]) == ("crossq", "Pendulum-v1", seed)
    assert result["command"] == f"python crossq_jax.py {TINY_RUN} --env-id Pendulum-v1 --seed {seed}"
    assert result["args"]["seed"] == seed and result["args"]["total_timesteps"] == 600
    assert len(result["commit"]) >= 40 and "cores" in result["hardware"]
    assert result["versions"]["jax"] == importlib.metadata.version("jax")  # the runs' python is the sweep's
    starts = [line for line in (cell_folder(folder, seed) / "log.txt").read_text().splitlines() if " $ " in line]
    assert len(starts) == 2 and "--resume" not in starts[0] and "--resume" in starts[1], starts


def test_local_sweep_stops_continues_and_skips_finished_cells(tmp_path):
    write_grid(tmp_path, [1, 2])
    kept = result_file(tmp_path, 2)  # seed 2 finished in an earlier sweep: left alone
    kept.parent.mkdir(parents=True)
    kept.write_text('{"finished": "earlier"}\n')

    sweep = subprocess.Popen(sweep_command(tmp_path), env=script_env(), stdout=subprocess.PIPE, text=True)
    (paused,) = pause_at_checkpoints(tmp_path, [1], sweep).values()
    sweep.send_signal(signal.SIGTERM)  # as `kill` or the end of a session would: passed on to the run
    continue_when_sigterm_waits(paused)
    output = sweep.communicate(timeout=120)[0]
    assert sweep.returncode == 128 + signal.SIGTERM, output
    assert "1 of 2 runs to go" in output
    assert not result_file(tmp_path, 1).exists()

    again = subprocess.run(sweep_command(tmp_path), env=script_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "1 of 2 runs to go" in again.stdout
    check_finished_after_one_stop(tmp_path, 1)
    assert kept.read_text() == '{"finished": "earlier"}\n'

    done = subprocess.run(sweep_command(tmp_path), env=script_env(), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "0 of 2 runs to go" in done.stdout, done.stdout + done.stderr


# --- a real SLURM cluster ---------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def slurm_conf(folder: Path, munge_socket: Path) -> str:
    """A one-node cluster on localhost, run as root, with every file of its daemons in `folder`."""
    host = socket.gethostname().split(".")[0]
    # Not to wait minutes for a requeued job: cred_expire is also how long it waits before it may start
    # again (default 120 s), and sched_interval how often the scheduler looks at the queue (default 60 s).
    # KillWait: from SIGTERM to SIGKILL, time enough for a run to finish its step (even a compilation on a
    # loaded machine) and write its checkpoint.
    return f"""ClusterName=sweeptest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={munge_socket},cred_expire=10
StateSaveLocation={folder}/state
SlurmdSpoolDir={folder}/spool
SlurmctldPidFile={folder}/slurmctld.pid
SlurmdPidFile={folder}/slurmd.pid
SlurmctldLogFile={folder}/slurmctld.log
SlurmdLogFile={folder}/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/builtin
SchedulerParameters=sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
KillWait=120
NodeName={host} NodeAddr=127.0.0.1 CPUs={os.cpu_count()} RealMemory=1000 State=UNKNOWN
PartitionName=test Nodes={host} Default=YES MaxTime=INFINITE State=UP
"""


@pytest.fixture(scope="module")
def slurm_cluster():
    """A one-node SLURM cluster on localhost: munged, slurmctld and slurmd from Debian's packages, each with
    its files in a temp folder. Yields the environment of its client commands; stops what it started."""
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin"])
    tools = {name: shutil.which(name, path=path) for name in ("munged", "slurmctld", "slurmd", "sbatch")}
    problems = [f"{name} is missing" for name, where in tools.items() if where is None]
    problems += [] if os.geteuid() == 0 else ["slurmd needs root"]
    try:
        import submitit  # noqa: F401
    except ImportError:
        problems.append("submitit is missing (pip install -r requirements-experiments.txt)")
    if problems:
        message = "no SLURM cluster: " + "; ".join(problems) + " (apt-get install slurm-wlm munge)"
        if os.environ.get("CI"):
            pytest.fail(message + "; CI must run this test")
        pytest.skip(message)

    # Not under pytest's temp folder: munged wants every folder above its socket reachable by all.
    folder = Path(tempfile.mkdtemp(prefix="sweep-slurm-"))
    folder.chmod(0o755)
    (folder / "state").mkdir()
    (folder / "spool").mkdir()
    key, munge_socket = folder / "munge.key", folder / "munge.sock"
    key.write_bytes(os.urandom(128))
    key.chmod(0o400)
    (folder / "slurm.conf").write_text(slurm_conf(folder, munge_socket))
    env = {**os.environ, "SLURM_CONF": str(folder / "slurm.conf")}
    munged = [tools["munged"], f"--key-file={key}", f"--socket={munge_socket}", f"--pid-file={folder}/munged.pid",
              f"--log-file={folder}/munged.log", f"--seed-file={folder}/munged.seed"]  # fmt: skip
    node_state = lambda: subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout
    try:
        subprocess.run(munged, check=True)
        subprocess.run([tools["slurmctld"], "-i"], env=env, check=True)
        subprocess.run([tools["slurmd"]], env=env, check=True)
        deadline = time.monotonic() + 60
        while node_state().strip() != "idle":
            assert time.monotonic() < deadline, (folder / "slurmctld.log").read_text()
            time.sleep(0.5)
        yield env
    finally:  # the jobs first (a daemon stopped under a running job leaves its slurmstepd behind)
        slurm = lambda *command: subprocess.run(command, env=env, capture_output=True, text=True).stdout.split()
        if jobs := slurm("squeue", "--noheader", "--format=%A"):
            slurm("scancel", *jobs)
            deadline = time.monotonic() + 60
            while slurm("squeue", "--noheader") and time.monotonic() < deadline:
                time.sleep(1)
        slurm("scontrol", "shutdown")
        for daemon in ("slurmd", "slurmctld", "munged"):
            stop_daemon(folder / f"{daemon}.pid")
        shutil.rmtree(folder, ignore_errors=True)


def stop_daemon(pid_file: Path) -> None:
    """SIGTERM to the daemon whose pid the file holds; SIGKILL if it is still there 10 s later."""
    if not pid_file.exists():
        return
    pid = int(pid_file.read_text())
    try:
        os.kill(pid, signal.SIGTERM)
        for _ in range(100):
            time.sleep(0.1)
            os.kill(pid, 0)
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_slurm_sweep_finishes_every_run_through_preemption_and_time_limit(slurm_cluster, tmp_path):
    write_grid(tmp_path, [1, 2])
    env = script_env(slurm_cluster)
    command = sweep_command(tmp_path, "--launcher", "slurm", "--cpus-per-task", "1", "--time-min", "10")
    sweep = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
    job_of = lambda seed: (cell_folder(tmp_path, seed) / "slurm_job").read_text().strip()
    try:
        paused = pause_at_checkpoints(tmp_path, [1, 2], sweep)
        # Seed 1 is preempted as a cluster with PreemptMode=REQUEUE does it: SIGTERM to every process of
        # the job, which SLURM then puts back in the queue.
        subprocess.run(["scontrol", "requeue", job_of(1)], env=env, check=True)
        # Seed 2 nears its time limit: SLURM sends the USR2 that submitit asked for (--signal=USR2@90);
        # the task stops its run with a checkpoint and requeues itself.
        subprocess.run(["scancel", "--signal=USR2", job_of(2)], env=env, check=True)
        for pid in paused.values():
            continue_when_sigterm_waits(pid)
        output = sweep.communicate(timeout=600)[0]
    finally:
        if sweep.poll() is None:
            sweep.kill()
    assert sweep.returncode == 0, output
    assert "2 done" in output.splitlines()[-1], output
    tasks_output = "".join(path.read_text() for path in (tmp_path / "work" / "slurm").glob("*/*_log.out"))
    for seed in (1, 2):
        check_finished_after_one_stop(tmp_path, seed)
        # Each stop was the script's own: checkpoint on SIGTERM, exit 128 + 15 (USR2 would kill it outright).
        assert f"crossq/Pendulum-v1/seed{seed}: stopped (exit 143)" in tasks_output, tasks_output
    again = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and "0 of 2 runs submitted" in again.stdout, again.stdout + again.stderr


def test_a_dmc_env_id_is_one_folder_of_the_cell(tmp_path):
    """`dm_control/reacher-easy-v0` names one folder level, as the training scripts name their runs, so that
    the cell's run folder and result file sit where plot.py reads {algo}/{env}/seed{seed}; the run still
    gets the env id itself."""
    grid = tmp_path / "grid.toml"
    grid.write_text(
        'name = "dmc"\nenvs = ["dm_control/reacher-easy-v0"]\nseeds = [3]\n[algos.crossq]\ncommand = "crossq_jax.py"\n'
    )
    (cell,) = sweep.load_grid(grid)[1]
    assert sweep.cell_dir(tmp_path, cell) == tmp_path / "crossq" / "dm_control-reacher-easy-v0" / "seed3"
    assert sweep.result_file(tmp_path, cell) == tmp_path / "crossq" / "dm_control-reacher-easy-v0" / "seed3.json"
    assert cell.argv()[-4:] == ["--env-id", "dm_control/reacher-easy-v0", "--seed", "3"]
