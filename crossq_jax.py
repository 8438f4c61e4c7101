# CrossQ (SAC base) in JAX: Bhatt, Palenicek et al., "CrossQ: Batch Normalization in Deep
# Reinforcement Learning for Greater Sample Efficiency and Simplicity", ICLR 2024,
# https://arxiv.org/abs/1902.05605 (the authors' code: https://github.com/adityab/CrossQ).
# One self-contained file: Batch Renormalization layer, networks, replay buffer, jitted
# joint-pass update and training loop. Copy it, read it top to bottom, change it.
# Its documentation page (usage, logged metrics, implementation details, results): docs/crossq.md.
import contextlib
import ctypes.util
import dataclasses
import functools
import io
import itertools
import json
import operator
import os
import random
import shutil
import signal
import sys
import time
import types
import typing
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Any, NamedTuple

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState

# The critics' activations: the eight of the paper's Figure 16 (as the authors' sbx/sac/utils.py
# defines them, see CriticActivation), then gelu and silu.
CRITIC_ACTIVATIONS = ("relu", "tanh", "elu", "glu", "relu6", "sin", "relu_over_max", "layernormed_relu", "gelu", "silu")
BN_MODES = ("brn", "bn", "none", "layernorm")


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment: the env, its action space and the JAX keys all derive from it"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases"""
    wandb_project_name: str = "crossq"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record the first episode of each evaluation to `videos/{run_name}`"""
    save_model: bool = False
    """if toggled, save the actor and critic (parameters and batch statistics) to `runs/{run_name}`"""
    eval_model: str | None = None
    """evaluate a saved model (a run directory, its `--save-model` file, or a checkpoint) for `--eval-episodes`
    episodes and exit, without training; `--seed` and `--capture-video` apply, the rest comes from the saved run"""

    # Algorithm specific arguments (defaults: the CrossQ column of the paper's Table 1)
    env_id: str = "Hopper-v4"
    """the id of the environment (any gymnasium env with a continuous Box action space; DeepMind Control as
    `dm_control/<domain>-<task>`)"""
    total_timesteps: int = 1_000_000
    """total timesteps of the experiment (env steps)"""
    learning_starts: int = 5_000
    """env steps of uniform-random actions before learning starts"""
    gamma: float = 0.99
    """the discount factor gamma"""
    learning_rate: float = 1e-3
    """the learning rate of the actor, critic and entropy-coefficient optimizers"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    batch_size: int = 256
    """the batch size of sample from the replay memory (the joint pass sees twice as many rows)"""
    critic_activation: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(CRITIC_ACTIVATIONS) + "}")] = "relu"
    """the activation of the critics' hidden layers (the actor always uses relu); glu halves the width"""
    bn_mode: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(BN_MODES) + "}")] = "brn"
    """normalisation layers: Batch Renormalization, plain BatchNorm, none, or layernorm (the paper's LayerNorm
    ablation: LayerNorm before each hidden activation of the critics, no normalisation in the actor)"""
    bn_momentum: float = 0.99
    """momentum of the running statistics of the normalisation layers"""
    bn_warmup_steps: int = 100_000
    """train-mode calls of a BRN layer during which it acts as plain BatchNorm"""
    actor_bn: bool = True
    """normalise the actor too (`--no-actor-bn`: the paper's critic-only ablation)"""
    critic_width: int = 2048
    """the width of the critic's two hidden layers"""
    actor_width: int = 256
    """the width of the actor's two hidden layers"""
    adam_b1: float = 0.5
    """Adam's beta1 for the actor and the critic"""
    utd: int = 1
    """update-to-data ratio: critic updates per env step"""
    policy_delay: int = 3
    """the actor (and alpha) is updated after every `policy_delay`-th critic update"""
    n_critics: int = 2
    """the number of critics in the ensemble (the TD target takes their minimum)"""
    eval_freq: int = 10_000
    """evaluate the deterministic policy every `eval_freq` env steps (0: only at the end)"""
    eval_episodes: int = 10
    """the number of episodes of each evaluation"""
    log_freq: int = 1_000
    """log losses every `log_freq` env steps and print a progress line"""
    q_bias_freq: int = 0
    """measure the critic's Q bias every `q_bias_freq` env steps (0: off; the paper's Figures 7 and 17)"""
    q_bias_samples: int = 1_000
    """the states (s, a) each Q-bias measurement compares the critic's Q with their Monte-Carlo return on"""
    q_bias_cutoff: int = 350
    """only the first `q_bias_cutoff` states of each Q-bias episode count (later ones have too little episode left)"""
    checkpoint_freq: int = 0
    """write a checkpoint to `runs/{run_name}/checkpoint.npz` every `checkpoint_freq` env steps (0: off;
    SIGTERM and Ctrl-C write one whatever this says)"""
    resume: str | None = None
    """continue the run saved in this run directory or checkpoint file, with its hyperparameters"""


# Named starting points for the flags, picked by a word in front of them (the first: when none is given); flags after
# the word override its values. `small` is the paper's CrossQ (small) of Table 2 and Figure 9: 256-wide critics.
#   python crossq_jax.py small --env-id Hopper-v4
PRESETS: dict[str, tuple[str, Args]] = {
    "crossq": ("CrossQ with the paper's Table 1 hyperparameters (the defaults)", Args()),
    "small": (
        "CrossQ (small): 256-wide critics, as in the paper's Table 2",
        Args(exp_name=f"{Args.exp_name}_small", critic_width=256),
    ),
}


def make_env(
    env_id: str,
    seed: int,
    capture_video: bool = False,
    run_name: str = "",
    record_episode: Callable[[int], bool] = lambda episode: episode > 0,
) -> Callable[[], gym.Env]:
    """A thunk (CleanRL's convention) that builds the env with the agent's [-1, 1] action scale. With
    `capture_video`, the episodes `record_episode(i)` picks go to `videos/{run_name}` as MP4 files
    (episode 0 is the `reset(seed=...)` that seeds the env, not a played episode)."""

    def thunk() -> gym.Env:
        if capture_video:
            env = gym_make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=record_episode)
        else:
            env = gym_make(env_id)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        # The agent acts in [-1, 1] (tanh squashing); the wrapper maps to [low, high].
        env = gym.wrappers.RescaleAction(env, np.float32(-1.0), np.float32(1.0))
        env.action_space.seed(seed)
        return env

    return thunk


DMC_PREFIX = "dm_control/"  # DeepMind Control Suite ids, as shimmy registers them (Appendix A.1 of the paper)


def import_dm_control() -> None:
    """Register the `dm_control/<domain>-<task>` ids (importing shimmy does), or say what to install."""
    # dm_control picks its OpenGL backend once, on import. Training renders nothing: without a
    # display, take headless EGL where its library exists and no backend otherwise, rather than
    # GLFW, which wants a display. A MUJOCO_GL set by the user wins.
    if "MUJOCO_GL" not in os.environ and not os.environ.get("DISPLAY"):
        os.environ["MUJOCO_GL"] = "egl" if ctypes.util.find_library("EGL") else "disable"
    try:
        import dm_control.suite  # noqa: F401
        import shimmy  # noqa: F401
    except ImportError as e:
        raise ConfigError(
            f"DeepMind Control envs need shimmy and dm-control ({e}): pip install -r requirements-dmc.txt"
        ) from None


def mujoco_warning(message: str) -> None:
    """MuJoCo's warnings as Python's (shown once each, filterable), instead of its own printing and appending to
    MUJOCO_LOG.TXT in the working folder. MuJoCo 4 warns that the v4 envs' models use `settotalmass`, which it
    deprecates: that one, the paper's envs' own, is dropped."""
    if "settotalmass" not in message:
        warnings.warn(f"MuJoCo: {message.strip()}", RuntimeWarning, stacklevel=2)


def gym_make(env_id: str, **kwargs) -> gym.Env:
    if env_id.startswith(DMC_PREFIX):
        import_dm_control()
    with contextlib.suppress(ImportError):  # MuJoCo envs: before their models compile
        import mujoco

        mujoco.set_mju_user_warning(mujoco_warning)
    with warnings.catch_warnings():
        # The paper's results are on the v4 MuJoCo envs, which gymnasium 1.x calls out of date at every make.
        warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
        env = gym.make(env_id, **kwargs)
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        # The networks take one vector. DeepMind Control observes a dict of arrays: each entry flattened (a scalar
        # gives one number), in the Dict space's key order, which gymnasium sorts alphabetically (as the authors'
        # SB3 MultiInputPolicy concatenates them); an image or matrix Box is raveled.
        try:
            env = gym.wrappers.FlattenObservation(env)
        except Exception:  # a space gymnasium cannot flatten (a custom one)
            env = None
        flat = env is not None and isinstance(env.observation_space, gym.spaces.Box)  # a Graph flattens to a Graph
        if not flat or len(env.observation_space.shape) != 1:
            raise ConfigError(f"{env_id} has observations of {space}, which do not flatten into a vector")
    return env


# ALGO LOGIC: Batch Renormalization
class BatchRenorm(nn.Module):
    """Batch Renormalization (Ioffe, 2017) as CrossQ uses it; a drop-in for `flax.linen.BatchNorm`.

    Normalises over every axis but the last. In train mode (`use_running_average=False`, the
    `batch_stats` collection mutable) it computes the batch mean `mu_B` and biased variance
    `var_B`, and the correction factors against the running statistics `mu_R`, `var_R`:

        r = clip(sqrt(var_B + eps) / sqrt(var_R + eps), 1 / r_max, r_max)      (no gradient)
        d = clip((mu_B - mu_R) / sqrt(var_R + eps), -d_max, d_max)             (no gradient)
        y = scale * (x - mean) / sqrt(var + eps) + bias, with
            mean, var = mu_B - d * sqrt(var_B) / r, var_B / r**2    after `warmup_steps` train calls
            mean, var = mu_B, var_B                                before (plain BatchNorm)

    i.e. y ~ scale * (r * (x - mu_B) / sqrt(var_B) + d) + bias: the output matches what the
    running statistics would give, while gradients still flow through mu_B and var_B. Each
    train call then moves the running statistics toward the raw batch statistics with
    `momentum` and increments the `steps` counter (also in `batch_stats`: checkpoint it).
    In eval mode, y = scale * (x - mu_R) / sqrt(var_R + eps) + bias and nothing changes.
    With `r_max=1, d_max=0` the layer is exactly plain BatchNorm (r = 1, d = 0).
    """

    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features = (x.shape[-1],)
        reduction_axes = tuple(range(x.ndim - 1))
        running_mean = self.variable("batch_stats", "mean", lambda: jnp.zeros(features, jnp.float32))
        running_var = self.variable("batch_stats", "var", lambda: jnp.ones(features, jnp.float32))
        steps = self.variable("batch_stats", "steps", lambda: jnp.zeros((), jnp.int32))
        scale = self.param("scale", nn.initializers.ones, features)
        bias = self.param("bias", nn.initializers.zeros, features)

        if use_running_average:
            mean, var = running_mean.value, running_var.value
        else:
            batch_mean = x.mean(reduction_axes)
            batch_var = jnp.maximum((x**2).mean(reduction_axes) - batch_mean**2, 0.0)
            running_std = jnp.sqrt(running_var.value + self.epsilon)
            r = jax.lax.stop_gradient(
                jnp.clip(jnp.sqrt(batch_var + self.epsilon) / running_std, 1.0 / self.r_max, self.r_max)
            )
            d = jax.lax.stop_gradient(
                jnp.clip((batch_mean - running_mean.value) / running_std, -self.d_max, self.d_max)
            )
            # sqrt(var_B) with a zero (not infinite) gradient where var_B == 0: a dead ReLU unit
            # has a constant output over the batch and must not turn the update into NaN.
            positive = batch_var > 0.0
            batch_std = jnp.where(positive, jnp.sqrt(jnp.where(positive, batch_var, 1.0)), 0.0)
            renormalise = steps.value >= self.warmup_steps
            mean = jnp.where(renormalise, batch_mean - d * batch_std / r, batch_mean)
            var = jnp.where(renormalise, batch_var / r**2, batch_var)
            if not self.is_initializing():
                m = self.momentum
                running_mean.value = m * running_mean.value + (1.0 - m) * jax.lax.stop_gradient(batch_mean)
                running_var.value = m * running_var.value + (1.0 - m) * jax.lax.stop_gradient(batch_var)
                steps.value = steps.value + 1

        # scale and rsqrt folded into one per-feature factor first: one multiply per element, not two.
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


