"""Long runs that survive: checkpoints, exact resume after SIGKILL/SIGTERM, refusals of bad checkpoints.

Every script (conftest.SCRIPTS: all three support `--checkpoint-freq` and `--resume`) gets the same tests.
"""

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import (
    REPO,
    SCRIPTS,
    module_of,
    read_scalars,
    run_dirs,
    run_main_with_each,
    run_script,
    script_env,
    start_script,
)

import crossq_utils

POLICY_DELAY = {"crossq_jax.py": 3, "crossq_td3_jax.py": 3, "sac_jax.py": 1}  # their defaults

# Pendulum episodes last 200 steps: checkpoints every 130 steps fall mid-episode.
FLAGS = [
    *["--env-id", "Pendulum-v1", "--seed", "3", "--total-timesteps", "1000", "--learning-starts", "200"],
    *["--batch-size", "32", "--buffer-size", "2000", "--critic-width", "32", "--actor-width", "32"],
    *["--log-freq", "50", "--eval-freq", "500", "--eval-episodes", "1", "--checkpoint-freq", "130"],
]
COMPARED_TAGS = ["charts/episodic_return", "charts/episodic_length", "eval/episodic_return", "losses/qf_loss"]
COMPARED_TAGS += ["losses/qf_values", "losses/actor_loss"]

# Runs a script in-process with np.savez replaced by one that dies (SIGKILL) half-way through
# the N-th checkpoint write: what a kill at the worst moment leaves behind.
DIE_DURING_WRITE = """
import importlib, os, signal, sys
import numpy as np
script, die_at = sys.argv[1], int(sys.argv[2])
sys.path.insert(0, os.path.dirname(script))
module = importlib.import_module(os.path.basename(script)[:-3])
real_savez, calls = np.savez, [0]
def savez(file, **arrays):
    calls[0] += 1
    if calls[0] == die_at:
        file.write(b"PK\\x03\\x04 half a checkpoint")
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    real_savez(file, **arrays)
np.savez = savez
module.train(module.parse_args(sys.argv[3:]))
"""


def wait_for_step(process: subprocess.Popen, step: int) -> None:
    """Read the script's progress lines until it reports `step` (or later)."""
    for line in process.stdout:
        if line.startswith("step=") and int(line.split()[0][len("step=") :]) >= step:
            return
    raise AssertionError(f"the run ended before step {step}: {process.stderr.read()}")


def compared(scalars: dict) -> dict:
    return {tag: scalars[tag] for tag in COMPARED_TAGS}


@pytest.fixture(scope="module", params=SCRIPTS)
def reference(request, tmp_path_factory):
    """An uninterrupted run: (script, its logged scalars, its run directory)."""
    cwd = tmp_path_factory.mktemp("reference")
    result = run_script(request.param, *FLAGS, cwd=cwd)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(cwd)
    return request.param, read_scalars(run_dir), run_dir


def resume(script: str, cwd: Path) -> dict:
    (run_dir,) = run_dirs(cwd)
    result = run_script(script, "--resume", str(run_dir), cwd=cwd)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout
    return read_scalars(run_dir)


def test_resume_after_sigkill_between_checkpoints_matches_the_uninterrupted_run(reference, tmp_path):
    script, expected, _ = reference
    process = start_script(script, *FLAGS, cwd=tmp_path)
    wait_for_step(process, 700)  # the last checkpoint was at 650, mid-episode
    process.kill()
    process.wait()
    assert compared(resume(script, tmp_path)) == compared(expected)


def test_resume_after_sigkill_during_a_checkpoint_write_matches_the_uninterrupted_run(reference, tmp_path):
    script, expected, _ = reference
    driver = subprocess.run(
        [sys.executable, "-c", DIE_DURING_WRITE, str(REPO / script), "4", *FLAGS],
        cwd=tmp_path,
        env=script_env(),
        capture_output=True,
        text=True,
    )
    assert driver.returncode == -signal.SIGKILL, driver.stderr
    (run_dir,) = run_dirs(tmp_path)
    module = module_of(script)
    assert (run_dir / (crossq_utils.CHECKPOINT_FILE + ".tmp")).exists()  # the half-written file
    _, host_state = crossq_utils.read_checkpoint(module, str(run_dir))
    assert host_state["global_step"] == 390  # the third checkpoint survived the fourth's write
    assert compared(resume(script, tmp_path)) == compared(expected)


