"""Around the training loop, in all three scripts: --eval-model (evaluate a saved model without
training), --capture-video on a headless machine, --track in W&B's offline mode, the progress line.

One small run per script (InvertedPendulum-v4: MuJoCo, so it renders; its reward is 1 per step, so
an episode's return is its length) serves every test of that script."""

import contextlib
import ctypes.util
import importlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, read_scalars

import crossq_utils


def can_render() -> bool:
    """Whether MuJoCo draws a frame here: headless, through EGL (Debian: apt-get install libegl1 libegl-mesa0
    libgl1-mesa-dri). Where it cannot, the runs here go without --capture-video and the video test is skipped, but
    not under CI, which installs those packages."""
    if os.environ.get("CI") or not (os.environ.get("DISPLAY") or ctypes.util.find_library("EGL")):
        return bool(os.environ.get("CI"))
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    probe = "import mujoco; mujoco.GLContext(64, 64).make_current()"
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0


CAN_RENDER = can_render()

SCRIPTS = ["crossq_jax", "crossq_td3_jax", "sac_jax"]
EVAL_EPISODES = 2
TOTAL_STEPS, LOG_FREQ = 600, 100


@pytest.fixture(scope="module", params=SCRIPTS)
def run(request, tmp_path_factory):
    """A finished run with --save-model, a checkpoint, a video of its evaluation and W&B (offline) on."""
    module = importlib.import_module(request.param)
    work_dir = tmp_path_factory.mktemp(request.param)
    flags = ["--env-id", "InvertedPendulum-v4", "--total-timesteps", str(TOTAL_STEPS), "--learning-starts", "256"]
    flags += ["--critic-width", "32", "--actor-width", "32", "--buffer-size", "1000", "--log-freq", str(LOG_FREQ)]
    flags += ["--eval-freq", "0", "--eval-episodes", str(EVAL_EPISODES), "--checkpoint-freq", str(TOTAL_STEPS)]
    flags += ["--save-model", "--track", "--wandb-project-name", "h12-test", *["--capture-video"] * CAN_RENDER]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(work_dir)
        patch.setenv("WANDB_MODE", "offline")
        patch.setenv("WANDB_DIR", str(work_dir))
        patch.setenv("WANDB_SILENT", "true")
        patch.setenv("WANDB_CONSOLE", "off")  # wandb leaves sys.stdout alone
        with contextlib.redirect_stdout(io.StringIO()) as stdout:
            result = module.train(module.parse_args(flags))
    # The scripts leave W&B running (the process ends after training); here the next script's run
    # shares the process, and wandb keeps its first settings (WANDB_DIR) until torn down.
    sys.modules["wandb"].finish()
    sys.modules["wandb"].teardown()
    (run_dir,) = (work_dir / "runs").iterdir()
    return {"module": module, "work_dir": work_dir, "run_dir": run_dir, "stdout": stdout.getvalue(), **result}


def evaluate_saved(run: dict, *flags: str) -> dict:
    module = run["module"]
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(run["work_dir"])
        return crossq_utils.evaluate_model(module, module.parse_args([*flags, "--eval-episodes", str(EVAL_EPISODES)]))


