# What goes beyond CleanRL in crossq_jax.py, crossq_td3_jax.py and sac_jax.py, once for the three: checkpoints and
# exact resume (--checkpoint-freq, --resume, SIGTERM and Ctrl-C), --eval-model, the Q-bias measurement
# (--q-bias-freq) and DeepMind Control's set-up. A script imports this file only inside the branch of the flag that
# needs it, as CleanRL's scripts import cleanrl_utils: copied alone, a script trains. Nothing here imports a script:
# every function takes the calling script's module (`script`) and looks up its functions at call time.
# The documentation: docs/long-runs.md (checkpoints), docs/evaluation.md, docs/q-bias.md, docs/dmc.md.
import contextlib
import ctypes.util
import dataclasses
import json
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
from typing import Any

import flax
import gymnasium as gym
import jax
import numpy as np
import tyro

ARGS_FILE = "args.json"
CHECKPOINT_FILE = "checkpoint.npz"
MODEL_SUFFIX = ".crossq_model"  # what --save-model writes: runs/{run_name}/{exp_name}.crossq_model
# Flags that may change when a run resumes; every other hyperparameter is the checkpoint's.
RESUMABLE_FLAGS = {"total_timesteps", "checkpoint_freq", "log_freq", "save_model", "track", "resume"}
RESUMABLE_FLAGS |= {"wandb_project_name", "wandb_entity", "capture_video"}
RESUMABLE_FLAGS |= {"q_bias_freq", "q_bias_samples", "q_bias_cutoff"}  # measured beside training, never in it
EVAL_FLAGS = {"eval_model", "eval_episodes", "seed", "capture_video"}  # what applies to --eval-model
# What a checkpoint's host state holds beside the hyperparameters, and of which type.
HOST_STATE = {"run_name": str, "global_step": int, "train_seconds": float, "eval_return": float}
HOST_STATE |= {"episodic_return": float, "rngs": dict, "episode_start_rng": dict | None}


def script_name(script: types.ModuleType) -> str:
    """crossq_jax, crossq_td3_jax or sac_jax (a script run as __main__ too): stamped into its checkpoints."""
    return os.path.splitext(os.path.basename(script.__file__))[0]


# ---------------------------------------------------------------------------------------------------------------------
# The command line of a saved run: --resume takes the checkpoint's flags, --eval-model the saved run's
# ---------------------------------------------------------------------------------------------------------------------
def saved_run_args(script: types.ModuleType, args: Any, argv: list[str], word: str | None) -> Any:
    """The Args of `argv` (the command line after its preset word, `word`; `args`: as parsed without a saved run).
    With --resume, a flag not given takes the checkpoint's value, a preset word stands for its values (as on the
    command line that started the run), and what may not change is checked; with --eval-model, only the flags that
    apply to it may be given."""
    Args, ConfigError = script.Args, script.ConfigError
    given = given_flags(script, argv)
    if "eval_model" in given:
        if word:
            raise ConfigError(f"the preset word {word} does not go with --eval-model: the saved run's are used")
        if misplaced := sorted(given - EVAL_FLAGS):
            raise ConfigError(
                f"--{misplaced[0].replace('_', '-')} does not go with --eval-model: the saved run's hyperparameters "
                "are used (only --eval-episodes, --seed and --capture-video apply)"
            )
        return args
    resume = args.resume
    _, saved = read_checkpoint(script, resume, with_arrays=False)
    defaults = Args(**saved["args"])
    if word:  # the word's values where they differ between presets
        preset, others = script.PRESETS[word][1], [args for _, args in script.PRESETS.values()]
        differ = [f.name for f in dataclasses.fields(Args) if len({getattr(a, f.name) for a in others}) > 1]
        defaults = dataclasses.replace(
            defaults, **{name: getattr(preset, name) for name in differ if name != "exp_name"}
        )
    args = tyro.cli(Args, args=argv, default=dataclasses.replace(defaults, resume=resume))
    check_resume(script, args, saved)
    return args


def given_flags(script: types.ModuleType, argv: list[str]) -> set[str]:
    """The fields of the flags on a command line (`--no-actor-bn` is actor_bn's)."""
    names = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    fields = {field.name for field in dataclasses.fields(script.Args)}
    return {name if name in fields else name.removeprefix("no_") for name in names}