def test_sigterm_writes_a_checkpoint_and_the_run_resumes_exactly(reference, tmp_path):
    script, expected, _ = reference
    process = start_script(script, *FLAGS, cwd=tmp_path)
    wait_for_step(process, 450)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, stderr
    assert "checkpoint written to" in stderr and "--resume" in stderr
    (run_dir,) = run_dirs(tmp_path)
    _, host_state = crossq_utils.read_checkpoint(module_of(script), str(run_dir))
    assert 450 <= host_state["global_step"] < 1000
    assert compared(resume(script, tmp_path)) == compared(expected)


def test_a_finished_run_leaves_a_checkpoint_of_its_last_step_with_the_update_and_brn_step_counters(reference):
    script, _, run_dir = reference
    arrays, host_state = crossq_utils.read_checkpoint(module_of(script), str(run_dir))
    assert host_state["global_step"] == 1000  # the last step, though 1000 is no multiple of --checkpoint-freq 130
    critic_updates = 1000 - 200
    actor_updates = critic_updates // POLICY_DELAY[script]
    assert int(arrays["agent/critic/step"]) == critic_updates
    assert int(arrays["agent/actor/step"]) == actor_updates
    for network, updates in [("critic", critic_updates), ("actor", actor_updates)]:
        prefix = f"agent/{network}/batch_stats/"
        counters = [value for path, value in arrays.items() if path.startswith(prefix) and path.endswith("/steps")]
        if script != "sac_jax.py":  # SAC has no BatchNorm
            assert counters and all((np.asarray(c) == updates).all() for c in counters), network


SPOILED = {  # what is wrong with the checkpoint (or the command line beside it): the line that says so
    "garbage": "is not a readable checkpoint",
    "truncated": "is not a readable checkpoint",
    "other_script": "was written by another_script",
    "other_env": "--env-id is Pendulum-v1 in the checkpoint, not Hopper-v4",
    "other_width": "--critic-width is 32 in the checkpoint, not 64",
    "missing": "no checkpoint at",
    "too_short": "the checkpoint is at env step 1000, where its run is complete: pass a --total-timesteps above it",
    # Edited by hand: read back as the command line is (types, ranges, shapes, required entries).
    "wrong_shape": "the checkpoint's agent/critic/params/",
    "string_number": "gamma is '0.99', not of type",
    "out_of_range": "--learning-starts must not be negative",
    "missing_entry": "its host state's global_step is missing",
    # A host state that contradicts its own arrays: the step it names is not the one its buffer and updates hold.
    "step_edited": "the checkpoint's buffer/obs is float32[1000, 3], not [990, 3]",
    "updates_edited": "its critic has 799 updates, not 800",
    "json_list": "its host state is not a JSON object",
    "args_json_edited": "gamma is '0.99', not of type",
    "eval_flag_at_its_default": "--gamma does not go with --eval-model",
}