# ALGO LOGIC: networks
class CriticActivation(nn.Module):
    """The critics' activation (`--critic-activation`), each as the authors' sbx/sac/utils.py defines it.

    glu is flax's: the first half of the features times the sigmoid of the second half, so the next
    Dense sees half the width. relu_over_max divides relu(x) by (the max of relu(x) + 1e-6) over the
    whole tensor, every row of the batch and every feature (the paper's text says "over the feature
    vector"; the code takes one max). layernormed_relu is LayerNorm(relu(x)) with a learned scale and bias.
    """

    kind: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.kind == "layernormed_relu":
            return nn.LayerNorm()(nn.relu(x))
        if self.kind == "relu_over_max":
            x = nn.relu(x)
            return x / (x.max() + 1e-6)
        elementwise = {"relu": nn.relu, "tanh": nn.tanh, "elu": nn.elu, "relu6": nn.relu6, "sin": jnp.sin}
        return {**elementwise, "glu": nn.glu, "gelu": nn.gelu, "silu": nn.silu}[self.kind](x)


class Normalization(nn.Module):
    """The normalisation layer the `--bn-mode` flag selects: BRN, plain BN (BRN with r=1, d=0 and flax's epsilon) or
    none (also for `layernorm`, whose LayerNorm sits elsewhere: see Critic)."""

    mode: str = "brn"
    momentum: float = 0.99
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.mode in ("none", "layernorm"):
            return x
        # Plain BN is flax's BatchNorm, as in the authors' plain-BN runs: its epsilon is 1e-5, not BRN's 1e-3 (with
        # 1e-3 a feature of variance below about 1e-3 would come out shrunk instead of normalised).
        bn = {"r_max": 1.0, "d_max": 0.0, "epsilon": 1e-5}
        limits = {"brn": {"r_max": 3.0, "d_max": 5.0}, "bn": bn}[self.mode]
        return BatchRenorm(
            use_running_average=not train, momentum=self.momentum, warmup_steps=self.warmup_steps, **limits
        )(x)


class Critic(nn.Module):
    """Q(s, a): concat(s, a) -> norm -> [Dense -> act -> norm] x 2 -> Dense(1).

    With `bn_mode` layernorm (the authors' `-bn 0 -ln 1` runs): concat(s, a) -> [Dense -> LayerNorm ->
    act] x 2 -> Dense(1), each row normalised over its own features.
    """

    width: int = 2048
    activation: str = "relu"
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array, train: bool) -> jax.Array:
        norm = lambda: Normalization(self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        x = norm()(jnp.concatenate([obs, actions], axis=-1), train)
        for _ in range(2):
            x = nn.Dense(self.width)(x)
            if self.bn_mode == "layernorm":
                x = nn.LayerNorm()(x)
            x = norm()(CriticActivation(self.activation)(x), train)
        return nn.Dense(1)(x).squeeze(-1)


class CriticEnsemble(Critic):
    """`n_critics` independent critics, each a Critic with these settings, evaluated in one vectorised call; returns
    (n_critics, batch)."""

    n_critics: int = 2

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array, train: bool) -> jax.Array:
        ensemble = nn.vmap(
            Critic,
            variable_axes={"params": 0, "batch_stats": 0},
            split_rngs={"params": True},
            in_axes=None,
            out_axes=0,
            axis_size=self.n_critics,
        )
        return ensemble(self.width, self.activation, self.bn_mode, self.bn_momentum, self.bn_warmup_steps)(
            obs, actions, train
        )


LOG_STD_MIN, LOG_STD_MAX = -20.0, 2.0