def check_resume(script: types.ModuleType, args: Any, saved: dict) -> None:
    """A resumed run keeps its env and hyperparameters; only RESUMABLE_FLAGS may change."""
    ConfigError, step = script.ConfigError, saved["global_step"]
    if args.total_timesteps <= step:
        complete = ", where its run is complete" if step == saved["args"]["total_timesteps"] else ""
        raise ConfigError(f"the checkpoint is at env step {step}{complete}: pass a --total-timesteps above it to go on")
    for name, value in dataclasses.asdict(args).items():
        if name not in RESUMABLE_FLAGS and saved["args"].get(name) != value:
            raise ConfigError(
                f"--{name.replace('_', '-')} is {saved['args'].get(name)} in the checkpoint, not {value}: "
                "a resumed run keeps its hyperparameters"
            )


# ---------------------------------------------------------------------------------------------------------------------
# Checkpoints and exact resume
# ---------------------------------------------------------------------------------------------------------------------
class Preempted(SystemExit):
    """SIGTERM or SIGINT arrived and a checkpoint was written: the run ends, exit 128 + the signal's number."""

    def __init__(self, signum: int, message: str):
        super().__init__(128 + signum)
        self.signum, self.message = signum, message


class Checkpoints:
    """--checkpoint-freq and --resume for one run of `script`'s train(): every `--checkpoint-freq` env steps, at the
    last step and after SIGTERM or Ctrl-C (then the run ends, exit 128 + the signal), runs/{run_name}/checkpoint.npz
    holds what the run needs to go on exactly where it stopped: the arrays (networks, optimizer states, the
    buffer's filled rows, metrics, keys), the host's generators, and the current episode's start and actions, which
    a resumed run replays (MuJoCo's full state is more than qpos/qvel). Every check of a checkpoint to resume, and
    of the disk, comes here, before anything is compiled or written."""

    def __init__(self, script: types.ModuleType, args: Any, run_name: str, obs_dim: int, action_dim: int):
        self.script, self.args, self.signum = script, args, None
        self.saved_arrays, self.saved = None, None
        if args.resume:
            self.saved_arrays, self.saved = read_checkpoint(script, args.resume)
            run_name = self.saved["run_name"]
            self.dir = os.path.dirname(os.path.abspath(checkpoint_file(args.resume)))
            check_resume(script, args, self.saved)
            self.check_model_is_not_newer()
        else:
            self.dir = os.path.abspath(os.path.join("runs", run_name))
        self.run_name, self.path = run_name, os.path.join(self.dir, CHECKPOINT_FILE)
        self.check_disk(obs_dim, action_dim)
        # SIGTERM (a cluster's preemption, the sweep) and Ctrl-C stop the run at the end of the step, with a
        # checkpoint; from now on, since Python's Ctrl-C, raised while JAX compiles, can crash the interpreter.
        self.previous_handlers = {sig: signal.signal(sig, self.on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}

    def on_signal(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if self.signum is not None:
            print(f"\n{name} again: exiting at once, without a checkpoint", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        self.signum = signum
        print(f"\n{name}: stopping with a checkpoint at the end of this step; again to exit at once", file=sys.stderr)

    def close(self) -> None:
        for sig, handler in self.previous_handlers.items():
            signal.signal(sig, handler)

    def check_model_is_not_newer(self) -> None:
        """A checkpoint older than the model beside it (a run stopped, resumed elsewhere to its end, and the old
        checkpoint put back) would train the same steps again and overwrite the model: refused. The model holds the
        hyperparameters it was saved with, its last step among them."""
        model = os.path.join(self.dir, self.saved["args"]["exp_name"] + MODEL_SUFFIX)
        try:
            with open(model, "rb") as f:
                saved_at = json.loads(flax.serialization.msgpack_restore(f.read())["args"])["total_timesteps"]
        except Exception:  # no model, or one saved before models held their hyperparameters
            return
        if saved_at > self.saved["global_step"]:
            raise self.script.ConfigError(
                f"{model} was saved after this checkpoint (env step {self.saved['global_step']}), at env step "
                f"{saved_at}: resuming would train those steps again; move the model away to do it anyway"
            )

    def check_disk(self, obs_dim: int, action_dim: int) -> None:
        """Room for two checkpoints (the previous one stays until the next is whole) and the model: the bytes of the
        buffer and networks, from their shapes."""
        args, script = self.args, self.script
        nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
        agent = nbytes(jax.eval_shape(lambda: script.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(0))))
        buffer = nbytes(jax.eval_shape(lambda: script.ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)))
        needed = 2 * (agent + buffer) + agent * args.save_model
        path = self.dir
        while not os.path.exists(path):  # the run's folder is made later
            path = os.path.dirname(path)
        free = shutil.disk_usage(path).free
        if free < needed:
            gb = lambda n: f"{n / 1e9:.3g} GB" if n >= 1e7 else f"{n / 1e6:.3g} MB"  # never "0.0 GB"
            raise script.ConfigError(f"{path} has {gb(free)} free; two checkpoints of this run need {gb(needed)}")

    def recorder(self, env: gym.Env) -> "EpisodeRecorder":
        return EpisodeRecorder(env)

    def restore(self, state: dict, env: "EpisodeRecorder", eval_env: gym.Env) -> tuple:
        """The checkpoint's arrays in the structure of `state` (the fresh run's), the host generators put back and the
        interrupted episode replayed: (the state with the env's observation, the env step, the training seconds, the
        last episode's return, the last evaluation's mean return)."""
        args, saved, ConfigError = self.args, self.saved, self.script.ConfigError
        step, where = saved["global_step"], checkpoint_file(args.resume)
        buffer = state["buffer"]
        template = {**state, "buffer": filled_part(buffer, min(step, args.buffer_size))}
        template["episode_actions"] = np.zeros((0, env.action_space.shape[0]), np.float32)
        restored = restore(self.script, template, self.saved_arrays)
        self.saved_arrays = None
        # The arrays must be those of the step the checkpoint names: the buffer's rows and the update counts.
        stored, updates = restored["buffer"], max(step - args.learning_starts, 0) * args.utd
        if int(stored.size) != min(step, args.buffer_size) or int(stored.position) != step % args.buffer_size:
            raise ConfigError(f"{where}: its replay buffer does not hold the {step} steps it names")
        if int(restored["agent"].critic.step) != updates:
            raise ConfigError(f"{where}: its critic has {int(restored['agent'].critic.step)} updates, not {updates}")
        try:
            set_host_rngs(saved["rngs"], env, eval_env)
            obs = replay_episode(env, saved["episode_start_rng"], restored.pop("episode_actions"))
        except (KeyError, TypeError, ValueError) as e:  # a host state edited by hand
            raise ConfigError(f"{where}: its generator states are damaged ({e})") from None
        if not np.array_equal(obs, restored["obs"]):
            print("warning: the replayed env state differs from the checkpoint's; the run goes on from it", flush=True)
        restored["buffer"] = refill(buffer, restored["buffer"])
        restored = {**jax.device_put(restored), "obs": obs}
        # Tell TensorBoard to drop what the interrupted process logged after its checkpoint.
        from tensorboard.compat.proto import event_pb2
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        marker = EventFileWriter(self.dir)
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        marker.add_event(event_pb2.Event(wall_time=time.time(), step=step + 1, session_log=start))
        marker.close()
        print(f"resumed {self.run_name} at env step {step} from {where}", flush=True)
        return restored, step, saved["train_seconds"], saved["episodic_return"], saved["eval_return"]

    def save_if_due(
        self,
        step: int,
        state: dict,
        train_seconds: float,
        episodic_return: float,
        eval_return: float,
        env: "EpisodeRecorder",
        eval_env: gym.Env,
    ) -> None:
        """Write the checkpoint every --checkpoint-freq env steps, at the last step, and after a signal (then raise
        Preempted: the run ends)."""
        args = self.args
        due = (args.checkpoint_freq and step % args.checkpoint_freq == 0) or step == args.total_timesteps
        if not due and self.signum is None:
            return
        self.script.check_finite(step, state["agent"], state["metrics"])  # never replace a good one with NaN
        arrays = {**state, "buffer": filled_part(state["buffer"]), "episode_actions": env.episode_actions()}
        host_state = {
            "script": script_name(self.script),
            "run_name": self.run_name,
            "args": dataclasses.asdict(args),
            "global_step": step,
            "train_seconds": float(train_seconds),
            "eval_return": float(eval_return),
            "episodic_return": float(episodic_return),
            "episode_start_rng": env.start_state,
            "rngs": host_rngs(env, eval_env),
        }
        write_checkpoint(self.script, self.path, arrays, host_state)
        if self.signum is not None and step < args.total_timesteps:
            resume = f"python {os.path.basename(self.script.__file__)} --resume {os.path.relpath(self.dir)}"
            message = f"stopped by {signal.Signals(self.signum).name}; checkpoint written to {self.path}"
            print(f"{message}; continue with: {resume}", file=sys.stderr, flush=True)
            raise Preempted(self.signum, message)


class EpisodeRecorder(gym.Wrapper):
    """The training env, remembering what brings it back to where it is: its generator's state at the episode's
    reset and the episode's actions since."""

    def __init__(self, env: gym.Env) -> None:
        super().__init__(env)
        self.start_state: dict | None = None
        self.actions: list[np.ndarray] = []

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[Any, dict]:
        # A seeded reset (the one that seeds the env) draws from its seed: no state to record before it.
        self.start_state = None if seed is not None else generator_state(self.env.np_random)
        self.actions = []
        return self.env.reset(seed=seed, options=options)

    def step(self, action: np.ndarray) -> tuple[Any, Any, bool, bool, dict]:
        self.actions.append(action)
        return self.env.step(action)

    def episode_actions(self) -> np.ndarray:
        return np.asarray(self.actions, np.float32).reshape(-1, self.action_space.shape[0])


def replay_episode(env: gym.Env, start_state: dict, actions: np.ndarray) -> np.ndarray:
    """Bring `env` to where the interrupted run was: same reset draw, then the same actions."""
    set_generator_state(env.np_random, start_state)
    obs, _ = env.reset()
    for action in actions:
        obs, *_ = env.step(action)
    return obs


# DeepMind Control envs (through shimmy) draw from a legacy np.random.RandomState, not a Generator.
def generator_state(generator: np.random.Generator | np.random.RandomState) -> dict:
    if isinstance(generator, np.random.RandomState):
        return generator.get_state(legacy=False)
    return generator.bit_generator.state


def set_generator_state(generator: np.random.Generator | np.random.RandomState, state: dict) -> None:
    if isinstance(generator, np.random.RandomState):
        generator.set_state(state)
    else:
        generator.bit_generator.state = state


def host_rngs(env: gym.Env, eval_env: gym.Env) -> dict:
    """Host random states beside the env's own (which each episode records at its reset)."""
    return {
        "action_space": generator_state(env.action_space.np_random),
        "eval_env": generator_state(eval_env.np_random),
        "numpy": np.random.get_state(legacy=False),
        "python": random.getstate(),
    }


def set_host_rngs(states: dict, env: gym.Env, eval_env: gym.Env) -> None:
    set_generator_state(env.action_space.np_random, states["action_space"])
    set_generator_state(eval_env.np_random, states["eval_env"])
    np.random.set_state(states["numpy"])
    version, internal, gauss = states["python"]
    random.setstate((version, tuple(internal), gauss))


BUFFER_ROWS = ("obs", "actions", "rewards", "next_obs", "terminations")  # the replay buffer's per-transition arrays


def checkpoint_file(path: str) -> str:
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def filled_part(buffer: Any, n: int | None = None) -> Any:
    """The rows that hold data (the first `n`, or `buffer.size`): what a checkpoint stores."""
    n = int(buffer.size) if n is None else n
    return buffer._replace(**{name: getattr(buffer, name)[:n] for name in BUFFER_ROWS})


def refill(buffer: Any, stored: Any) -> Any:
    """The empty `buffer` with a checkpoint's filled part, position and size put back."""
    rows = {
        name: getattr(buffer, name).at[: len(getattr(stored, name))].set(getattr(stored, name)) for name in BUFFER_ROWS
    }
    return buffer._replace(**rows, position=jax.numpy.asarray(stored.position), size=jax.numpy.asarray(stored.size))


def write_checkpoint(script: types.ModuleType, path: str, device_state: dict, host_state: dict) -> None:
    """Arrays and host state to `path`, through a temporary file renamed over it once whole and on disk: a kill or a
    full disk at any moment leaves the previous checkpoint."""
    arrays = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(jax.device_get(device_state)), sep="/")
    arrays = {name: x for name, x in arrays.items() if x is not None}  # absent target networks: nothing to store
    meta = np.frombuffer(json.dumps(host_state, default=np.ndarray.tolist).encode(), np.uint8)
    tmp_path = path + ".tmp"
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(tmp_path, "wb") as f:
            np.savez(f, __host_state__=meta, **arrays)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise script.ConfigError(f"cannot write checkpoint {path}: {e.strerror}") from None