def video_frames(path: Path) -> tuple[int, float]:
    """(frame count, pixel standard deviation of the middle frame) of an MP4 file, decoded by ffmpeg."""
    import imageio.v3 as iio

    frames = iio.imread(path, plugin="FFMPEG")  # (n, height, width, 3)
    return len(frames), float(frames[len(frames) // 2].std())


def test_eval_model_reproduces_the_runs_final_evaluation_from_each_saved_form(run):
    # The evaluation env is seeded as the run's was; with evaluations at the end only, the saved
    # actor must give the very returns the run logged, whichever file it is read from.
    logged = read_scalars(run["run_dir"])["eval/episodic_return"]
    assert logged == [(TOTAL_STEPS, pytest.approx(run["eval_return"]))]
    model_file = run["run_dir"] / f"{run['module'].Args().exp_name}.crossq_model"
    for path in [run["run_dir"], model_file, run["run_dir"] / "checkpoint.npz"]:
        result = evaluate_saved(run, "--eval-model", str(path))
        assert result["eval_return"] == run["eval_return"], path
        assert len(result["returns"]) == EVAL_EPISODES
    # Evaluating writes nothing: no new run directory, no videos unless asked.
    assert len(list((run["work_dir"] / "runs").iterdir())) == 1
    assert not (run["work_dir"] / "videos" / f"{run['run_name']}-eval").exists()


def test_the_evaluation_command_printed_at_the_end_works_as_printed(run, monkeypatch, capsys):
    """The run's last line names the command that evaluates its model; run here, in the run's folder, through the
    script's __main__ (in this process: a subprocess would spend ~10 s importing JAX again)."""
    (printed,) = [line for line in run["stdout"].splitlines() if "evaluate it with: python " in line]
    command = printed.split("evaluate it with: python ")[1].split()
    monkeypatch.chdir(run["work_dir"])
    before = sorted(run["work_dir"].rglob("*"))
    monkeypatch.setattr("sys.argv", [*command, "--eval-episodes", "2"])
    runpy.run_path(str(REPO / Path(command[0]).name), run_name="__main__")
    mean, std = re.search(r"eval/episodic_return=(\S+) \+- (\S+) \(2 episodes", capsys.readouterr().out).groups()
    assert float(mean) == pytest.approx(run["eval_return"], abs=0.05)
    assert float(std) >= 0.0
    assert sorted(run["work_dir"].rglob("*")) == before, "evaluating a saved model wrote files"


def test_eval_model_uses_the_models_own_hyperparameters_not_an_edited_args_json(run, tmp_path):
    """An actor trained with BRN, its args.json edited to plain BatchNorm (same parameter shapes): the model file holds
    the hyperparameters it was trained with, and those shape the evaluated networks."""
    model = run["run_dir"] / f"{run['module'].Args().exp_name}{crossq_utils.MODEL_SUFFIX}"
    (tmp_path / model.name).write_bytes(model.read_bytes())
    edited = {**json.loads((run["run_dir"] / "args.json").read_text()), "bn_mode": "none", "actor_bn": False}
    (tmp_path / "args.json").write_text(json.dumps(edited))
    assert evaluate_saved(run, "--eval-model", str(tmp_path))["eval_return"] == run["eval_return"]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--critic-width", "64"], "--critic-width does not go with --eval-model"),
        (["--resume", "x"], "--resume does not go with --eval-model"),
    ],
)
def test_eval_model_refuses_training_flags(run, flags, message):
    module = run["module"]
    with pytest.raises(module.ConfigError, match=message):
        module.parse_args(["--eval-model", str(run["run_dir"]), *flags])


def test_eval_model_refuses_what_is_not_a_saved_model(run, tmp_path):
    module = run["module"]
    with pytest.raises(module.ConfigError, match="no such file"):
        evaluate_saved(run, "--eval-model", str(tmp_path / "missing"))
    with pytest.raises(module.ConfigError, match="neither a model saved with --save-model nor a checkpoint"):
        evaluate_saved(run, "--eval-model", str(tmp_path))
    (tmp_path / "args.json").write_text((run["run_dir"] / "args.json").read_text())
    (tmp_path / "x.crossq_model").write_bytes(b"not msgpack")
    with pytest.raises(module.ConfigError, match="is not a model file written by --save-model"):
        evaluate_saved(run, "--eval-model", str(tmp_path / "x.crossq_model"))
    with pytest.raises(module.ConfigError, match=r"README.md is neither a model saved with --save-model \("):
        evaluate_saved(run, "--eval-model", str(REPO / "README.md"))


def test_a_machine_that_cannot_render_says_so_in_one_line_before_training(run, tmp_path, monkeypatch):
    module = run["module"]

    def make_without_opengl(env_id: str, **kwargs):  # how PyOpenGL fails when MUJOCO_GL's library is missing
        raise AttributeError("'NoneType' object has no attribute 'glGetError'")

    monkeypatch.setattr(module, "gym_make", make_without_opengl)
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(module.ConfigError, match="cannot render InvertedPendulum-v4 with MUJOCO_GL=osmesa") as error:
        module.train(module.parse_args(["--env-id", "InvertedPendulum-v4", "--capture-video"]))
    assert "apt-get install libegl1" in str(error.value)
    assert "\n" not in str(error.value)
    assert list(tmp_path.iterdir()) == [], "nothing is written before the check"


