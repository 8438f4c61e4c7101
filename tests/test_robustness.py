"""Nothing lost, nothing misblamed: the end of a run, files that fail to write, signals during the start-up, the envs
the checks let through, and command lines that do not parse. Every script gets every test. (Refusals of flags are
in test_refusals.py, of checkpoints and edited files in test_checkpointing.py, envs that return NaN/inf in
test_scripts.py.)"""

import dataclasses
import errno
import os
import re
import signal
import warnings

import gymnasium as gym
import jax
import numpy as np
import pytest
from conftest import SCRIPTS, module_of, run_dirs, run_main_with_each, run_script, start_script

TINY = {"env_id": "Pendulum-v1", "critic_width": 16, "actor_width": 16, "batch_size": 32, "buffer_size": 1000}
TINY |= {"learning_starts": 100, "eval_freq": 0, "eval_episodes": 1, "log_freq": 100}


def tiny_args(script: str, **overrides):
    return dataclasses.replace(module_of(script).Args(), **TINY, **overrides)


# ---------------------------------------------------------------------------------------------
# The end of a run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_during_the_final_evaluation_still_leaves_the_model_and_a_checkpoint(script, tmp_path, monkeypatch):
    """SIGTERM while the last evaluation runs: the evaluation and the model are finished and a checkpoint is written
    (nothing else is left to do). Then, with the model lost, the checkpoint resumes only to write it again."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    real_evaluate = module.evaluate

    def evaluate_interrupted(*inputs):
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler takes it: it only marks the run to stop
        return real_evaluate(*inputs)

    monkeypatch.setattr(module, "evaluate", evaluate_interrupted)
    result = module.train(tiny_args(script, total_timesteps=200, save_model=True))
    (run_dir,) = run_dirs(tmp_path)
    model = run_dir / f"{module.Args().exp_name}{module.MODEL_SUFFIX}"
    assert np.isfinite(result["eval_return"]) and model.exists()
    assert module.read_checkpoint(str(run_dir), with_arrays=False)[1]["global_step"] == 200
    monkeypatch.setattr(module, "evaluate", real_evaluate)

    model.unlink()  # as if the process had died while writing it
    assert module.train(module.parse_args(["--resume", str(run_dir)]))["eval_return"] == result["eval_return"]
    assert model.exists()
    with pytest.raises(module.ConfigError, match="run is complete at env step 200"):
        module.train(module.parse_args(["--resume", str(run_dir)]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_write_that_fails_is_one_line_and_leaves_no_partial_file(script, tmp_path, monkeypatch):
    """A full disk while the model, a checkpoint or the TensorBoard events are written: one line naming the file and
    the reason, the earlier file (or none) in place, no temporary file left."""
    module = module_of(script)
    args = tiny_args(script)
    agent = module.create_agent(args, 3, 1, jax.random.PRNGKey(0))
    module.save_model(agent, str(tmp_path), "good")
    good = (tmp_path / f"good{module.MODEL_SUFFIX}").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(module.os, "fsync", full_disk)
    with pytest.raises(module.ConfigError, match=r"cannot write the model .*good\.crossq_model: No space left"):
        module.save_model(agent, str(tmp_path), "good")
    with pytest.raises(module.ConfigError, match=r"cannot write checkpoint .*checkpoint\.npz: No space left"):
        module.write_checkpoint(str(tmp_path / "checkpoint.npz"), {"x": np.zeros(3)}, {"script": "x"})
    assert (tmp_path / f"good{module.MODEL_SUFFIX}").read_bytes() == good
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"good{module.MODEL_SUFFIX}"]
    monkeypatch.undo()

    writer = module.SummaryWriter(str(tmp_path / "events"))
    monkeypatch.setattr(writer._writer, "add_event", full_disk)
    with pytest.raises(module.ConfigError, match=r"cannot write TensorBoard events to .*events: No space left"):
        writer.add_scalar("charts/SPS", 1.0, 1)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_training_clock_leaves_out_pauses_goes_on_from_a_checkpoint_and_estimates_the_time_left(
    script, monkeypatch
):
    """SPS and a checkpoint's train_seconds count training only: a resumed run's 50 s, then 10 s of training, a
    30 s pause (an evaluation), 5 s more: 65 s. The ETA extrapolates the pace since the first learning line."""
    module = module_of(script)
    now = [1000.0]
    monkeypatch.setattr(module.time, "perf_counter", lambda: now[0])
    clock = module.TrainClock(total_steps=1000, seconds_so_far=50.0)
    now[0] += 7.0  # the start-up (compiling) before training() starts the clock
    clock.start()
    now[0] += 10.0
    with clock.paused():
        assert clock.trained == 60.0
        now[0] += 30.0
    now[0] += 5.0
    assert clock.seconds() == 65.0
    assert clock.eta(100, learning=False) == "?" and clock.eta(200, learning=True) == "?"  # random actions; the mark
    now[0] += 90.0  # 100 steps in 90 s: 700 steps to go
    assert clock.eta(300, learning=True) == "0:10:30"
    assert clock.eta(1000, learning=True) == "0:00:00"


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_resumed_run_prints_the_last_episodes_return_not_nan(script, tmp_path, capsys, monkeypatch):
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    module.train(tiny_args(script, total_timesteps=300, checkpoint_freq=300))
    (run_dir,) = run_dirs(tmp_path)
    capsys.readouterr()
    module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "400"]))
    (progress,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=400 SPS=")]
    assert "episodic_return=nan" not in progress and "episodic_return=-" in progress, progress


# ---------------------------------------------------------------------------------------------
# The envs the checks let through: any Box action space of rank 1 with finite bounds; observations
# flattened into a vector, or refused
# ---------------------------------------------------------------------------------------------


class Spaces(gym.Env):
    """An env of the given spaces, observing samples of its observation space: what the checks see."""

    def __init__(self, observation_space, action_space):
        self.observation_space, self.action_space = observation_space, action_space

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return self.observation_space.sample(), {}

    def step(self, action):
        return self.observation_space.sample(), 0.0, False, False, {}


VECTOR = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
ENVS = {  # id: (observation space, action space, what the one-line refusal says or the (obs, action) sizes)
    "MatrixActions-v0": (VECTOR, gym.spaces.Box(-1, 1, (2, 2), np.float32), "has actions of shape (2, 2)"),
    "ScalarActions-v0": (VECTOR, gym.spaces.Box(-1, 1, (), np.float32), "has actions of shape ()"),
    "NoActions-v0": (VECTOR, gym.spaces.Box(-1, 1, (0,), np.float32), "has actions of shape (0,)"),
    "FlatBounds-v0": (VECTOR, gym.spaces.Box(np.float32(1), np.float32(1), (2,)), "low >= high"),
    "NoObservations-v0": (gym.spaces.Box(-1, 1, (0,), np.float32), VECTOR, "has empty observations"),
    "GraphObservations-v0": (
        gym.spaces.Graph(gym.spaces.Box(-1, 1, (2,)), None),
        VECTOR,
        "which do not flatten into a vector",
    ),
    "ImageObservations-v0": (gym.spaces.Box(0, 255, (4, 5, 3), np.uint8), VECTOR, (60, 3)),
    "DictObservations-v0": (gym.spaces.Dict(a=VECTOR, b=gym.spaces.Box(-1, 1, (), np.float32)), VECTOR, (4, 3)),
}
for env_id, (observations, actions, _) in ENVS.items():
    gym.register(env_id, entry_point=Spaces, kwargs={"observation_space": observations, "action_space": actions})


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("env_id", ENVS)
def test_an_env_either_runs_on_flattened_observations_or_is_refused_in_one_line(script, env_id):
    module, expected = module_of(script), ENVS[env_id][2]
    if isinstance(expected, str):
        with pytest.raises(module.ConfigError, match=re.escape(expected)) as error:
            module.check_env(env_id)
        assert "\n" not in str(error.value) and env_id in str(error.value)
    else:
        assert module.check_env(env_id) == expected
        env = module.make_env(env_id, 0)()
        assert env.reset(seed=0)[0].shape == (expected[0],)
        assert env.step(np.zeros(expected[1], np.float32))[0].shape == (expected[0],)


# ---------------------------------------------------------------------------------------------
# Signals while the first programs compile; command lines and platforms that cannot run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_while_the_first_programs_compile_waits_for_a_safe_point(script, tmp_path, monkeypatch):
    """Python's KeyboardInterrupt, raised inside JAX's compiler, can crash the interpreter at exit (a segfault). The
    scripts take SIGINT/SIGTERM from their start (as `__main__` does here) and stop at the next safe point: before
    training starts (nothing to save), after the episode of --eval-model, after an env step (with a checkpoint)."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    real_create_agent = module.create_agent

    def create_agent_interrupted(*inputs):  # Ctrl-C while the networks' initialisation compiles
        if not module.STOP_SIGNAL:  # once: a second Ctrl-C exits at once (the memory check traces it too)
            os.kill(os.getpid(), signal.SIGINT)
        return real_create_agent(*inputs)

    restore_handlers = module.catch_signals()
    try:
        monkeypatch.setattr(module, "create_agent", create_agent_interrupted)
        with pytest.raises(module.Preempted, match="stopped by SIGINT; before training started, nothing to save"):
            module.train(tiny_args(script, total_timesteps=200, exp_name="interrupted"))
        monkeypatch.setattr(module, "create_agent", real_create_agent)
        model_run_dir = (
            tmp_path / "runs" / module.train(tiny_args(script, total_timesteps=200, save_model=True))["run_name"]
        )
        monkeypatch.setattr(module, "create_agent", create_agent_interrupted)
        with pytest.raises(module.Preempted, match="stopped by SIGINT; before training started"):
            module.evaluate_model(module.parse_args(["--eval-model", str(model_run_dir), "--eval-episodes", "3"]))
    finally:
        restore_handlers()


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_as_the_loop_starts_compiling_exits_with_a_checkpoint_and_no_traceback(script, tmp_path):
    flags = ["--env-id", "Pendulum-v1", "--learning-starts", "32", "--batch-size", "32", "--total-timesteps", "5000"]
    flags += ["--critic-width", "16", "--actor-width", "16", "--buffer-size", "1000", "--eval-freq", "0"]
    process = start_script(script, *flags, cwd=tmp_path)
    for line in process.stdout:  # the loop starts: its first calls compile the store and the update
        if "logging to" in line:
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1].startswith("stopped by SIGINT; "), stderr