def read_checkpoint(script: types.ModuleType, path: str, with_arrays: bool = True) -> tuple[dict, dict]:
    """({"agent/critic/params/...": array}, host state) of a checkpoint of this script; one-line errors otherwise.
    `with_arrays=False` reads the host state alone (the archive's members load lazily)."""
    ConfigError, path = script.ConfigError, checkpoint_file(path)
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            host_state = json.loads(data["__host_state__"].tobytes())
            names = [name for name in data.files if name != "__host_state__"] if with_arrays else []
            arrays = {name: data[name] for name in names}
    except Exception as e:  # a truncated or foreign file fails in many ways inside zipfile and numpy
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__})") from None
    if not isinstance(host_state, dict):
        raise ConfigError(f"{path} is not a readable checkpoint (its host state is not a JSON object)")
    if host_state.get("script") != script_name(script):
        raise ConfigError(f"{path} was written by {host_state.get('script')}, not by {script_name(script)}")
    args = args_from_saved(script, host_state.get("args"), f"{path}'s hyperparameters")
    host_state.setdefault("episodic_return", float("nan"))  # checkpoints before 2026-12-06 lack it
    for name, kind in HOST_STATE.items():  # read back as the command line is: types, then ranges
        if name not in host_state or not of_type(host_state[name], kind):
            raise ConfigError(f"{path}: its host state's {name} is missing or not of type {kind}")
    if not 0 <= host_state["global_step"] <= args.total_timesteps or host_state["train_seconds"] < 0:
        raise ConfigError(f"{path}: its host state's global_step or train_seconds is out of range")
    if host_state["run_name"] in ("", ".", "..") or "/" in host_state["run_name"]:
        raise ConfigError(f"{path}: its host state's run_name {host_state['run_name']!r} is not a folder name")
    return arrays, {**host_state, "args": dataclasses.asdict(args)}  # flags added since: their defaults