@pytest.mark.skipif(
    not CAN_RENDER, reason="MuJoCo cannot render here: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri"
)
@pytest.mark.filterwarnings("ignore:os.fork:RuntimeWarning")  # imageio starts ffmpeg to decode
def test_videos_of_training_and_of_eval_model_hold_every_frame_of_their_episodes(run):
    # Training records the first episode of each evaluation: one evaluation here, so one file.
    (video,) = (run["work_dir"] / "videos" / run["run_name"]).glob("*.mp4")
    frames, spread = video_frames(video)
    assert spread > 1.0, "blank frames"
    # --eval-model --capture-video records every episode: the reset frame and one per step, and an
    # InvertedPendulum return counts the steps.
    result = evaluate_saved(run, "--eval-model", str(run["run_dir"]), "--capture-video")
    videos = sorted(Path(run["work_dir"], result["video_folder"]).glob("*.mp4"))
    assert [v.name for v in videos] == [f"rl-video-episode-{i}.mp4" for i in range(1, EVAL_EPISODES + 1)]
    eval_frames = [video_frames(v)[0] for v in videos]
    assert eval_frames == [round(r) + 1 for r in result["returns"]]
    assert frames == eval_frames[0], "the run's video is of its evaluation's first episode"


def wandb_records(path: Path) -> list:
    """The records of a .wandb file: a 7-byte W&B header, then LevelDB's log format (32 KiB blocks of
    chunks, each with a 7-byte header: CRC, little-endian length, type) holding protobuf Records."""
    from wandb.proto import wandb_internal_pb2

    data, block = path.read_bytes(), 32768
    assert data[:4] == b":W&B"
    records, chunk, pos = [], b"", 7
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        chunk += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a whole record, or the last chunk of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            records.append(record)
            chunk = b""
    return records


def test_track_writes_config_run_name_and_tensorboard_scalars_to_wandb_offline(run):
    (wandb_file,) = (run["work_dir"] / "wandb").glob("offline-run-*/*.wandb")
    records = wandb_records(wandb_file)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == run["run_name"]
    assert run_record.project == "h12-test"
    config = {item.key: json.loads(item.value_json) for item in run_record.config.update}
    args = crossq_utils.read_checkpoint(run["module"], str(run["run_dir"]), with_arrays=False)[1]["args"]
    assert {key: config.get(key) for key in args} == args
    # TensorBoard's scalars arrive as history rows, one per step: compare them with the event file.
    synced: dict[str, list[tuple[int, float]]] = {}
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row = {"/".join(item.nested_key) or item.key: json.loads(item.value_json) for item in record.history.item}
            for key, value in row.items():
                if "/" in key:
                    synced.setdefault(key, []).append((int(row["global_step"]), value))
    logged = read_scalars(run["run_dir"])
    assert set(synced) == set(logged)
    for tag, points in logged.items():
        assert sorted(synced[tag]) == [(step, pytest.approx(value, rel=1e-6)) for step, value in points], tag


def test_progress_line_shows_the_last_episodic_return_or_a_dash_and_the_time_left(run):
    lines = [line for line in run["stdout"].splitlines() if line.startswith("step=") and "SPS=" in line]
    assert [int(line.split()[0][len("step=") :]) for line in lines] == list(range(LOG_FREQ, TOTAL_STEPS + 1, LOG_FREQ))
    finished = read_scalars(run["run_dir"])["charts/episodic_return"]
    seconds_left = []
    for line in lines:
        fields = dict(field.split("=", 1) for field in line.split() if "=" in field)
        step = int(fields["step"])
        before = [value for logged_step, value in finished if logged_step <= step]
        shown = fields["episodic_return"]
        assert shown == "-" if not before else float(shown) == pytest.approx(before[-1], abs=0.05), line
        if step > 256:  # learning: the losses, and the time left at the learning phase's pace
            hours, minutes, secs = map(int, re.fullmatch(r"(\d+):(\d\d):(\d\d)", fields["time_left"]).groups())
            seconds_left.append(hours * 3600 + minutes * 60 + secs)
        else:
            assert "time_left" not in fields and "(random actions until step 256)" in line, line
    assert seconds_left[-1] == 0  # the last line, at the last step
    assert len(seconds_left) == 4  # lines at 300, 400, 500 and 600
    assert os.linesep not in run["stdout"].replace("\n", "")  # one plain line each, no carriage returns
    assert "\r" not in run["stdout"]
