"""Nothing lost, nothing misblamed: the end of a run, files that fail to write, the training clock, signals during
the start-up, output into a closed pipe, the envs the checks let through, and command lines that do not parse. Every
script gets every test. (Refusals of flags are in test_refusals.py, of checkpoints and edited files in
test_checkpointing.py, envs that return NaN/inf in test_scripts.py.)"""

import dataclasses
import errno
import os
import re
import shutil
import signal
import time

import gymnasium as gym
import jax
import numpy as np
import pytest
from conftest import (
    SCRIPTS,
    module_of,
    read_scalars,
    run_dirs,
    run_main_with_each,
    run_script,
    start_script,
)

import crossq_utils

TINY = {"env_id": "Pendulum-v1", "critic_width": 16, "actor_width": 16, "batch_size": 32, "buffer_size": 1000}
TINY |= {"learning_starts": 100, "eval_freq": 0, "eval_episodes": 1, "log_freq": 100}


def tiny_args(script: str, **overrides):
    return dataclasses.replace(module_of(script).Args(), **{**TINY, **overrides})


# ---------------------------------------------------------------------------------------------
# The end of a run, and checkpoints that a finished run left behind
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_during_the_final_evaluation_still_leaves_the_model_and_a_checkpoint_of_the_end(
    script, tmp_path, monkeypatch
):
    """SIGTERM while the last evaluation runs: the evaluation, the checkpoint of the last step and the model are all
    written (nothing else is left to do); that checkpoint resumes only to train past the run's end."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    real_evaluate = module.evaluate

    def evaluate_interrupted(*inputs):
        os.kill(os.getpid(), signal.SIGTERM)  # the run's handler takes it: it only marks the run to stop
        return real_evaluate(*inputs)

    monkeypatch.setattr(module, "evaluate", evaluate_interrupted)
    result = module.train(tiny_args(script, total_timesteps=200, save_model=True, checkpoint_freq=150))
    (run_dir,) = run_dirs(tmp_path)
    model = run_dir / f"{module.Args().exp_name}{crossq_utils.MODEL_SUFFIX}"
    assert np.isfinite(result["eval_return"]) and model.exists()
    assert crossq_utils.read_checkpoint(module, str(run_dir), with_arrays=False)[1]["global_step"] == 200
    monkeypatch.setattr(module, "evaluate", real_evaluate)
    with pytest.raises(module.ConfigError, match="at env step 200, where its run is complete"):
        module.train(module.parse_args(["--resume", str(run_dir)]))
    assert module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "250"]))["eval_return"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_checkpoint_older_than_the_model_beside_it_is_refused(script, tmp_path, monkeypatch):
    """A run stopped at a checkpoint, resumed elsewhere to its end and saved, then that older checkpoint put back: it
    would train the same steps again and overwrite the model. Refused, naming the model."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    module.train(tiny_args(script, total_timesteps=200, save_model=True, checkpoint_freq=100))
    (run_dir,) = run_dirs(tmp_path)
    old = tmp_path / "old.npz"
    shutil.copy2(run_dir / crossq_utils.CHECKPOINT_FILE, old)
    module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "300"]))  # a new model
    shutil.copy2(old, run_dir / crossq_utils.CHECKPOINT_FILE)
    with pytest.raises(module.ConfigError, match=r"crossq_model was saved after this checkpoint \(env step 200\)"):
        module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "400"]))


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_write_that_fails_leaves_the_previous_file_and_says_why(script, tmp_path, monkeypatch):
    """A full disk while the model or a checkpoint is written: the earlier file stays in place, whole, and the error
    names the reason (a checkpoint's also the file, in one line)."""
    module = module_of(script)
    args = tiny_args(script)
    agent = module.create_agent(args, 3, 1, jax.random.PRNGKey(0))
    path = str(tmp_path / f"good{crossq_utils.MODEL_SUFFIX}")
    module.save_model(agent, args, path)
    good = (tmp_path / f"good{crossq_utils.MODEL_SUFFIX}").read_bytes()

    def full_disk(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", full_disk)
    with pytest.raises(OSError, match="No space left"):
        module.save_model(agent, args, path)
    with pytest.raises(module.ConfigError, match=r"cannot write checkpoint .*checkpoint\.npz: No space left"):
        crossq_utils.write_checkpoint(module, str(tmp_path / "checkpoint.npz"), {"x": np.zeros(3)}, {"script": "x"})
    monkeypatch.undo()
    assert (tmp_path / f"good{crossq_utils.MODEL_SUFFIX}").read_bytes() == good
    assert not (tmp_path / "checkpoint.npz").exists() and not (tmp_path / "checkpoint.npz.tmp").exists()


@pytest.mark.parametrize("script", SCRIPTS)
def test_training_seconds_leave_out_evaluations_and_go_on_from_a_checkpoint(script, tmp_path, monkeypatch):
    """charts/train_seconds counts training only: each evaluation here takes 1000 s of a patched clock, and none of
    them counts. A resumed run goes on from its checkpoint's seconds. SPS counts the learning phase alone."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    offset, real_evaluate, real_perf_counter = [0.0], module.evaluate, time.perf_counter

    def slow_evaluate(*inputs):
        offset[0] += 1000.0
        return real_evaluate(*inputs)

    monkeypatch.setattr(module, "evaluate", slow_evaluate)
    monkeypatch.setattr(module.time, "perf_counter", lambda: real_perf_counter() + offset[0])
    module.train(tiny_args(script, total_timesteps=300, eval_freq=100, checkpoint_freq=300))
    (run_dir,) = run_dirs(tmp_path)
    module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "400"]))
    monkeypatch.undo()
    seconds = dict(read_scalars(run_dir)["charts/train_seconds"])
    assert 0 < seconds[100] < seconds[200] < seconds[300] < seconds[400] < 500, seconds  # 4000 s of evaluations


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_resumed_run_prints_the_last_episodes_return_and_a_fresh_one_a_dash(script, tmp_path, capsys, monkeypatch):
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    module.train(tiny_args(script, total_timesteps=300, checkpoint_freq=300))
    first = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=100 SPS=")]
    assert first and "episodic_return=- " in first[0], first  # no episode has ended yet (Pendulum's are 200 steps)
    (run_dir,) = run_dirs(tmp_path)
    module.train(module.parse_args(["--resume", str(run_dir), "--total-timesteps", "400"]))
    (progress,) = [line for line in capsys.readouterr().out.splitlines() if line.startswith("step=400 SPS=")]
    assert "nan" not in progress and re.search(r"episodic_return=-\d+\.\d ", progress), progress


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
# Signals while the first programs compile, output into a closed pipe; command lines and platforms that cannot run
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_signal_while_the_first_programs_compile_leaves_a_checkpoint_that_resumes(script, tmp_path, monkeypatch):
    """With checkpoints on, SIGINT and SIGTERM are taken from the start of the run (Python's KeyboardInterrupt, raised
    inside JAX's compiler, can crash the interpreter): a signal while the networks' initialisation compiles stops the
    run after its first step, with a checkpoint that resumes."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    real_create_agent = module.create_agent

    def create_agent_interrupted(*inputs):
        if not isinstance(inputs[-1], jax.core.Tracer):  # the run's agent, not the memory check's shapes
            os.kill(os.getpid(), signal.SIGINT)
            monkeypatch.setattr(module, "create_agent", real_create_agent)
        return real_create_agent(*inputs)

    monkeypatch.setattr(module, "create_agent", create_agent_interrupted)
    with pytest.raises(crossq_utils.Preempted) as stopped:
        module.train(tiny_args(script, total_timesteps=200, checkpoint_freq=100))
    assert stopped.value.code == 128 + signal.SIGINT and "stopped by SIGINT" in stopped.value.message
    (run_dir,) = run_dirs(tmp_path)
    assert crossq_utils.read_checkpoint(module, str(run_dir), with_arrays=False)[1]["global_step"] == 1
    assert np.isfinite(module.train(module.parse_args(["--resume", str(run_dir)]))["eval_return"])


@pytest.mark.parametrize("script", SCRIPTS)
def test_ctrl_c_as_the_loop_starts_compiling_exits_with_a_checkpoint_and_no_traceback(script, tmp_path):
    flags = ["--env-id", "Pendulum-v1", "--learning-starts", "32", "--batch-size", "32", "--total-timesteps", "5000"]
    flags += ["--critic-width", "16", "--actor-width", "16", "--buffer-size", "1000", "--eval-freq", "0"]
    process = start_script(script, *flags, "--checkpoint-freq", "1000", cwd=tmp_path)
    for line in process.stdout:  # the loop starts: its first calls compile the store and the update
        if "logging to" in line:
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 128 + signal.SIGINT, stderr
    assert "Traceback" not in stderr and stderr.splitlines()[-1].startswith("stopped by SIGINT; "), stderr
    assert "--resume runs/" in stderr.splitlines()[-1]

    process = start_script(script, *flags, cwd=tmp_path)  # without checkpoints: one line, exit 130
    for line in process.stdout:
        if line.startswith("step="):
            process.send_signal(signal.SIGINT)
            break
    _, stderr = process.communicate(timeout=300)
    assert process.returncode == 130 and stderr.strip() == "interrupted", stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_closed_stdout_neither_ends_the_run_nor_loses_its_checkpoint(script, tmp_path):
    """`python script.py ... | head -2`: the reader goes after two lines; the run goes on to its end and its checkpoint,
    silently. `--help | head -1` ends without a traceback."""
    flags = ["--env-id", "Pendulum-v1", "--learning-starts", "100", "--batch-size", "32", "--total-timesteps", "600"]
    flags += ["--critic-width", "16", "--actor-width", "16", "--buffer-size", "1000", "--eval-freq", "0"]
    flags += ["--log-freq", "50", "--eval-episodes", "1", "--checkpoint-freq", "300", "--save-model"]
    for argv in [flags, ["--help"]]:
        process = start_script(script, *argv, cwd=tmp_path)
        process.stdout.readline()
        process.stdout.close()  # the reader has gone
        stderr = process.stderr.read()
        assert process.wait(timeout=300) == 0 and "Traceback" not in stderr, stderr
    (run_dir,) = run_dirs(tmp_path)
    assert crossq_utils.read_checkpoint(module_of(script), str(run_dir), with_arrays=False)[1]["global_step"] == 600
    assert (run_dir / f"{module_of(script).Args().exp_name}{crossq_utils.MODEL_SUFFIX}").exists()


PARSE_ERRORS = {  # tyro's own messages, as tyro prints them
    "not-an-int": (["--seed", "x"], "--seed"),
    "unknown-flag": (["--no-such-flag", "3"], "--no-such-flag"),
    "missing-value": (["--total-timesteps"], "--total-timesteps"),
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_command_line_that_does_not_parse_is_tyros_message_and_exit_2(script, tmp_path):
    results = run_main_with_each(script, {name: argv for name, (argv, _) in PARSE_ERRORS.items()}, cwd=tmp_path)
    for name, (_, flag) in PARSE_ERRORS.items():
        assert results[name]["status"] == 2, results[name]["stderr"]
        assert flag in results[name]["stderr"] and "Traceback" not in results[name]["stderr"]
        assert results[name]["new"] == []


@pytest.mark.parametrize("script", SCRIPTS)
def test_track_without_a_wandb_login_is_one_line(script, tmp_path):
    no_login = {"HOME": str(tmp_path), "WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_DIR": str(tmp_path)}
    flags = ["--track", "--env-id", "Pendulum-v1", "--critic-width", "16", "--total-timesteps", "100"]
    result = run_script(script, *flags, cwd=tmp_path, env=no_login, timeout=300)
    assert result.returncode == 2, result.stderr
    (line,) = result.stderr.splitlines()
    assert line.startswith("error: --track: W&B could not start a run"), line
    assert run_dirs(tmp_path) == []