def args_from_saved(script: types.ModuleType, saved: Any, source: str) -> Any:
    """A saved run's hyperparameters (a checkpoint's, an args.json, a model's) checked as the command line's are:
    every flag there with a value of its type, in its range; anything else is one line."""
    Args, ConfigError = script.Args, script.ConfigError
    names = {field.name for field in dataclasses.fields(Args)}
    if isinstance(saved, dict):  # runs saved before a flag was added ran as its default does
        added = getattr(script, "FLAGS_ADDED_SINCE", set())
        saved = {**{name: getattr(Args(), name) for name in added if name not in saved}, **saved}
    if not isinstance(saved, dict) or set(saved) != names:
        missing = sorted(names - set(saved)) if isinstance(saved, dict) else []
        detail = f"it lacks {', '.join(missing)}" if missing else "its entries are not this script's flags"
        raise ConfigError(f"{source} are not this script's ({detail})")
    hints = typing.get_type_hints(Args, include_extras=False)
    for name, value in saved.items():
        if not of_type(value, hints[name]):
            raise ConfigError(f"{source}: {name} is {value!r}, not of type {hints[name]}")
    args = Args(**saved)
    try:
        script.check_args(args)
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}") from None
    return args


def of_type(value: Any, hint: Any) -> bool:
    """Whether a value read from JSON fits a type (a Literal: one of its values); an int fits a float, a bool no
    number."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return any(of_type(value, option) for option in typing.get_args(hint))
    if typing.get_origin(hint) is typing.Literal:
        return value in typing.get_args(hint)
    if hint is type(None):
        return value is None
    if isinstance(value, bool):
        return hint is bool
    return isinstance(value, hint) or (hint is float and isinstance(value, int))


def restore(script: types.ModuleType, template: Any, arrays: dict) -> Any:
    """`template` (a pytree of the right structure) with its leaves taken from a checkpoint's arrays, each checked
    to be of the dtype and shape of the leaf it fills."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(template), sep="/", keep_empty_nodes=True)
    absent = lambda leaf: leaf is None or leaf is flax.traverse_util.empty_node  # None: no target networks
    for name, leaf in flat.items():
        if absent(leaf):
            continue
        if name not in arrays:
            raise script.ConfigError(f"the checkpoint lacks {name}")
        got, expected = np.asarray(arrays[name]), np.shape(leaf)
        kind = np.dtype(getattr(leaf, "dtype", type(leaf))).kind
        rows = 1 if name.startswith("episode_actions") else 0  # the episode's actions: any number
        if got.dtype.kind != kind or got.ndim != len(expected) or got.shape[rows:] != expected[rows:]:
            raise script.ConfigError(f"the checkpoint's {name} is {got.dtype}{list(got.shape)}, not {list(expected)}")
    state = flax.traverse_util.unflatten_dict({name: arrays.get(name, leaf) for name, leaf in flat.items()}, sep="/")
    return flax.serialization.from_state_dict(template, state)