@pytest.fixture(scope="module")
def refused_resumes(reference, tmp_path_factory) -> dict:
    """`--resume` of each spoiled copy of the reference run's checkpoint, all given to the script in one
    process: {spoil: its exit status and stderr}."""
    script, _, run_dir = reference
    module, folder = module_of(script), tmp_path_factory.mktemp("spoiled")
    good = run_dir / crossq_utils.CHECKPOINT_FILE
    (folder / "garbage.npz").write_bytes(os.urandom(4096))
    (folder / "truncated.npz").write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    arrays, host_state = crossq_utils.read_checkpoint(module, str(good))
    other_script = {**host_state, "script": "another_script"}
    crossq_utils.write_checkpoint(module, str(folder / "other_script.npz"), arrays, other_script)
    (folder / "empty").mkdir()
    inputs = {spoil: ["--resume", str(folder / f"{spoil}.npz")] for spoil in ["garbage", "truncated", "other_script"]}
    inputs["missing"] = ["--resume", str(folder / "empty")]
    go_on = ["--resume", str(good), "--total-timesteps", "2000"]  # the checkpoint is of the run's end
    inputs["other_env"] = [*go_on, "--env-id", "Hopper-v4"]
    inputs["other_width"] = [*go_on, "--critic-width", "64"]
    inputs["too_short"] = ["--resume", str(good), "--total-timesteps", "900"]
    critic_kernel = next(path for path in arrays if path.startswith("agent/critic/params/") and arrays[path].ndim > 1)
    edits = {
        "wrong_shape": ({**arrays, critic_kernel: arrays[critic_kernel][..., :-1]}, host_state),
        "string_number": (arrays, {**host_state, "args": {**host_state["args"], "gamma": "0.99"}}),
        "out_of_range": (arrays, {**host_state, "args": {**host_state["args"], "learning_starts": -5}}),
        "missing_entry": (arrays, {key: value for key, value in host_state.items() if key != "global_step"}),
        "json_list": (arrays, list(host_state.items())),
        "step_edited": (arrays, {**host_state, "global_step": 990}),
        "updates_edited": ({**arrays, "agent/critic/step": np.asarray(799, np.int32)}, host_state),
    }
    for spoil, (spoiled_arrays, spoiled_host_state) in edits.items():
        crossq_utils.write_checkpoint(module, str(folder / f"{spoil}.npz"), spoiled_arrays, spoiled_host_state)
        inputs[spoil] = ["--resume", str(folder / f"{spoil}.npz"), "--total-timesteps", "2000"]
    # A model saved before models held their hyperparameters, its run's args.json edited by hand
    import flax

    (folder / "edited").mkdir()
    (folder / "edited" / crossq_utils.ARGS_FILE).write_text(json.dumps({**host_state["args"], "gamma": "0.99"}))
    model = flax.serialization.msgpack_serialize({"actor": {}, "critic": {}})
    (folder / "edited" / f"{host_state['args']['exp_name']}{crossq_utils.MODEL_SUFFIX}").write_bytes(model)
    inputs["args_json_edited"] = ["--eval-model", str(folder / "edited")]
    inputs["eval_flag_at_its_default"] = ["--eval-model", str(run_dir), "--gamma", "0.99"]
    return run_main_with_each(script, inputs, cwd=folder)


@pytest.mark.parametrize("spoil", SPOILED)
def test_bad_checkpoints_are_refused_with_one_line(refused_resumes, spoil):
    result = refused_resumes[spoil]
    assert result["status"] == 2, result["stderr"]
    lines = result["stderr"].strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and SPOILED[spoil] in lines[0], result["stderr"]
    assert result["new"] == []  # refused before a run folder is made


@pytest.mark.parametrize("script", SCRIPTS)
def test_divergence_leaves_the_last_good_checkpoint_intact(script, tmp_path, monkeypatch):
    """Rewards of 1e30 overflow the TD loss after step 300; no poisoned checkpoint may be written."""
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    args = dataclasses.replace(
        module.Args(),
        env_id="HugeRewardAfter300-v0",
        **{"critic_width": 16, "actor_width": 16, "batch_size": 8, "learning_starts": 100, "buffer_size": 1000},
        **{"total_timesteps": 2000, "checkpoint_freq": 50, "eval_freq": 0, "eval_episodes": 1},
    )
    with pytest.raises(FloatingPointError, match=r"at env step (\d+)") as error:
        module.train(args)
    diverged_at = int(error.value.args[0].split("env step ")[1].split()[0])
    (run_dir,) = run_dirs(tmp_path)
    arrays, host_state = crossq_utils.read_checkpoint(module, str(run_dir))
    assert 250 <= host_state["global_step"] < diverged_at
    agent = [value for path, value in arrays.items() if path.startswith("agent/") and value.dtype.kind == "f"]
    assert agent and all(np.isfinite(value).all() for value in agent)


@pytest.mark.parametrize("script", SCRIPTS)
def test_an_unwritable_output_directory_is_one_line(script, tmp_path):
    (tmp_path / "runs").write_text("not a directory")
    result = run_script(script, "--env-id", "Pendulum-v1", "--critic-width", "16", cwd=tmp_path)
    assert result.returncode == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "runs/Pendulum-v1__" in line, line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_full_disk_is_refused_before_training(script, tmp_path, monkeypatch):
    module = module_of(script)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(crossq_utils.shutil, "disk_usage", lambda path: type("Usage", (), {"free": 1000})())
    args = dataclasses.replace(module.Args(), env_id="Pendulum-v1", checkpoint_freq=1000, critic_width=16)
    with pytest.raises(module.ConfigError, match=r"has 0.001 MB free; two checkpoints of this run need \d"):
        module.train(args)
    assert run_dirs(tmp_path) == []