PARSE_ERRORS = {  # tyro's error boxes, each as one line naming what is wrong
    "not-an-int": (["--seed", "x"], "Error parsing --seed"),
    "unknown-flag": (["--no-such-flag", "3"], "Unrecognized options: --no-such-flag"),
    "missing-value": (["--total-timesteps"], "Missing value for argument '--total-timesteps'"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_command_line_that_does_not_parse_is_one_line(script, tmp_path):
    results = run_main_with_each(script, {name: argv for name, (argv, _) in PARSE_ERRORS.items()}, cwd=tmp_path)
    for name, (_, message) in PARSE_ERRORS.items():
        assert results[name]["status"] == 2, results[name]["stderr"]
        (line,) = results[name]["stderr"].splitlines()
        assert line.startswith("error: ") and message in line and line.endswith("(see --help)"), line
        assert results[name]["new"] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_a_wandb_login_and_a_platform_jax_cannot_start_are_one_line(script, tmp_path):
    no_login = {"HOME": str(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path)}
    result = run_script(script, "--track", "--total-timesteps", "100", cwd=tmp_path, env=no_login, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --track: W&B could not start a run"), line
    assert run_dirs(tmp_path) == []

    result = run_script(script, cwd=tmp_path, env={"JAX_PLATFORMS": "no-such-platform"}, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: JAX cannot start (JAX_PLATFORMS='no-such-platform')"), line


@pytest.mark.parametrize("script", SCRIPTS)
def test_mujoco_warnings_come_as_python_warnings_without_a_log_file(script, tmp_path, monkeypatch):
    """MuJoCo 4 warns, at every HalfCheetah-v4 made, that its model uses the deprecated `settotalmass`, and appends
    the warning to MUJOCO_LOG.TXT in the working folder: that one is dropped, the others become Python warnings."""
    import mujoco

    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    module.gym_make("HalfCheetah-v4").close()
    handler = mujoco.get_mju_user_warning()
    assert handler is not None and list(tmp_path.iterdir()) == []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        handler("compiler attribute 'settotalmass' is deprecated and will be removed in a future release")
        handler("Nan, Inf or huge value in QACC at DOF 0. The simulation is unstable.")
    assert [str(w.message) for w in caught] == [
        "MuJoCo: Nan, Inf or huge value in QACC at DOF 0. The simulation is unstable."
    ]