# ---------------------------------------------------------------------------------------------------------------------
# --eval-model: the evaluation of a saved model
# ---------------------------------------------------------------------------------------------------------------------
def read_saved_model(script: types.ModuleType, path: str) -> tuple[Any, dict, str]:
    """(the run's Args, its actor's variables, its run name) from a run directory, the file --save-model wrote, or
    a checkpoint; a one-line error for anything else."""
    ConfigError = script.ConfigError
    if not os.path.exists(path):
        raise ConfigError(f"--eval-model: no such file or directory: {path}")
    if os.path.isdir(path):
        models = sorted(name for name in os.listdir(path) if name.endswith(MODEL_SUFFIX))
        if models:
            path = os.path.join(path, models[0])
        elif os.path.exists(os.path.join(path, CHECKPOINT_FILE)):
            path = os.path.join(path, CHECKPOINT_FILE)
        else:
            raise ConfigError(f"{path} holds neither a model saved with --save-model nor a {CHECKPOINT_FILE}")
    if not path.endswith((MODEL_SUFFIX, ".npz")):
        raise ConfigError(f"{path} is neither a model saved with --save-model ({MODEL_SUFFIX}) nor a checkpoint")
    run_dir = os.path.dirname(os.path.abspath(path))
    if path.endswith(MODEL_SUFFIX):
        try:
            with open(path, "rb") as f:
                model = flax.serialization.msgpack_restore(f.read())
            actor = model["actor"]
        except Exception as e:  # a truncated or foreign file fails in many ways inside msgpack
            raise ConfigError(f"{path} is not a model file written by --save-model ({type(e).__name__})") from None
        if "args" in model:  # the model's own hyperparameters: its networks' architecture
            saved_args = args_from_saved(script, json.loads(model["args"]), f"{path}'s hyperparameters")
        else:  # a model saved before they were in it: its run's args.json
            try:
                with open(os.path.join(run_dir, ARGS_FILE)) as f:
                    saved = json.load(f)
            except (OSError, ValueError) as e:
                raise ConfigError(f"{path} needs its run's {ARGS_FILE} beside it ({e})") from None
            saved_args = args_from_saved(script, saved, os.path.join(run_dir, ARGS_FILE))
        return saved_args, actor, os.path.basename(run_dir)
    arrays, host_state = read_checkpoint(script, path)
    prefix = "agent/actor/"
    actor = {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}
    # A checkpoint's flat names drop an empty `batch_stats` (an actor without normalisation): put it back.
    actor = {"batch_stats": {}, **flax.traverse_util.unflatten_dict(actor, sep="/")}
    return script.Args(**host_state["args"]), actor, host_state["run_name"]