class Actor(nn.Module):
    """pi(a|s): s -> norm -> [Dense -> relu -> norm] x 2 -> (mean, log_std) of a tanh-squashed Gaussian.
    relu whatever the critics use: the authors' activation flag changes the critics only."""

    action_dim: int
    width: int = 256
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, obs: jax.Array, train: bool) -> tuple[jax.Array, jax.Array]:
        norm = lambda: Normalization(self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        x = norm()(obs, train)
        for _ in range(2):
            x = norm()(nn.relu(nn.Dense(self.width)(x)), train)
        mean = nn.Dense(self.action_dim)(x)
        log_std = jnp.clip(nn.Dense(self.action_dim)(x), LOG_STD_MIN, LOG_STD_MAX)
        return mean, log_std


def sample_tanh_gaussian(mean: jax.Array, log_std: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Reparameterised sample a = tanh(u), u ~ N(mean, std), and log pi(a|s) with the tanh correction."""
    std = jnp.exp(log_std)
    noise = jax.random.normal(key, mean.shape)
    u = mean + std * noise
    gaussian_logp = -0.5 * noise**2 - log_std - 0.5 * jnp.log(2.0 * jnp.pi)
    # log(1 - tanh(u)^2), written stably as 2 * (log 2 - u - softplus(-2u)).
    log_det_tanh = 2.0 * (jnp.log(2.0) - u - jax.nn.softplus(-2.0 * u))
    return jnp.tanh(u), (gaussian_logp - log_det_tanh).sum(-1)


class BNTrainState(TrainState):
    """A flax TrainState that also carries the network's running statistics (`batch_stats`)."""

    batch_stats: Any


class AgentState(NamedTuple):
    actor: BNTrainState
    critic: BNTrainState
    log_alpha: TrainState  # log of the entropy coefficient, learned


class Metrics(NamedTuple):
    """What the update reports; carried between steps so that delayed actor losses stay visible."""

    qf_loss: jax.Array
    qf_values: jax.Array
    actor_loss: jax.Array
    alpha_loss: jax.Array
    alpha: jax.Array
    nonfinite_step: jax.Array  # first env step with a NaN/inf loss, -1 while all is well
    nonfinite_loss: jax.Array  # which loss it was: an index into LOSS_NAMES

    @classmethod
    def initial(cls) -> "Metrics":
        # Distinct arrays, not one shared zero: the update donates these buffers.
        zeros = [jnp.zeros((), jnp.float32) for _ in range(4)]
        return cls(*zeros, jnp.ones((), jnp.float32), jnp.full((), -1, jnp.int32), jnp.zeros((), jnp.int32))


LOSS_NAMES = ("qf_loss", "actor_loss", "alpha_loss")


# ALGO LOGIC: replay buffer, on the device so that sampling happens inside the jitted update
class ReplayBuffer(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminations: jax.Array  # 1.0 on a true terminal only; time-limit truncations bootstrap
    position: jax.Array  # where the next transition goes
    size: jax.Array  # how many slots hold data

    @classmethod
    def create(cls, capacity: int, obs_dim: int, action_dim: int) -> "ReplayBuffer":
        zeros = lambda *shape: jnp.zeros(shape, jnp.float32)
        return cls(
            obs=zeros(capacity, obs_dim),
            actions=zeros(capacity, action_dim),
            rewards=zeros(capacity),
            next_obs=zeros(capacity, obs_dim),
            terminations=zeros(capacity),
            position=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32),
        )


class Transition(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminations: jax.Array


def buffer_add(buffer: ReplayBuffer, transition: Transition) -> ReplayBuffer:
    capacity = buffer.rewards.shape[0]
    i = buffer.position
    stored = {name: getattr(buffer, name).at[i].set(value) for name, value in transition._asdict().items()}
    return buffer._replace(**stored, position=(i + 1) % capacity, size=jnp.minimum(buffer.size + 1, capacity))


def buffer_sample(buffer: ReplayBuffer, key: jax.Array, batch_size: int) -> Transition:
    indices = jax.random.randint(key, (batch_size,), 0, buffer.size)
    return Transition(*(getattr(buffer, name)[indices] for name in Transition._fields))


def pack_step(obs, action, reward, terminated, next_obs, policy_obs) -> np.ndarray:
    """An env step as the one float32 array it crosses to the device in: the transition, then the observation
    the next action is drawn for (`next_obs`, or the next episode's first after a reset)."""
    return np.concatenate([obs, action, [reward, terminated], next_obs, policy_obs], dtype=np.float32)


def store_step(buffer: ReplayBuffer, step_data: jax.Array) -> tuple[ReplayBuffer, jax.Array]:
    """Write the transition of a `pack_step` array to the buffer; hand back its observation for the next action,
    now on the device (a batch of one), so that the step needs no second transfer."""
    obs_dim, action_dim = buffer.obs.shape[1], buffer.actions.shape[1]
    ends = np.cumsum([obs_dim, action_dim, 2, obs_dim])
    obs, action, (reward, terminated), next_obs, policy_obs = jnp.split(step_data, ends)
    return buffer_add(buffer, Transition(obs, action, reward, next_obs, terminated)), policy_obs[None]


# ALGO LOGIC: the CrossQ update
def create_agent(args: Args, obs_dim: int, action_dim: int, key: jax.Array) -> AgentState:
    """Fresh actor, critic ensemble and entropy coefficient; the modules ride along as `apply_fn`."""
    norm = {"bn_momentum": args.bn_momentum, "bn_warmup_steps": args.bn_warmup_steps}
    # The actor has no normalisation with --no-actor-bn, and in the LayerNorm ablation (as the authors' runs).
    actor_bn_mode = args.bn_mode if args.actor_bn and args.bn_mode != "layernorm" else "none"
    actor = Actor(action_dim, args.actor_width, actor_bn_mode, **norm)
    critic = CriticEnsemble(args.critic_width, args.critic_activation, args.bn_mode, **norm, n_critics=args.n_critics)
    actor_key, critic_key = jax.random.split(key)
    obs, actions = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    # Each init is one jitted call: run eagerly, every op of the forward pass would be compiled on its own.
    actor_vars = jax.jit(actor.init, static_argnames="train")(actor_key, obs, train=False)
    critic_vars = jax.jit(critic.init, static_argnames="train")(critic_key, obs, actions, train=False)
    adam = optax.adam(args.learning_rate, b1=args.adam_b1)
    return AgentState(
        actor=BNTrainState.create(
            apply_fn=actor.apply, params=actor_vars["params"], batch_stats=actor_vars.get("batch_stats", {}), tx=adam
        ),
        critic=BNTrainState.create(
            apply_fn=critic.apply, params=critic_vars["params"], batch_stats=critic_vars.get("batch_stats", {}), tx=adam
        ),
        # alpha starts at 1.0; its Adam keeps the default betas.
        log_alpha=TrainState.create(
            apply_fn=None, params={"log_alpha": jnp.zeros((), jnp.float32)}, tx=optax.adam(args.learning_rate)
        ),
    )


def variables_of(state: BNTrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def critic_loss(params, agent: AgentState, batch: Transition, key: jax.Array, args: Args):
    """Soft TD loss from one joint pass; returns (loss, (new critic batch_stats, mean Q))."""
    alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
    next_mean, next_log_std = agent.actor.apply_fn(variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = sample_tanh_gaussian(next_mean, next_log_std, key)
    # The joint pass: (s, a) and (s', a') go through the critic together in train mode, so every
    # BRN layer normalises both halves with the statistics of all 2B rows. This is what lets
    # CrossQ drop the target network.
    q_all, updates = agent.critic.apply_fn(
        {"params": params, "batch_stats": agent.critic.batch_stats},
        jnp.concatenate([batch.obs, batch.next_obs]),
        jnp.concatenate([batch.actions, next_actions]),
        train=True,
        mutable=["batch_stats"],
    )
    q, next_q = jnp.split(q_all, 2, axis=1)  # each (n_critics, B)
    next_v = next_q.min(axis=0) - alpha * next_logp
    target = jax.lax.stop_gradient(batch.rewards + args.gamma * (1.0 - batch.terminations) * next_v)
    loss = 0.5 * ((q - target) ** 2).mean(axis=1).sum()
    return loss, (updates["batch_stats"], q.mean())


def actor_loss(params, agent: AgentState, obs: jax.Array, key: jax.Array):
    """SAC policy loss, actor in train mode, critic in eval mode; returns (loss, (new actor batch_stats, log pi))."""
    alpha = jnp.exp(agent.log_alpha.params["log_alpha"])
    (mean, log_std), updates = agent.actor.apply_fn(
        {"params": params, "batch_stats": agent.actor.batch_stats}, obs, train=True, mutable=["batch_stats"]
    )
    actions, logp = sample_tanh_gaussian(mean, log_std, key)
    q = agent.critic.apply_fn(variables_of(agent.critic), obs, actions, train=False)  # no statistics update
    loss = (alpha * logp - q.min(axis=0)).mean()
    return loss, (updates.get("batch_stats", {}), logp)


def alpha_loss(params: dict, logp: jax.Array, target_entropy: float) -> jax.Array:
    return -(params["log_alpha"] * jax.lax.stop_gradient(logp + target_entropy)).mean()


def make_train_step(args: Args, action_dim: int):
    """Build the jitted per-env-step program: the step's `utd` CrossQ updates, then the next env step's action.

    `train_step(agent, metrics, buffer, keys, obs, actor_updates)` -> (agent, metrics, keys, action for `obs`).
    `actor_updates` (static: one compiled program per pattern) says which of the step's critic updates the actor
    follows; the host knows it exactly (see `actor_update_pattern`). Deciding it inside the program would take a
    `lax.cond`, and on a GPU a conditional stops the launching thread until every kernel before it has finished.
    """
    target_entropy = -float(action_dim)

    def update_critic(agent: AgentState, metrics: Metrics, batch: Transition, key: jax.Array):
        (qf_loss, (batch_stats, qf_values)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            agent.critic.params, agent, batch, key, args
        )
        agent = agent._replace(critic=agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
        return agent, metrics._replace(qf_loss=qf_loss, qf_values=qf_values)

    def update_actor_and_alpha(agent: AgentState, metrics: Metrics, obs: jax.Array, key: jax.Array):
        (loss, (batch_stats, logp)), grads = jax.value_and_grad(actor_loss, has_aux=True)(
            agent.actor.params, agent, obs, key
        )
        actor_state = agent.actor.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
        entropy_loss, alpha_grad = jax.value_and_grad(alpha_loss)(agent.log_alpha.params, logp, target_entropy)
        log_alpha = agent.log_alpha.apply_gradients(grads=alpha_grad)
        metrics = metrics._replace(
            actor_loss=loss, alpha_loss=entropy_loss, alpha=jnp.exp(log_alpha.params["log_alpha"])
        )
        return agent._replace(actor=actor_state, log_alpha=log_alpha), metrics

    def updates(agent: AgentState, metrics: Metrics, inputs: tuple, with_actor: bool):
        """A critic update on each batch of `inputs` (batches, critic keys, actor keys), each followed by an actor
        update on the same batch if `with_actor`; also returns whether each update's losses are finite."""

        def update(carry, inputs):
            (agent, metrics), (batch, critic_key, actor_key) = carry, inputs
            agent, metrics = update_critic(agent, metrics, batch, critic_key)
            if with_actor:
                agent, metrics = update_actor_and_alpha(agent, metrics, batch.obs, actor_key)
            return (agent, metrics), jnp.isfinite(jnp.stack([getattr(metrics, name) for name in LOSS_NAMES]))

        # A loop of known length: on a GPU no host round trip (and XLA removes a loop of one update).
        return jax.lax.scan(update, (agent, metrics), inputs)

    def train_step(
        agent: AgentState,
        metrics: Metrics,
        buffer: ReplayBuffer,
        keys: dict,
        obs: jax.Array,
        actor_updates: tuple[bool, ...],
    ):
        # The buffer is only read here: storing happens in its own jitted call, since XLA on CPU copies whole
        # buffer columns when one call both writes and samples the buffer. All of the step's batches are drawn
        # first, so that no loop carries or closes over the buffer.
        next_update_key, step_key = jax.random.split(keys["update"])
        batch_keys, critic_keys, actor_keys = jnp.moveaxis(
            jax.vmap(lambda key: jax.random.split(key, 3))(jax.random.split(step_key, args.utd)), 1, 0
        )
        batches = jax.vmap(lambda key: buffer_sample(buffer, key, args.batch_size))(batch_keys)
        finite, done = [], 0
        for with_actor, run in itertools.groupby(actor_updates):  # runs of alike updates, in order
            n = len(list(run))
            part = operator.itemgetter(slice(done, done + n))
            inputs = jax.tree.map(part, (batches, critic_keys, actor_keys))
            done += n
            (agent, metrics), run_finite = updates(agent, metrics, inputs, with_actor)
            finite.append(run_finite)
        # Remember the first env step with a NaN/inf loss; the host looks at it only when it logs. Every update
        # counts, not only the step's last: at UTD 20 an inf loss in update k leaves the parameters finite but
        # Adam's second moment inf, and later updates may look fine. The env step follows from the update count.
        finite = jnp.concatenate(finite).all(axis=0)
        first = (metrics.nonfinite_step < 0) & ~finite.all()
        step = args.learning_starts + agent.critic.step // args.utd
        metrics = metrics._replace(
            nonfinite_step=jnp.where(first, step, metrics.nonfinite_step),
            nonfinite_loss=jnp.where(first, jnp.argmin(finite), metrics.nonfinite_loss),
        )
        # This step's action was drawn with split(explore key)[1] (see `explore`): move the key past it, then draw
        # the next step's action with the updated actor. The barrier keeps XLA from fusing the draw into the
        # updates: fused, its action could differ in the last bit from what `explore` alone draws (seen on a CPU),
        # and a resumed run, whose first action `explore` draws, would part from an uninterrupted one.
        explore_key = jax.random.split(keys["explore"])[0]
        action = explore(*jax.lax.optimization_barrier((agent.actor, obs, explore_key)))
        return agent, metrics, {"update": next_update_key, "explore": explore_key}, action

    return jax.jit(train_step, static_argnames="actor_updates", donate_argnums=(0, 1))


def actor_update_pattern(args: Args, step: int) -> tuple[bool, ...]:
    """Which of env step `step`'s `utd` critic updates the actor (and alpha) follows: every `policy_delay`-th
    critic update of the run, counted from learning_starts (a pure function of the step: the same on resume)."""
    updates_before = (step - args.learning_starts - 1) * args.utd
    return tuple((updates_before + i) % args.policy_delay == 0 for i in range(1, args.utd + 1))


# ALGO LOGIC: acting and evaluation
@jax.jit
def explore(actor_state: BNTrainState, obs: jax.Array, explore_key: jax.Array) -> jax.Array:
    """An exploration action sampled from pi (actor in eval mode) with split(explore_key)[1]. The key moves on to
    split(explore_key)[0] once that action is taken (in the next train_step), so that the key a checkpoint holds
    is the one the next draw uses."""
    mean, log_std = actor_state.apply_fn(variables_of(actor_state), obs, train=False)
    return sample_tanh_gaussian(mean, log_std, jax.random.split(explore_key)[1])[0]


@jax.jit
def deterministic_action(actor_state: BNTrainState, obs: jax.Array) -> jax.Array:
    """The deterministic evaluation action tanh(mean), actor in eval mode."""
    return jnp.tanh(actor_state.apply_fn(variables_of(actor_state), obs, train=False)[0])


def evaluate(actor_state: BNTrainState, env: gym.Env, n_episodes: int) -> list[float]:
    """Returns of `n_episodes` episodes of the deterministic policy."""
    returns = []
    for _ in range(n_episodes):
        obs, _ = env.reset()
        done, episode_return = False, 0.0
        while not done:
            action = np.asarray(deterministic_action(actor_state, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return returns


# ALGO LOGIC: the training loop
def train(args: Args) -> dict:
    """Run CrossQ as `args` says; returns the last evaluation's mean return and the run's name."""
    run = start_run(args)  # the checks that need no compiled program; nothing is allocated or written yet
    obs_dim, action_dim = run.obs_dim, run.action_dim

    # Seeding: Python and numpy for good measure; the env, its action space and JAX explicitly.
    random.seed(args.seed)
    np.random.seed(args.seed)
    key = jax.random.PRNGKey(args.seed)
    key, agent_key, explore_key = jax.random.split(key, 3)

    agent = create_agent(args, obs_dim, action_dim, agent_key)
    train_step = make_train_step(args, action_dim)
    # XLA compiles the step's programs now, before the envs and the buffer exist (the loop's calls reuse them): a run
    # that would not fit in memory with their working memory is refused before it leaves any trace (a video env
    # makes its folder).
    check_memory(memory_parts(args, obs_dim, action_dim) + program_parts(args, obs_dim, action_dim, agent, train_step))

    # The recorder keeps each episode's reset state and actions: what a resumed run replays to get the env back.
    env = EpisodeRecorder(make_env(args.env_id, args.seed)())
    env.reset(seed=args.seed)  # seeds the env's generator; each episode records its state at reset
    # One video per evaluation, of its first episode (episode 0 is the seeding reset below).
    first_of_each_evaluation = lambda episode: episode > 0 and (episode - 1) % args.eval_episodes == 0
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, run.name, first_of_each_evaluation)()
    eval_env.reset(seed=args.seed + 10_000)
    q_bias_env = make_env(args.env_id, args.seed + Q_BIAS_SEED_OFFSET)() if args.q_bias_freq else None

    buffer = ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
    metrics = Metrics.initial()
    store = jax.jit(store_step, donate_argnums=0)  # its own jitted call: see train_step
    keys = {"update": key, "explore": explore_key}
    obs, episodic_return, eval_return = np.zeros(obs_dim, np.float32), float("nan"), float("nan")

    def checkpoint_arrays() -> dict:
        """The arrays a checkpoint holds, under these names (the recorder adds the episode's actions)."""
        return {"agent": agent, "buffer": filled_part(buffer), "metrics": metrics, "keys": keys, "obs": obs}

    start_step = 0
    if args.resume:  # the checkpoint's arrays, generators and env state: the run goes on as if never stopped
        restored, obs, start_step, eval_return, episodic_return = run.resume(checkpoint_arrays(), env, eval_env)
        agent, metrics, keys = jax.device_put((restored["agent"], restored["metrics"], restored["keys"]))
        buffer = refill(buffer, restored["buffer"])
    else:
        run.open()  # W&B, runs/{run_name} with args.json, the event writer
        obs, _ = env.reset()
    writer = run.writer  # a resumed run's: made once its checkpoint was restored
    # Each learning env step ends with the next step's action, drawn after the step's updates; the first is drawn here.
    if start_step >= args.learning_starts:
        next_action = explore(agent.actor, obs[None].astype(np.float32), keys["explore"])

    # Around the loop: the SPS clock, and SIGTERM/SIGINT caught; at the end the writer, envs and W&B are closed.
    with run.training(env, eval_env, q_bias_env):
        for global_step in range(start_step + 1, args.total_timesteps + 1):
            learning = global_step > args.learning_starts
            if learning:
                action = np.asarray(next_action)[0]  # waits for the previous step's device work
                if not np.isfinite(action).all():
                    raise FloatingPointError(policy_diverged(global_step, metrics))
            else:
                action = env.action_space.sample()

            next_obs, reward, terminated, truncated, info = env.step(action)
            policy_obs = next_obs
            if terminated or truncated:  # reset before the device work: it touches only the env's own generator
                episodic_return = float(info["episode"]["r"])
                writer.add_scalar("charts/episodic_return", episodic_return, global_step)
                writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
                policy_obs, _ = env.reset()

            # One transfer to the device per step. Bootstrap through time-limit truncations: only a true terminal
            # ends the return.
            step_data = pack_step(obs, action, reward, terminated, next_obs, policy_obs)
            if not np.isfinite(step_data).all():  # as the float32 the buffer stores: 1e39 is inf there
                raise FloatingPointError(env_not_finite(args.env_id, global_step))
            buffer, device_obs = store(buffer, step_data)
            obs = policy_obs
            if learning:  # this step's updates, then the next step's action: one compiled program, no host wait
                actor_updates = actor_update_pattern(args, global_step)
                agent, metrics, keys, next_action = train_step(agent, metrics, buffer, keys, device_obs, actor_updates)
            elif global_step == args.learning_starts:
                next_action = explore(agent.actor, device_obs, keys["explore"])

            if global_step % args.log_freq == 0:  # charts/SPS, losses/* and one plain line with the time left
                run.log_progress(global_step, learning, episodic_return, agent, metrics)
            with run.clock.paused():  # SPS counts training time only: evaluation, Q bias and checkpoints are excluded
                if (args.eval_freq and global_step % args.eval_freq == 0) or global_step == args.total_timesteps:
                    check_finite(global_step, agent, metrics)
                    returns = evaluate(agent.actor, eval_env, args.eval_episodes)
                    eval_return = float(np.mean(returns))
                    writer.add_scalar("eval/episodic_return", eval_return, global_step)
                    print(
                        f"step={global_step} eval/episodic_return={eval_return:.1f} +- {np.std(returns):.1f} "
                        f"({len(returns)} episodes)",
                        flush=True,
                    )
                if args.q_bias_freq and global_step % args.q_bias_freq == 0:
                    log_q_bias(writer, q_bias_env, agent, args, global_step)
                # Every --checkpoint-freq env steps; after SIGTERM/SIGINT, a checkpoint and the end of the run.
                run.checkpoint_if_due(global_step, checkpoint_arrays, eval_return, episodic_return, env, eval_env)

        if args.save_model:  # still inside: a signal now waits until the model is written
            save_model(agent, run.dir, args.exp_name)
    return {"eval_return": eval_return, "run_name": run.name}


# Q-BIAS MEASUREMENT (--q-bias-freq, off by default; the paper's Figures 7 and 17): Chen et al.'s (REDQ)
# protocol as the CrossQ authors ran it (`-eval_qbias 1`): episodes of the current policy (sampling, as it explores)
# from fresh resets, at most 1000 steps each; the Monte-Carlo soft return from each of an episode's
# first `cutoff` states (later states have too little episode left for it); the critics' mean
# prediction for the same (s, a) against it; the bias normalised per state by |MC| floored at 10.
Q_BIAS_MAX_EPISODE_STEPS = 1000
Q_BIAS_MIN_NORMALISER = 10.0
Q_BIAS_SEED_OFFSET = 20_000  # its env's seeds and key: apart from training's (seed) and evaluation's (seed + 10_000)


def soft_returns(rewards: np.ndarray, logps: np.ndarray, alpha: float, gamma: float) -> np.ndarray:
    """Soft Q of each step of one episode: G_t = r_t + gamma * (G_{t+1} - alpha * logp_{t+1}), G_{T-1} = r_{T-1}.
    The entropy bonus starts at the next action, as in the critic's target r + gamma * (Q(s', a') -
    alpha * log pi(a'|s')): Q(s, a) takes a as given. Chen et al.'s code does the same; the CrossQ
    authors' JAX port of it counts the bonus of a_t itself and drops the last one."""
    returns, following = np.zeros(len(rewards)), 0.0  # following: G_{t+1} - alpha * logp_{t+1}
    for t in reversed(range(len(rewards))):
        returns[t] = rewards[t] + gamma * following
        following = returns[t] - alpha * logps[t]
    return returns


def q_bias(
    env: gym.Env,
    policy: Callable[[np.ndarray, jax.Array], tuple[np.ndarray, float]],
    q_values: Callable[[np.ndarray, np.ndarray], np.ndarray],
    alpha: float,
    gamma: float,
    n_samples: int,
    cutoff: int,
    key: jax.Array,
) -> dict[str, float]:
    """Mean and std of the critic's normalised bias on the first `n_samples` states of episodes of
    `policy` (obs, key -> action, log pi(action|obs))."""
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


@jax.jit
def sample_action(actor_state: BNTrainState, obs: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array]:
    """An action drawn from pi (actor in eval mode) and its log-probability."""
    mean, log_std = actor_state.apply_fn(variables_of(actor_state), obs, train=False)
    return sample_tanh_gaussian(mean, log_std, key)


@jax.jit
def critic_mean_q(critic_state: BNTrainState, obs: jax.Array, actions: jax.Array) -> jax.Array:
    """The critics' mean prediction, critic in eval mode: Chen et al. and the CrossQ authors measure
    the bias of the ensemble's mean (the TD target and actor loss take its minimum)."""
    return critic_state.apply_fn(variables_of(critic_state), obs, actions, train=False).mean(axis=0)


def q_bias_critic(agent: AgentState) -> Callable[[np.ndarray, np.ndarray], jax.Array]:
    return lambda obs, actions: critic_mean_q(agent.critic, obs, actions)


def q_bias_policy(agent: AgentState) -> Callable[[np.ndarray, jax.Array], tuple[np.ndarray, float]]:
    def policy(obs: np.ndarray, key: jax.Array) -> tuple[np.ndarray, float]:
        action, logp = sample_action(agent.actor, obs[None].astype(np.float32), key)
        return np.asarray(action)[0], float(logp[0])

    return policy


def log_q_bias(writer: "SummaryWriter", env: gym.Env, agent: AgentState, args: Args, step: int) -> None:
    """Measure the critic's Q bias at env `step`, log it under eval/ and print it."""
    # Its own env, reseeded from the step, and its own key: training's env, keys and generators
    # stay untouched, and a resumed run measures what an uninterrupted one does.
    env.reset(seed=args.seed + Q_BIAS_SEED_OFFSET + step)
    key = jax.random.fold_in(jax.random.PRNGKey(args.seed + Q_BIAS_SEED_OFFSET), step)
    alpha = float(jnp.exp(agent.log_alpha.params["log_alpha"]))
    policy, critic = q_bias_policy(agent), q_bias_critic(agent)
    stats = q_bias(env, policy, critic, alpha, args.gamma, args.q_bias_samples, args.q_bias_cutoff, key)
    for name, value in stats.items():
        writer.add_scalar(f"eval/{name}", value, step)
    print(
        f"step={step} eval/q_bias_mean={stats['q_bias_mean']:.3f} eval/q_bias_std={stats['q_bias_std']:.3f} "
        f"(over |mean MC|: {stats['q_bias_global_mean']:.3f} +- {stats['q_bias_global_std']:.3f}; "
        f"Q {stats['q_value']:.2f} vs MC {stats['mc_return']:.2f} on {args.q_bias_samples} states)",
        flush=True,
    )


# ==================================================================================================
# MACHINERY: everything below keeps a run safe and convenient (checks that refuse bad input, the run
# folder and event writer, checkpoints, resume, signals, --eval-model, the command line). A reader
# of the algorithm can stop here.
# ==================================================================================================


# MACHINERY: the run: its folder, event writer and W&B, and what train() hands over to it (resume, the SPS
# clock, the progress line, checkpoints when due or signalled, closing up, --save-model)
# Every path the run writes lives under `runs/{run_name}`; these are its file names.
ARGS_FILE = "args.json"
CHECKPOINT_FILE = "checkpoint.npz"
SCRIPT_NAME = "crossq_jax"  # stamped into checkpoints, so that another script's are refused
# Flags that may change when a run resumes; every other hyperparameter is the checkpoint's.
RESUMABLE_FLAGS = {"total_timesteps", "checkpoint_freq", "log_freq", "save_model", "track", "resume"}
RESUMABLE_FLAGS |= {"wandb_project_name", "wandb_entity", "capture_video"}
RESUMABLE_FLAGS |= {"q_bias_freq", "q_bias_samples", "q_bias_cutoff"}  # measured beside training, never in it

MODEL_SUFFIX = ".crossq_model"  # what --save-model writes: runs/{run_name}/{exp_name}.crossq_model
# What each progress line logs to TensorBoard as losses/<name> and prints in this format (None: logged only).
PROGRESS_METRICS = {"qf_loss": ".3f", "qf_values": ".2f", "actor_loss": ".3f", "alpha": ".4f", "alpha_loss": None}


class ConfigError(ValueError):
    """A bad command line or environment, reported as one line before any compute is spent."""


class SummaryWriter:
    """A minimal TensorBoard writer on the `tensorboard` package alone (no torch, no TensorFlow)."""

    def __init__(self, log_dir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.log_dir = log_dir
        self._writer = self._io(EventFileWriter, log_dir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import summary_pb2

        self._add(
            step, summary=summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
        )

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._add(step, summary=text_pb(tag, text))

    def add_session_start(self, step: int) -> None:
        """Mark a restart: TensorBoard discards earlier-logged points at `step` and later."""
        from tensorboard.compat.proto import event_pb2

        self._add(step, session_log=event_pb2.SessionLog(status=event_pb2.SessionLog.START))

    def close(self) -> None:
        self._io(self._writer.close)

    def _add(self, step: int, **event) -> None:
        from tensorboard.compat.proto import event_pb2

        self._io(self._writer.add_event, event_pb2.Event(wall_time=time.time(), step=step, **event))

    def _io(self, call: Callable, *args: Any) -> Any:
        """A write that fails (a full disk, say, which the writer's thread reports at a later call) is one line."""
        try:
            return call(*args)
        except Exception as e:
            reason = e.strerror if isinstance(e, OSError) and e.strerror else f"{type(e).__name__}: {e}"
            raise ConfigError(f"cannot write TensorBoard events to {self.log_dir}: {reason}") from None


def start_run(args: Args) -> "Run":
    """Every check that needs no compiled program: the command line, the env, the checkpoint to resume, the memory of
    the buffer and networks, the disk. Nothing is allocated or written yet: the run leaves its trace in Run.open,
    once train() has checked its compiled programs too (a resumed run once its checkpoint is restored)."""
    check_backend()
    check_args(args)
    check_optional_dependencies(args)  # first: it may pick MuJoCo's renderer
    obs_dim, action_dim = check_env(args.env_id, render=args.capture_video)
    if args.resume:
        saved_arrays, saved = read_checkpoint(args.resume)
        run_name, run_dir = saved["run_name"], os.path.dirname(os.path.abspath(checkpoint_file(args.resume)))
        check_resume(args, saved, model_saved=os.path.exists(model_file(run_dir, args.exp_name)))
    else:
        saved_arrays, saved = None, None
        # "dm_control/reacher-easy" would nest a folder: the run's name takes "dm_control-reacher-easy"
        run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
        run_dir = os.path.join("runs", run_name)
    parts = memory_parts(args, obs_dim, action_dim)
    check_memory(parts)
    if args.buffer_size > INT32_MAX:  # after the memory: few machines hold 2**31 transitions
        raise ConfigError(f"--buffer-size must be at most {INT32_MAX} (int32 positions) (got {args.buffer_size})")
    check_disk(args, run_dir, parts)
    return Run(args, run_name, run_dir, obs_dim, action_dim, saved_arrays, saved)


@dataclasses.dataclass
class Run:
    """What a training run keeps beside the algorithm: its name and folder, the event writer, the checkpoint it
    resumes from, the SPS clock and time left of the progress line, and the SIGTERM/SIGINT flag."""

    args: Args
    name: str  # {env_id}__{exp_name}__{seed}__{unix time}; a resumed run keeps its own
    dir: str  # runs/{name}
    obs_dim: int
    action_dim: int
    saved_arrays: dict | None = None  # with --resume: the checkpoint's arrays (until restored)
    saved: dict | None = None  # and its host state
    writer: SummaryWriter | None = None  # made by open()

    def __post_init__(self) -> None:
        seconds_so_far = self.saved["train_seconds"] if self.saved else 0.0
        self.clock = TrainClock(self.args.total_timesteps, seconds_so_far)  # started again by training()
        self.preemption = STOP_SIGNAL  # {"signum": ...} once SIGTERM or SIGINT arrived

    def open(self) -> None:
        """Leave the run's trace, every check passed: W&B, its folder with args.json, and the event writer (a fresh
        run's first event: the hyperparameters)."""
        if self.args.track:  # before the writer: wandb syncs TensorBoard by patching the event-file writer it creates
            import wandb

            try:
                wandb.init(
                    project=self.args.wandb_project_name,
                    entity=self.args.wandb_entity,
                    sync_tensorboard=True,
                    config=vars(self.args),
                    name=self.name,
                    save_code=True,  # no monitor_gym: wandb's hook fails on gymnasium 1.x's RecordVideo
                )
            except Exception as e:  # not logged in, no network, a bad entity ...
                first_line = (str(e).strip().splitlines() or [""])[0]
                raise ConfigError(
                    f"--track: W&B could not start a run ({type(e).__name__}: {first_line}); `wandb login`, or "
                    "WANDB_MODE=offline to log locally"
                ) from None
        try:
            os.makedirs(self.dir, exist_ok=self.saved is not None)
            with open(os.path.join(self.dir, ARGS_FILE), "w") as f:
                json.dump(dataclasses.asdict(self.args), f, indent=2)
        except OSError as e:
            raise ConfigError(f"cannot write the run directory {self.dir}: {e.strerror}") from None
        self.writer = SummaryWriter(self.dir)
        if self.saved is None:
            table = "\n".join(f"|{name}|{value}|" for name, value in vars(self.args).items())
            self.writer.add_text("hyperparameters", "|param|value|\n|-|-|\n" + table)

    def resume(self, template: dict, env: "EpisodeRecorder", eval_env: gym.Env) -> tuple:
        """The checkpoint's arrays in the structure of `template` (the fresh run's), with the host generators put
        back and the interrupted episode replayed: (the arrays, the env's observation, the env step, the last
        evaluation's mean return, the last episode's return)."""
        saved, start_step = self.saved, self.saved["global_step"]
        template = {**template, "episode_actions": np.zeros((0, self.action_dim), np.float32)}
        restored = restore(template, self.saved_arrays)
        self.saved_arrays = None  # the restored arrays are the run's now
        stored, capacity = restored["buffer"], self.args.buffer_size
        if not len(stored.rewards) == int(stored.size) <= capacity or not 0 <= int(stored.position) < capacity:
            raise ConfigError(f"{checkpoint_file(self.args.resume)}: its replay buffer does not fit --buffer-size")
        try:
            set_host_rngs(saved["rngs"], env, eval_env)
            obs = replay_episode(env, saved["episode_start_rng"], list(restored["episode_actions"]))
        except (KeyError, TypeError, ValueError) as e:  # a host state edited by hand
            raise ConfigError(f"{checkpoint_file(self.args.resume)}: its generator states are damaged ({e})") from None
        if not np.array_equal(obs, restored["obs"]):
            print("warning: the replayed env state differs from the checkpoint's; the run goes on from it", flush=True)
        self.open()  # the checkpoint is whole: now the run may write to its folder
        # Tell TensorBoard to drop what the interrupted process logged after its checkpoint.
        self.writer.add_session_start(start_step + 1)
        print(f"resumed {self.name} at env step {start_step} from {checkpoint_file(self.args.resume)}", flush=True)
        if start_step == self.args.total_timesteps:
            print("its training had finished: writing the model it had not written", flush=True)
        episodic_return = saved.get("episodic_return", float("nan"))  # checkpoints before 2026-12-06 lack it
        return restored, obs, start_step, saved["eval_return"], episodic_return

    @contextlib.contextmanager
    def training(self, *envs: gym.Env | None) -> Iterator[None]:
        """Around the training loop: says where the run logs, starts the SPS clock (a resumed run's goes on from
        its checkpoint) and turns SIGTERM/SIGINT into a checkpoint; however the loop ends, closes the writer,
        `envs` (an evaluation env writes its last video) and W&B."""
        print(f"run {self.name}: logging to {self.dir}", flush=True)
        restore_signal_handlers = catch_signals()
        try:
            if self.preemption:  # a signal during the start-up (its compilations): nothing to save yet
                raise Preempted(self.preemption["signum"], None)
            self.clock.start()
            yield
        finally:
            restore_signal_handlers()
            self.writer.close()
            for env in envs:
                if env is not None:
                    env.close()
            if self.args.track:
                import wandb

                wandb.finish()
                wandb.tensorboard.unpatch()  # a later writer in this process is not this run's

    def log_progress(
        self, step: int, learning: bool, episodic_return: float, agent: AgentState, metrics: Metrics
    ) -> None:
        """charts/SPS and, once learning, losses/<PROGRESS_METRICS> to TensorBoard; one plain line to stdout."""
        sps = int(step / self.clock.seconds())
        self.writer.add_scalar("charts/SPS", sps, step)
        progress = f"step={step} SPS={sps} episodic_return={episodic_return:.1f} ETA={self.clock.eta(step, learning)}"
        if learning:
            check_finite(step, agent, metrics)
            values = {name: float(getattr(metrics, name)) for name in PROGRESS_METRICS}
            for name, value in values.items():
                self.writer.add_scalar(f"losses/{name}", value, step)
            progress += "".join(f" {name}={values[name]:{spec}}" for name, spec in PROGRESS_METRICS.items() if spec)
        else:
            progress += f" (random actions until step {self.args.learning_starts})"
        print(progress, flush=True)

    def checkpoint_if_due(
        self,
        step: int,
        checkpoint_arrays: Callable[[], dict],
        eval_return: float,
        episodic_return: float,
        env: "EpisodeRecorder",
        eval_env: gym.Env,
    ) -> None:
        """Every --checkpoint-freq env steps, and after SIGTERM/SIGINT, write runs/{name}/checkpoint.npz: the arrays
        of `checkpoint_arrays()` and the current episode's actions, and beside them as JSON what the host holds (the
        env step, the training seconds, the generators). After a signal, raise Preempted: the run ends (exit 128 +
        signum); at the last step it finishes instead (its model, if asked for, is all that is left)."""
        if not ((self.args.checkpoint_freq and step % self.args.checkpoint_freq == 0) or self.preemption):
            return
        arrays = {**checkpoint_arrays(), "episode_actions": env.episode_actions()}
        check_finite(step, arrays["agent"], arrays["metrics"])  # never replace a good checkpoint with a poisoned state
        host_state = {
            "script": SCRIPT_NAME,
            "run_name": self.name,
            "args": dataclasses.asdict(self.args),
            "global_step": step,
            "train_seconds": self.clock.trained,
            "eval_return": eval_return,
            "episodic_return": episodic_return,
            "episode_start_rng": env.start_state,
            "rngs": host_rngs(env, eval_env),
        }
        path = os.path.join(self.dir, CHECKPOINT_FILE)
        write_checkpoint(path, arrays, host_state)
        if self.preemption and step < self.args.total_timesteps:
            raise Preempted(self.preemption["signum"], path)


class TrainClock:
    """Seconds of training, for SPS and checkpoints: the wall clock since `start()` (on top of a resumed run's
    seconds), less the time spent inside `with clock.paused():` (evaluations, Q-bias measurements, checkpoints);
    and the time left that the progress line shows."""

    def __init__(self, total_steps: int, seconds_so_far: float = 0.0) -> None:
        self.total_steps, self.trained = total_steps, seconds_so_far  # trained: the seconds when last paused
        self.eta_from: tuple[int, float] | None = None  # (step, wall clock) of the first progress line with learning
        self.start()

    def start(self) -> None:
        self.started = time.perf_counter() - self.trained

    def seconds(self) -> float:
        return time.perf_counter() - self.started

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        paused_at, self.trained = time.perf_counter(), self.seconds()
        try:
            yield
        finally:
            self.started += time.perf_counter() - paused_at  # the pause does not count

    def eta(self, step: int, learning: bool) -> str:
        """The time left as H:MM:SS, at the wall-clock pace (evaluations and checkpoints included) since the first
        progress line with learning on; `?` before it, since random actions run far faster."""
        if step >= self.total_steps:
            return "0:00:00"
        if not learning:
            return "?"
        if self.eta_from is None:
            self.eta_from = (step, time.perf_counter())
            return "?"
        (from_step, from_time), now = self.eta_from, time.perf_counter()
        seconds = round((now - from_time) / (step - from_step) * (self.total_steps - step))
        return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class EpisodeRecorder(gym.Wrapper):
    """The training env, remembering what brings it back to where it is: its generator's state at the episode's
    reset and the episode's actions since. Replayed from that reset, the actions restore the exact state of this
    step (MuJoCo's full state is more than qpos/qvel): a checkpoint stores both, and a resumed run replays them."""

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


def model_file(run_dir: str, exp_name: str) -> str:
    return os.path.join(run_dir, exp_name + MODEL_SUFFIX)


def save_model(agent: AgentState, run_dir: str, exp_name: str) -> str:
    """--save-model: the actor and critic (parameters and batch statistics) to runs/{run_name}/{exp_name}.crossq_model;
    --eval-model reads it back. Written atomically: a failure leaves no partial file (and the last checkpoint)."""
    model_path = model_file(run_dir, exp_name)
    model = flax.serialization.to_bytes({"actor": variables_of(agent.actor), "critic": variables_of(agent.critic)})
    write_atomically(model_path, lambda f: f.write(model), "the model")
    print(f"model saved to {model_path}", flush=True)
    return model_path


# MACHINERY: checks that refuse a bad command line or env in one line, before any compute is spent
def check_backend() -> None:
    """JAX must start on the platform it is asked for (JAX_PLATFORMS=cuda without a GPU fails deep inside)."""
    try:
        jax.devices()
    except Exception as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        platforms = os.environ.get("JAX_PLATFORMS", "")
        raise ConfigError(f"JAX cannot start (JAX_PLATFORMS={platforms!r}): {reason}") from None


def check_args(args: Args) -> None:
    """Reject hyperparameters that are nonsensical or out of the range their use needs, naming the flag."""
    # The run's folder and model file carry the name: it must make one valid file name (the run ends writing them).
    name = args.exp_name
    if name in ("", ".", "..") or "/" in name or "\0" in name or len((name + MODEL_SUFFIX).encode()) > 255:
        limit = 255 - len(MODEL_SUFFIX)
        raise ConfigError(
            f"--exp-name must make a file name: no '/', not . or .., at most {limit} bytes (got {name!r})"
        )
    for name in FLAG_RANGES:
        if error := range_error(name, getattr(args, name)):
            raise ConfigError(error)
    for name, choices in [("critic_activation", CRITIC_ACTIVATIONS), ("bn_mode", BN_MODES)]:
        if getattr(args, name) not in choices:
            flag = f"--{name.replace('_', '-')}"
            raise ConfigError(f"{flag} must be one of {', '.join(choices)} (got {getattr(args, name)!r})")
    if args.critic_activation == "glu" and args.critic_width % 2:
        raise ConfigError(
            f"--critic-activation glu halves each hidden layer's width: --critic-width must be even "
            f"(got {args.critic_width})"
        )
    updates = args.utd * max(args.total_timesteps - args.learning_starts, 0)
    if updates > INT32_MAX:
        raise ConfigError(
            f"--utd {args.utd} x (--total-timesteps {args.total_timesteps} - --learning-starts {args.learning_starts}) "
            f"is {updates} critic updates; their counters are int32 (at most {INT32_MAX})"
        )
    if args.learning_starts < args.batch_size:
        raise ConfigError(
            f"--learning-starts ({args.learning_starts}) must be at least --batch-size ({args.batch_size}): "
            "the first update samples a full batch"
        )
    if args.buffer_size < args.batch_size:
        raise ConfigError(f"--buffer-size ({args.buffer_size}) must be at least --batch-size ({args.batch_size})")


def check_env(env_id: str, render: bool = False) -> tuple[int, int]:
    """Fail fast on an env the agent cannot drive: unknown id, discrete actions, non-vector observations.
    With `render` (--capture-video), render a frame too: a machine that cannot record says so now.
    Returns the sizes of its observations and actions."""
    try:
        # render_mode only when rendering: an env without one (the tests' envs) takes no such argument
        env = gym_make(env_id, **({"render_mode": "rgb_array"} if render else {}))
        if render:
            env.reset(seed=0)
            if np.ndim(frame := env.render()) != 3:
                raise RuntimeError(f"render() gave {type(frame).__name__}, not an RGB image")
    except gym.error.Error as e:  # unknown id, missing MuJoCo, bad version ...
        raise ConfigError(f"cannot make env {env_id!r}: {e}") from None
    except Exception as e:
        dmc = env_id.startswith(DMC_PREFIX)  # import_dm_control sets MUJOCO_GL itself
        if render or ("MUJOCO_GL" in os.environ and not dmc):  # MuJoCo without its OpenGL library
            raise ConfigError(
                f"cannot render {env_id} with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} "
                f"({type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}); without a screen use "
                "MUJOCO_GL=egl (Debian: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri) or MUJOCO_GL=osmesa "
                "(apt-get install libosmesa6)"
            ) from None
        if not dmc:
            raise
        # dm_control built against another MuJoCo fails deep inside (e.g. a missing model field)
        raise ConfigError(
            f"cannot make env {env_id!r} ({type(e).__name__}: {e}); pip install -r requirements-dmc.txt "
            "installs versions that work together"
        ) from None
    action_space, observation_space = env.action_space, env.observation_space  # observations flattened by gym_make
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise ConfigError(
            f"{env_id} has a {type(action_space).__name__} action space; the agent needs a continuous Box action space"
        )
    if len(action_space.shape) != 1 or action_space.shape[0] == 0:
        raise ConfigError(f"{env_id} has actions of shape {action_space.shape}; the agent needs a vector of them")
    if not np.all(np.isfinite(action_space.low)) or not np.all(np.isfinite(action_space.high)):
        raise ConfigError(f"{env_id} has an unbounded action space; the agent needs finite action bounds")
    if not np.all(action_space.low < action_space.high):
        raise ConfigError(f"{env_id} has action bounds with low >= high; the agent needs low < high")
    if observation_space.shape[0] == 0:
        raise ConfigError(f"{env_id} has empty observations (shape {observation_space.shape})")
    return observation_space.shape[0], action_space.shape[0]


def check_optional_dependencies(args: Args) -> None:
    """Flags that need an extra package say so before anything is trained. Call it before MuJoCo is
    imported: --capture-video picks MuJoCo's renderer, which MuJoCo reads as it is imported."""
    needs = {"track": ("wandb", "wandb"), "capture_video": ("moviepy", "moviepy")}
    for flag, (module, package) in needs.items():
        if getattr(args, flag):
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(
                    f"--{flag.replace('_', '-')} needs {package}: pip install -r requirements-extras.txt"
                ) from None
    if args.capture_video and sys.platform.startswith("linux"):
        if not (os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY")):
            # No screen: MuJoCo must render offscreen, and EGL (Mesa's, on the CPU too) works headless.
            os.environ.setdefault("MUJOCO_GL", "egl")


# Ranges and memory: what a run needs, from its flags, the shapes JAX derives and the programs XLA compiles
INT32_MAX = 2**31 - 1  # env steps, update counters, buffer positions and array sizes are int32 on the device
# The range of each number flag: (lowest, highest, whether the lowest is allowed, whether the highest is). Floats are
# checked as the float32 they become on the device (1e-50 is 0 there, 1e39 inf); check_args adds the rules that
# tie flags together.
POSITIVE, NOT_NEGATIVE = (0, INT32_MAX, False, True), (0, INT32_MAX, True, True)
FLAG_RANGES = {
    **dict.fromkeys(["total_timesteps", "batch_size", "critic_width", "actor_width", "utd", "policy_delay"], POSITIVE),
    **dict.fromkeys(["n_critics", "eval_episodes", "log_freq", "q_bias_samples", "q_bias_cutoff"], POSITIVE),
    **dict.fromkeys(["learning_starts", "bn_warmup_steps", "eval_freq", "checkpoint_freq"], NOT_NEGATIVE),
    "q_bias_freq": NOT_NEGATIVE,
    "buffer_size": (0, float("inf"), False, True),  # its int32 limit comes after the memory check: see start_run
    "seed": (0, 2**32 - 1, True, True),  # np.random.seed's limit (the eval env gets seed + 10_000)
    "gamma": (0.0, 1.0, True, True),
    "learning_rate": (0.0, float("inf"), False, False),
    "adam_b1": (0.0, 1.0, True, False),  # 1 would divide Adam's bias correction by zero
    "bn_momentum": (0.0, 1.0, False, False),
}


def float32(value: float) -> float:
    """`value` as the float32 it becomes on the device: 1e300 -> inf, 1e-50 -> 0.0."""
    with np.errstate(over="ignore"):
        return float(np.float32(value))


def with_float32(value: float) -> str:
    """`value` for a message, with its float32 where rounding made it a limit (1e300 -> inf)."""
    rounded = float32(value)
    limits = (0.0, 1.0, float("inf"), float("-inf"))
    return f"{value}, {rounded} in float32" if rounded != value and rounded in limits else f"{value}"


def range_error(name: str, value: float | None) -> str | None:
    """What is wrong with flag `name`'s `value` by FLAG_RANGES, in words; None if it lies in its range."""
    if value is None:  # an optional flag left unset (crossq_td3_jax's --tau: no target networks)
        return None
    low, high, low_allowed, high_allowed = FLAG_RANGES[name]
    x = value if isinstance(value, int) else float32(value)
    if (low < x or (low_allowed and x == low)) and (x < high or (high_allowed and x == high)):
        return None
    if high == INT32_MAX and x > high:
        rule = f"must be at most {INT32_MAX}, an int32 on the device"
    elif low == 0 and high in (INT32_MAX, float("inf")):
        rule = "must not be negative" if low_allowed else "must be positive"
        rule += "" if isinstance(value, int) else (" and must be finite" if low_allowed else " and finite")
    else:
        number = lambda end: f"{end:g}" if isinstance(end, float) else f"{end}"
        rule = f"must lie in {'[('[not low_allowed]}{number(low)}, {number(high)}{'])'[not high_allowed]}"
    return f"--{name.replace('_', '-')} {rule} (got {with_float32(value)})"


class MemoryPart(NamedTuple):
    what: str  # "the replay buffer"
    flags: str  # the flags that size it, as typed
    device: int  # bytes where the arrays live (the GPU; the RAM on a CPU)
    host: int  # bytes of its host copy in a checkpoint (SIGTERM writes one whatever --checkpoint-freq says)


def nbytes(tree: Any) -> int:
    return sum(int(np.prod(leaf.shape)) * leaf.dtype.itemsize for leaf in jax.tree.leaves(tree))


def memory_parts(args: Args, obs_dim: int, action_dim: int) -> list[MemoryPart]:
    """The bytes of the buffer and the networks (parameters, Adam's moments, running statistics, target networks), from
    the shapes of what `ReplayBuffer.create` and `create_agent` return (`jax.eval_shape`: nothing is allocated), on the
    device and again in a checkpoint's host copy."""
    abstract_agent = jax.eval_shape(functools.partial(create_agent, args, obs_dim, action_dim), jax.random.PRNGKey(0))
    buffer = jax.eval_shape(functools.partial(ReplayBuffer.create, args.buffer_size, obs_dim, action_dim))
    critics = nbytes((abstract_agent.critic, getattr(abstract_agent, "targets", None)))
    actor = nbytes(abstract_agent) - critics
    width = f"--critic-width {args.critic_width} with --n-critics {args.n_critics}"
    return [
        MemoryPart("the replay buffer", f"--buffer-size {args.buffer_size}", nbytes(buffer), nbytes(buffer)),
        MemoryPart("the critics (targets included) and their optimizer state", width, critics, critics),
        MemoryPart("the actor and its optimizer state", f"--actor-width {args.actor_width}", actor, actor),
    ]


def program_parts(
    args: Args, obs_dim: int, action_dim: int, agent: AgentState, train_step: Callable
) -> list[MemoryPart]:
    """The working memory (`memory_analysis()`) of the programs XLA compiles for `agent` and the jitted `train_step`:
    each actor-update pattern of train_step (the activations and gradients of the step's updates), and a Q-bias pass.
    They are compiled here once, on an abstract buffer, and the run's calls reuse them (JAX caches a program by its
    arguments' shapes and structure, optimizer and apply functions included: hence the real agent)."""

    def working_memory(lowered: jax.stages.Lowered) -> int:
        stats = lowered.compile().memory_analysis()
        if stats is None:  # a backend that does not report it: the other parts are still checked
            return 0
        return stats.temp_size_in_bytes + stats.output_size_in_bytes - stats.alias_size_in_bytes

    buffer = jax.eval_shape(functools.partial(ReplayBuffer.create, args.buffer_size, obs_dim, action_dim))
    keys = jax.eval_shape(lambda: dict.fromkeys(["update", "explore"], jax.random.PRNGKey(0)))
    obs = jax.ShapeDtypeStruct((1, obs_dim), jnp.float32)
    step_inputs = (agent, jax.eval_shape(Metrics.initial), buffer, keys, obs)
    first, last = args.learning_starts + 1, min(args.total_timesteps, args.learning_starts + args.policy_delay)
    patterns = dict.fromkeys(actor_update_pattern(args, step) for step in range(first, last + 1))  # they repeat
    # actor_updates positionally, as train() passes it: JAX's cache tells a positional argument from a keyword one.
    update = max([working_memory(train_step.lower(*step_inputs, p)) for p in patterns], default=0)
    parts = [MemoryPart("the activations of one update", f"--batch-size {args.batch_size}", update, 0)]
    if args.q_bias_freq:
        states = [jax.ShapeDtypeStruct((args.q_bias_samples, n), jnp.float32) for n in (obs_dim, action_dim)]
        q_bias_pass = working_memory(critic_mean_q.lower(agent.critic, *states))
        parts.append(MemoryPart("a Q-bias measurement", f"--q-bias-samples {args.q_bias_samples}", q_bias_pass, 0))
    return parts


def format_bytes(n: int) -> str:
    """1536 -> '1.5 KiB'; sizes past EiB (widths no machine holds) as a power of ten."""
    for power, unit in enumerate(["bytes", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"]):
        if n < 1024 ** (power + 1):
            return f"{n / 1024**power:.1f} {unit}"
    return f"10^{int((n.bit_length() - 1) * 0.30103)} bytes"


def host_memory() -> tuple[int, int] | None:
    """(total, available) bytes of RAM: /proc/meminfo, else sysconf; None where neither says."""
    try:
        with open("/proc/meminfo") as f:
            info = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}
        return info["MemTotal"], info["MemAvailable"]
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        page = os.sysconf("SC_PAGE_SIZE")
        return os.sysconf("SC_PHYS_PAGES") * page, os.sysconf("SC_AVPHYS_PAGES") * page
    except (OSError, ValueError):
        return None


def check_memory(parts: list[MemoryPart]) -> None:
    """Refuse a run whose `parts` cannot fit where they will live, naming the largest: the RAM on a CPU; on a GPU, the
    memory JAX may use there (`bytes_limit`) and the RAM for a checkpoint's host copies."""
    device, ram = jax.devices()[0], host_memory()
    ram_text = "" if ram is None else f"{format_bytes(ram[0])} of RAM (available {format_bytes(ram[1])})"
    budgets = []  # (bytes available, where, [(part, bytes it needs there)])
    if device.platform == "cpu":
        if ram is not None:  # the arrays and the checkpoint's copies share the RAM
            budgets.append((ram[1], f"this CPU has {ram_text}", [(p, p.device + p.host) for p in parts]))
    else:
        try:
            limit = (device.memory_stats() or {}).get("bytes_limit")
        except (NotImplementedError, RuntimeError):  # a backend that does not report its memory
            limit = None
        if limit:
            budgets.append(
                (limit, f"this {device.device_kind} has {format_bytes(limit)} for JAX", [(p, p.device) for p in parts])
            )
        if ram is not None:
            budgets.append((ram[1], f"this machine has {ram_text} for a checkpoint", [(p, p.host) for p in parts]))
    for available, where, needs in budgets:
        total = sum(need for _, need in needs)
        if total > available:
            part, need = max(needs, key=lambda item: item[1])
            raise ConfigError(
                f"{part.flags} needs ~{format_bytes(need)} for {part.what} (~{format_bytes(total)} in all); {where}"
            )


def existing_parent(path: str) -> str:
    """`path`, or the nearest of its parents that exists (the run directory is made after the checks)."""
    path = os.path.abspath(path)
    while not os.path.exists(path):
        path = os.path.dirname(path)
    return path


def check_disk(args: Args, run_dir: str, parts: list[MemoryPart]) -> None:
    """Room for what the run will write: with --checkpoint-freq a full checkpoint twice (the previous one stays
    until the next is written), with --save-model the networks (bounded by their part of a checkpoint)."""
    checkpoint, networks = sum(part.host for part in parts), sum(part.host for part in parts[1:])
    needed = (2 * checkpoint if args.checkpoint_freq else 0) + (networks if args.save_model else 0)
    free = shutil.disk_usage(existing_parent(run_dir)).free
    if free < needed:
        what = " and ".join(["a checkpoint"] * bool(args.checkpoint_freq) + ["the model"] * args.save_model)
        raise ConfigError(f"{run_dir} has {free / 1e9:.1f} GB free; {what} of this run needs {needed / 1e9:.1f} GB")


def env_not_finite(env_id: str, step: int) -> str:
    """What a NaN/inf observation or reward means: the env's fault, at this step (not a diverged training)."""
    return f"{env_id} returned an observation or reward that is NaN/inf in float32 (as stored) at env step {step}"


def policy_diverged(step: int, metrics: Metrics) -> str:
    """What a NaN/inf action from the policy means: the training diverged (an env NaN is the env's own message)."""
    message = f"training diverged: the policy's action is NaN/inf at env step {step}"
    if int(metrics.nonfinite_step) >= 0:
        loss = LOSS_NAMES[int(metrics.nonfinite_loss)]
        message += f" (losses/{loss} became NaN/inf at env step {int(metrics.nonfinite_step)})"
    return message


@jax.jit
def all_finite(tree) -> jax.Array:
    """Whether no array of `tree` holds a NaN/inf: one device call for a whole network's state."""
    return jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all()


def check_finite(step: int, agent: AgentState, metrics: Metrics) -> None:
    """Stop a diverged run (FloatingPointError: exit 1) on a NaN/inf loss the update flagged or NaN/inf anywhere
    in the actor's or critic's state. Called where the host reads the state anyway: progress, evaluation, checkpoint."""
    bad = int(metrics.nonfinite_step)
    if bad >= 0:
        name = LOSS_NAMES[int(metrics.nonfinite_loss)]
        raise FloatingPointError(
            f"training diverged: losses/{name} became NaN/inf at env step {bad} (seen at step {step})"
        )
    for network in ("actor", "critic"):  # parameters, optimizer state and running statistics
        if not bool(all_finite(getattr(agent, network))):
            raise FloatingPointError(f"training diverged: the {network}'s state holds NaN/inf at env step {step}")


# MACHINERY: checkpoint files: everything a run needs to continue exactly where it stopped
class Preempted(Exception):
    """SIGTERM or SIGINT arrived; a checkpoint has been written (None: the signal came before training started)."""

    def __init__(self, signum: int, checkpoint: str | None):
        done = f"checkpoint written to {checkpoint}" if checkpoint else "before training started, nothing to save"
        super().__init__(f"stopped by {signal.Signals(signum).name}; {done}")
        self.signum, self.checkpoint = signum, checkpoint


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


def checkpoint_file(path: str) -> str:
    return os.path.join(path, CHECKPOINT_FILE) if os.path.isdir(path) else path


def write_atomically(path: str, write: Callable[[Any], Any], what: str) -> None:
    """Write `path` through a temporary file, flushed to disk and renamed over it: a kill or a full disk at any
    moment leaves the previous file (or none) in place, never a partial one. A failure is one line."""
    tmp_path = path + ".tmp"
    try:
        with open(tmp_path, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            os.remove(tmp_path)
        raise ConfigError(f"cannot write {what} {path}: {e.strerror}") from None


def filled_part(buffer: ReplayBuffer) -> ReplayBuffer:
    """The rows that hold data: what a checkpoint stores."""
    n = int(buffer.size)
    return buffer._replace(**{name: getattr(buffer, name)[:n] for name in Transition._fields})


def refill(buffer: ReplayBuffer, stored: ReplayBuffer) -> ReplayBuffer:
    """The empty `buffer` with a checkpoint's filled part, position and size put back."""
    rows = {
        name: getattr(buffer, name).at[: len(getattr(stored, name))].set(getattr(stored, name))
        for name in Transition._fields
    }
    return buffer._replace(**rows, position=jnp.asarray(stored.position), size=jnp.asarray(stored.size))


def write_checkpoint(path: str, device_state: dict, host_state: dict) -> None:
    """Write arrays and host state to `path` atomically (a kill mid-write leaves the previous checkpoint)."""
    arrays = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(jax.device_get(device_state)), sep="/")
    arrays = {path: x for path, x in arrays.items() if x is not None}  # absent target networks: nothing to store
    meta = np.frombuffer(json.dumps(host_state, default=np.ndarray.tolist).encode(), np.uint8)
    write_atomically(path, lambda f: np.savez(f, __host_state__=meta, **arrays), "checkpoint")


def read_checkpoint(path: str, with_arrays: bool = True) -> tuple[dict, dict]:
    """({"agent/critic/params/...": array}, host state) of a checkpoint of this script; one-line errors
    otherwise. `with_arrays=False` reads the host state alone (the archive's members load lazily)."""
    path = checkpoint_file(path)
    if not os.path.exists(path):
        raise ConfigError(f"no checkpoint at {path}")
    try:
        with np.load(path, allow_pickle=False) as data:
            host_state = json.loads(data["__host_state__"].tobytes())
            names = [name for name in data.files if name != "__host_state__"] if with_arrays else []
            arrays = {name: data[name] for name in names}
    except Exception as e:  # a truncated or foreign file fails in many ways inside zipfile and numpy
        raise ConfigError(f"{path} is not a readable checkpoint ({type(e).__name__}: {e})") from None
    if not isinstance(host_state, dict):
        raise ConfigError(f"{path} is not a readable checkpoint (its host state is not a JSON object)")
    if host_state.get("script") != SCRIPT_NAME:
        raise ConfigError(f"{path} was written by {host_state.get('script')}, not by {SCRIPT_NAME}")
    args = args_from_saved(host_state.get("args"), f"{path}'s hyperparameters")
    for name, kind in HOST_STATE.items():  # read back as the command line is: types, then ranges
        if name not in host_state or not of_type(host_state[name], kind):
            raise ConfigError(f"{path}: its host state's {name} is missing or not of type {kind}")
    if not 0 <= host_state["global_step"] <= args.total_timesteps or host_state["train_seconds"] < 0:
        raise ConfigError(f"{path}: its host state's global_step or train_seconds is out of range")
    if host_state["run_name"] in ("", ".", "..") or "/" in host_state["run_name"]:
        raise ConfigError(f"{path}: its host state's run_name {host_state['run_name']!r} is not a folder name")
    return arrays, {**host_state, "args": dataclasses.asdict(args)}  # flags added since: their defaults


# Flags added after runs were saved: a saved run without one ran as its default does.
FLAGS_ADDED_SINCE: set[str] = set()
# What a checkpoint's host state holds beside the hyperparameters, and of which type (episodic_return came later).
HOST_STATE = {"run_name": str, "global_step": int, "train_seconds": float, "eval_return": float}
HOST_STATE |= {"rngs": dict, "episode_start_rng": dict | None}


def args_from_saved(saved: Any, source: str) -> Args:
    """A saved run's hyperparameters (a checkpoint's, an args.json) checked as the command line's are: every flag
    there with a value of its type, in its range; anything else is one line."""
    names = {field.name for field in dataclasses.fields(Args)}
    if isinstance(saved, dict):  # runs saved before a flag was added ran as its default does
        saved = {**{name: getattr(Args(), name) for name in FLAGS_ADDED_SINCE if name not in saved}, **saved}
    if not isinstance(saved, dict) or set(saved) != names:
        missing = sorted(names - set(saved)) if isinstance(saved, dict) else []
        detail = f"it lacks {', '.join(missing)}" if missing else "its entries are not this script's flags"
        raise ConfigError(f"{source} are not this script's ({detail})")
    hints = typing.get_type_hints(Args)
    for name, value in saved.items():
        if not of_type(value, hints[name]):
            raise ConfigError(f"{source}: {name} is {value!r}, not of type {hints[name]}")
    args = Args(**saved)
    try:
        check_args(args)
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


def restore(template: Any, arrays: dict) -> Any:
    """`template` (a pytree of the right structure) with its leaves taken from a checkpoint's arrays."""
    flat = flax.traverse_util.flatten_dict(flax.serialization.to_state_dict(template), sep="/", keep_empty_nodes=True)
    absent = lambda leaf: leaf is None or leaf is flax.traverse_util.empty_node  # None: no target networks
    missing = [path for path, leaf in flat.items() if not absent(leaf) and path not in arrays]
    if missing:
        raise ConfigError(f"the checkpoint lacks {missing[0]}")
    for path, leaf in flat.items():  # each array as the network it fills: its dtype and shape
        if absent(leaf):
            continue
        got, expected, kind = (
            np.asarray(arrays[path]),
            np.shape(leaf),
            np.dtype(getattr(leaf, "dtype", type(leaf))).kind,
        )
        rows = 1 if expected[:1] == (0,) else 0  # the buffer's filled rows and the episode's actions: any number
        if got.dtype.kind != kind or got.ndim != len(expected) or got.shape[rows:] != expected[rows:]:
            raise ConfigError(f"the checkpoint's {path} is {got.dtype}{list(got.shape)}, not of shape {list(expected)}")
    state = flax.traverse_util.unflatten_dict({path: arrays.get(path, leaf) for path, leaf in flat.items()}, sep="/")
    return flax.serialization.from_state_dict(template, state)


def check_resume(args: Args, host_state: dict, model_saved: bool) -> None:
    """A resumed run keeps its env and hyperparameters; only RESUMABLE_FLAGS may change. A checkpoint of a run's
    last step resumes only to write the model that run did not write."""
    saved, step = host_state["args"], host_state["global_step"]
    if args.total_timesteps < step:
        raise ConfigError(f"the checkpoint is at env step {step}: pass a --total-timesteps above it to continue")
    if args.total_timesteps == step and (model_saved or not args.save_model):
        raise ConfigError(
            f"the checkpoint's run is complete at env step {step}: pass a --total-timesteps above it to train on"
        )
    if args.env_id != saved["env_id"]:
        raise ConfigError(f"the checkpoint is of a run on {saved['env_id']}, not on {args.env_id}")
    changed = [name for name, value in dataclasses.asdict(args).items() if name not in RESUMABLE_FLAGS]
    changed = [name for name in changed if saved.get(name) != getattr(args, name)]
    if changed:
        name = changed[0]
        raise ConfigError(
            f"--{name.replace('_', '-')} is {saved.get(name)} in the checkpoint, not {getattr(args, name)}: "
            "a resumed run keeps its hyperparameters"
        )


def replay_episode(env: gym.Env, start_state: dict, actions: np.ndarray) -> np.ndarray:
    """Bring `env` to where the interrupted run was: same reset draw, then the same actions."""
    set_generator_state(env.np_random, start_state)
    obs, _ = env.reset()
    for action in actions:
        obs, *_ = env.step(action)
    return obs


STOP_SIGNAL: dict[str, int] = {}  # {"signum": ...} once SIGTERM or SIGINT arrived: see catch_signals


def catch_signals() -> Callable[[], None]:
    """SIGTERM/SIGINT set STOP_SIGNAL, which the run checks at safe points (after each env step, between the
    episodes of --eval-model); a second signal exits at once. From the start of the process: Python's Ctrl-C,
    raised while JAX compiles, can crash the interpreter. Returns what puts the previous handlers back."""

    def handler(signum, frame):
        if STOP_SIGNAL:
            print(f"\n{signal.Signals(signum).name} again: exiting at once", file=sys.stderr, flush=True)
            os._exit(128 + signum)
        STOP_SIGNAL["signum"] = signum
        print(
            f"\n{signal.Signals(signum).name}: stopping at the end of this step (a checkpoint once training has "
            "started); again to exit at once",
            file=sys.stderr,
            flush=True,
        )

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore_handlers() -> None:
        for sig, previous_handler in previous.items():
            signal.signal(sig, previous_handler)
        STOP_SIGNAL.clear()  # a later run in this process starts afresh

    return restore_handlers


# MACHINERY: --eval-model, the evaluation of a saved model
EVAL_FLAGS = {"eval_model", "eval_episodes", "seed", "capture_video"}  # what applies to --eval-model


def check_eval_flags(given: set[str], preset: str | None) -> None:
    """--eval-model uses the saved run's networks and env: a training flag beside it, whatever its value, or a
    preset word, is a mistake, said so."""
    if preset:
        raise ConfigError(f"the preset word {preset} does not go with --eval-model: the saved run's are used")
    if misplaced := sorted(given - EVAL_FLAGS):
        raise ConfigError(
            f"--{misplaced[0].replace('_', '-')} does not go with --eval-model: the saved run's hyperparameters "
            "are used (only --eval-episodes, --seed and --capture-video apply)"
        )


def read_saved_model(path: str) -> tuple[Args, dict, str]:
    """(the run's Args, its actor's variables, its run name) from a run directory, the file --save-model
    wrote, or a checkpoint; a one-line error for anything else."""
    if not os.path.exists(path):
        raise ConfigError(f"--eval-model: no such file or directory: {path}")
    if os.path.isdir(path):
        try:
            with open(os.path.join(path, ARGS_FILE)) as f:
                exp_name = json.load(f)["exp_name"]
        except (OSError, ValueError, KeyError, TypeError):  # its args.json is checked below, if it is needed
            exp_name = SCRIPT_NAME
        exp_name = exp_name if isinstance(exp_name, str) else SCRIPT_NAME
        model = os.path.join(path, exp_name + MODEL_SUFFIX)
        if os.path.exists(model):
            path = model
        elif os.path.exists(os.path.join(path, CHECKPOINT_FILE)):
            path = os.path.join(path, CHECKPOINT_FILE)
        else:
            raise ConfigError(f"{path} holds neither a model saved with --save-model nor a {CHECKPOINT_FILE}")
    if path.endswith(MODEL_SUFFIX):
        run_dir = os.path.dirname(os.path.abspath(path))
        try:
            with open(os.path.join(run_dir, ARGS_FILE)) as f:
                saved_args = json.load(f)
        except (OSError, ValueError) as e:
            raise ConfigError(f"{path} needs its run's {ARGS_FILE} beside it ({e})") from None
        saved_args = dataclasses.asdict(args_from_saved(saved_args, os.path.join(run_dir, ARGS_FILE)))
        try:
            with open(path, "rb") as f:
                actor = flax.serialization.msgpack_restore(f.read())["actor"]
        except Exception as e:  # a truncated or foreign file fails in many ways inside msgpack
            raise ConfigError(f"{path} is not a readable model file ({type(e).__name__}: {e})") from None
        run_name = os.path.basename(run_dir)
    else:
        arrays, host_state = read_checkpoint(path)
        prefix = "agent/actor/"
        actor = {name[len(prefix) :]: value for name, value in arrays.items() if name.startswith(prefix)}
        # A checkpoint's flat names drop an empty `batch_stats` (an actor without normalisation): put it back.
        actor = {"batch_stats": {}, **flax.traverse_util.unflatten_dict(actor, sep="/")}
        saved_args, run_name = host_state["args"], host_state["run_name"]
    return Args(**saved_args), actor, run_name


def evaluate_model(args: Args) -> dict:
    """--eval-model: `--eval-episodes` episodes of the saved deterministic policy; prints their mean and std."""
    if args.eval_episodes <= 0:
        raise ConfigError(f"--eval-episodes must be positive (got {args.eval_episodes})")
    if error := range_error("seed", args.seed):
        raise ConfigError(error)
    check_backend()
    check_optional_dependencies(dataclasses.replace(args, track=False))  # first: it may pick MuJoCo's renderer
    saved_args, saved_actor, run_name = read_saved_model(args.eval_model)
    check_env(saved_args.env_id, render=args.capture_video)
    # Seeded as the training run's evaluations are: a run evaluated only at its end gets the same returns.
    eval_seed = args.seed + 10_000
    env = make_env(saved_args.env_id, eval_seed, args.capture_video, f"{run_name}-eval")()
    env.reset(seed=eval_seed)
    agent = create_agent(saved_args, env.observation_space.shape[0], env.action_space.shape[0], jax.random.PRNGKey(0))
    template = variables_of(agent.actor)
    try:
        actor = agent.actor.replace(**flax.serialization.from_state_dict(template, saved_actor))
        shapes_match = jax.tree.map(lambda a, b: np.shape(a) == np.shape(b), template, variables_of(actor))
    except (KeyError, ValueError, TypeError) as e:
        raise ConfigError(f"{args.eval_model} does not hold an actor of its run's shape ({e})") from None
    if not all(jax.tree.leaves(shapes_match)):
        raise ConfigError(f"{args.eval_model} does not hold an actor of its run's shape")
    returns = []
    try:
        while len(returns) < args.eval_episodes and not STOP_SIGNAL:  # a signal stops it between episodes
            returns += evaluate(actor, env, 1)
    finally:
        env.close()  # writes the last video
    if STOP_SIGNAL:
        raise Preempted(STOP_SIGNAL["signum"], None)
    print(
        f"{run_name} on {saved_args.env_id}: eval/episodic_return={np.mean(returns):.1f} +- {np.std(returns):.1f} "
        f"({len(returns)} episodes of the deterministic policy, seed {eval_seed})",
        flush=True,
    )
    video_folder = os.path.join("videos", f"{run_name}-eval") if args.capture_video else None
    if video_folder:
        print(f"videos of the episodes in {video_folder}", flush=True)
    return {"eval_return": float(np.mean(returns)), "returns": returns, "video_folder": video_folder}


# MACHINERY: the command line
# The hyperparameters in which the presets differ (exp_name aside: it only names the run). With --resume, a preset
# word stands for these values and must agree with the checkpoint.
PRESET_FIELDS = [
    field.name
    for field in dataclasses.fields(Args)
    if field.name != "exp_name" and len({getattr(args, field.name) for _, args in PRESETS.values()}) > 1
]


def parse_args(argv: list[str] | None = None) -> Args:
    """`[PRESET] [--flag value ...]`: an optional preset word picks the defaults (the first of PRESETS when left out),
    every flag overrides them. With --resume, flags not given take the checkpoint's values, so a run resumes with its
    preset without the word; a word given with --resume stands for its values of PRESET_FIELDS, as on the command line
    that started the run, and must agree with the checkpoint."""
    argv = list(sys.argv[1:] if argv is None else argv)
    word = argv.pop(0) if argv and argv[0] in PRESETS else None
    default_word, script = next(iter(PRESETS)), os.path.basename(__file__)
    preset = word or default_word
    description = (
        f"{PRESETS[preset][0]}.\n\nPresets, chosen by the first word: {default_word} (when left out), "
        f"{', '.join(list(PRESETS)[1:])}. Every flag overrides the preset's value; `{script} WORD --help` lists its "
        f"values. `{script} --resume RUN_DIR` continues a run with its own hyperparameters, preset included."
    )
    parse = lambda defaults: cli(
        argv, default=defaults, prog=f"{script} {word}" if word else script, description=description
    )
    args = parse(PRESETS[preset][1])
    if args.eval_model:
        check_eval_flags(given_flags(argv), word)
    elif args.resume:
        _, saved = read_checkpoint(args.resume, with_arrays=False)
        defaults = dataclasses.replace(Args(**saved["args"]), resume=args.resume)
        # A preset word stands for its values, as on the command line that started the run.
        word_values = {name: getattr(PRESETS[word][1], name) for name in PRESET_FIELDS} if word else {}
        args = parse(dataclasses.replace(defaults, **word_values))
        for name, value in word_values.items():
            if getattr(args, name) == value != saved["args"][name]:  # the word's value, not a flag's
                raise ConfigError(
                    f"the checkpoint is not of a {word} run: --{name.replace('_', '-')} is {saved['args'][name]} "
                    f"in it, {value} in {word} (resume without the preset word to continue the run as it was)"
                )
    return args


def cli(argv: list[str], **tyro_options: Any) -> Args:
    """tyro's parse, with its error box turned into one line: what is wrong, and where the help is."""
    captured = io.StringIO()
    try:
        with contextlib.redirect_stderr(captured):
            args = tyro.cli(Args, args=argv, **tyro_options)
    except SystemExit as e:
        if not e.code:  # --help
            raise
        raise ConfigError(f"{tyro_message(captured.getvalue())} (see --help)") from None
    sys.stderr.write(captured.getvalue())  # what tyro may say about a good command line
    return args


def tyro_message(text: str) -> str:
    """What tyro's error says, on one line: its title, a rule, the message, a rule, help (drawn as a box on a
    terminal, with dashes otherwise)."""
    rows = [row for line in text.splitlines() if (row := line.strip().strip("│╭╮╰╯").strip())]
    message = []
    for row in rows[1:]:  # after the title
        if set(row) <= set("─-"):  # a rule
            if message:
                break
        else:
            message.append(row)
    return " ".join(message) or "cannot parse the command line"


def given_flags(argv: list[str]) -> set[str]:
    """The fields of the flags on a command line (`--no-actor-bn` is actor_bn's)."""
    names = {token[2:].split("=")[0].replace("-", "_") for token in argv if token.startswith("--")}
    fields = {field.name for field in dataclasses.fields(Args)}
    return {name if name in fields else name.removeprefix("no_") for name in names}


if __name__ == "__main__":
    catch_signals()  # before anything compiles: see catch_signals
    try:
        args = parse_args()
        evaluate_model(args) if args.eval_model else train(args)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except FloatingPointError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except Preempted as e:
        resume = (
            f"; continue with: python {sys.argv[0]} --resume {os.path.dirname(e.checkpoint)}" if e.checkpoint else ""
        )
        print(f"{e}{resume}", file=sys.stderr)
        sys.exit(128 + e.signum)