def evaluate_model(script: types.ModuleType, args: Any) -> dict:
    """--eval-model: `--eval-episodes` episodes of the saved deterministic policy; prints their mean and std."""
    ConfigError = script.ConfigError
    if args.eval_episodes <= 0:
        raise ConfigError(f"--eval-episodes must be positive (got {args.eval_episodes})")
    script.check_args(dataclasses.replace(script.Args(), seed=args.seed))
    script.check_extras(dataclasses.replace(args, track=False))  # first: it may pick MuJoCo's renderer
    saved_args, saved_actor, run_name = read_saved_model(script, args.eval_model)
    script.check_env(saved_args.env_id, render=args.capture_video)
    # Seeded as the training run's evaluations are: a run evaluated only at its end gets the same returns.
    eval_seed = args.seed + 10_000
    env = script.make_env(saved_args.env_id, eval_seed, args.capture_video, f"{run_name}-eval")()
    env.reset(seed=eval_seed)
    shape = env.observation_space.shape[0], env.action_space.shape[0]
    agent = script.create_agent(saved_args, *shape, jax.random.PRNGKey(0))
    template = script.variables_of(agent.actor)
    try:
        actor = agent.actor.replace(**flax.serialization.from_state_dict(template, saved_actor))
        shapes = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), template, script.variables_of(actor))
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{args.eval_model} does not hold an actor of its run's shape ({e})") from None
    if not all(jax.tree.leaves(shapes)):
        raise ConfigError(f"{args.eval_model} does not hold an actor of its run's shape")
    try:
        returns = script.evaluate(actor, env, args.eval_episodes)
    finally:
        env.close()  # writes the last video
    print(
        f"{run_name} on {saved_args.env_id}: eval/episodic_return={np.mean(returns):.1f} +- {np.std(returns):.1f} "
        f"({len(returns)} episodes of the deterministic policy, seed {eval_seed})",
        flush=True,
    )
    video_folder = os.path.join("videos", f"{run_name}-eval") if args.capture_video else None
    if video_folder:
        print(f"videos of the episodes in {video_folder}", flush=True)
    return {"eval_return": float(np.mean(returns)), "returns": returns, "video_folder": video_folder}


# ---------------------------------------------------------------------------------------------------------------------
# --q-bias-freq (the paper's Figures 7 and 17): Chen et al.'s (REDQ) protocol as the CrossQ authors ran it
# (`-eval_qbias 1`): episodes of the current policy from fresh resets, at most 1000 steps each; the Monte-Carlo return
# from each of an episode's first `cutoff` states (later states have too little episode left for it), soft for SAC
# bases, discounted for TD3's deterministic policy; the critics' mean prediction for the same (s, a) against it; the
# bias normalised per state by |MC| floored at 10.
# ---------------------------------------------------------------------------------------------------------------------
Q_BIAS_MAX_EPISODE_STEPS = 1000
Q_BIAS_MIN_NORMALISER = 10.0
Q_BIAS_SEED_OFFSET = 20_000  # its env's seeds and key: apart from training's (seed) and evaluation's (seed + 10_000)


def soft_returns(rewards: np.ndarray, logps: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """Soft Q of each step of one episode: G_t = r_t + gamma * (G_{t+1} - alpha * logp_{t+1}), G_{T-1} = r_{T-1}.
    The entropy bonus starts at the next action, as in the critic's target r + gamma * (Q(s', a') -
    alpha * log pi(a'|s')): Q(s, a) takes a as given. Chen et al.'s code does the same; the CrossQ
    authors' JAX port of it counts the bonus of a_t itself and drops the last one. alpha 0: the discounted return."""
    returns, following = np.zeros(len(rewards)), 0.0  # following: G_{t+1} - alpha * logp_{t+1}
    for t in reversed(range(len(rewards))):
        returns[t] = rewards[t] + gamma * following
        following = returns[t] - alpha * logps[t]
    return returns


def q_bias(env: gym.Env, policy, q_values, alpha: float, gamma: float, n_samples: int, cutoff: int, key) -> dict:
    """Mean and std of the critic's normalised bias on the first `n_samples` states of episodes of `policy`
    (obs, key -> action, log pi(action|obs)); `q_values` (states, actions) -> the critics' mean Q."""
    states, actions, returns = [], [], []
    while len(returns) < n_samples:
        obs, _ = env.reset()
        episode_states, episode_actions, rewards, logps = [], [], [], []
        for _ in range(Q_BIAS_MAX_EPISODE_STEPS):
            key, action_key = jax.random.split(key)
            action, logp = policy(obs, action_key)
            episode_states.append(obs)
            episode_actions.append(action)
            obs, reward, terminated, truncated, _ = env.step(action)
            rewards.append(float(reward))
            logps.append(logp)
            if terminated or truncated:
                break
        states += episode_states[:cutoff]
        actions += episode_actions[:cutoff]
        returns += list(soft_returns(np.asarray(rewards), np.asarray(logps), alpha, gamma)[:cutoff])
    states, actions = (np.asarray(x[:n_samples], np.float32) for x in (states, actions))
    return q_bias_statistics(np.asarray(q_values(states, actions), np.float64), np.asarray(returns[:n_samples]))


def q_bias_statistics(q: np.ndarray, mc: np.ndarray) -> dict[str, float]:
    """The bias Q - MC over two normalisers: each state's max(|MC|, 10), as Chen et al.'s and the
    CrossQ authors' code (the paper's figures), and max(|mean MC|, 10) over all states alike."""
    bias = q - mc
    per_state = bias / np.maximum(np.abs(mc), Q_BIAS_MIN_NORMALISER)
    global_ = bias / max(abs(mc.mean()), Q_BIAS_MIN_NORMALISER)
    return {
        "q_bias_mean": float(per_state.mean()),
        "q_bias_std": float(per_state.std()),
        "q_bias_global_mean": float(global_.mean()),
        "q_bias_global_std": float(global_.std()),
        "q_value": float(q.mean()),
        "mc_return": float(mc.mean()),
    }


def log_q_bias(script: types.ModuleType, writer: Any, agent: Any, args: Any, step: int) -> dict:
    """Measure the critic's Q bias at env `step` with `script.q_bias_pass`, log it under eval/ and print it. Its own
    env, reseeded from the step, and its own key: training's env, keys and generators stay untouched, and a resumed
    run measures what an uninterrupted one does."""
    env = script.make_env(args.env_id, args.seed + Q_BIAS_SEED_OFFSET)()
    env.reset(seed=args.seed + Q_BIAS_SEED_OFFSET + step)
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed + Q_BIAS_SEED_OFFSET), step)
    key, critic_key = jax.random.split(key)
    alpha = float(
        script.q_bias_pass(
            agent,
            np.zeros((1, env.observation_space.shape[0]), np.float32),
            np.zeros((1, env.action_space.shape[0]), np.float32),
            critic_key,
        )[2]
    )

    def policy(obs: np.ndarray, action_key: jax.Array) -> tuple[np.ndarray, float]:
        actions = np.zeros((1, env.action_space.shape[0]), np.float32)
        _, (action, logp), _ = script.q_bias_pass(agent, obs[None].astype(np.float32), actions, action_key)
        return np.asarray(action)[0], float(logp[0])

    critic = lambda obs, actions: script.q_bias_pass(agent, obs, actions, critic_key)[0]
    try:
        stats = q_bias(env, policy, critic, alpha, args.gamma, args.q_bias_samples, args.q_bias_cutoff, key)
    finally:
        env.close()
    for name, value in stats.items():
        writer.add_scalar(f"eval/{name}", value, step)
    print(
        f"step={step} eval/q_bias_mean={stats['q_bias_mean']:.3f} eval/q_bias_std={stats['q_bias_std']:.3f} "
        f"(over |mean MC|: {stats['q_bias_global_mean']:.3f} +- {stats['q_bias_global_std']:.3f}; "
        f"Q {stats['q_value']:.2f} vs MC {stats['mc_return']:.2f} on {args.q_bias_samples} states)",
        flush=True,
    )
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# DeepMind Control (the paper's Appendix A.1), through shimmy
# ---------------------------------------------------------------------------------------------------------------------
def import_dm_control(script: types.ModuleType) -> None:
    """Register the `dm_control/<domain>-<task>` ids (importing shimmy does), or say what to install."""
    # dm_control picks its OpenGL backend once, on import. Training renders nothing: without a display, take
    # headless EGL where its library exists and no backend otherwise, rather than GLFW, which wants a display. A
    # MUJOCO_GL set by the user wins.
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "disable"
    try:
        import dm_control.suite  # noqa: F401
        import shimmy  # noqa: F401
    except ImportError as e:
        raise script.ConfigError(
            f"DeepMind Control envs need shimmy and dm-control ({e}): pip install -r requirements-dmc.txt"
        ) from None
