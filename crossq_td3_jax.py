# CrossQ (TD3 base) in JAX: Bhatt, Palenicek et al., "CrossQ: Batch Normalization in Deep
# Reinforcement Learning for Greater Sample Efficiency and Simplicity", ICLR 2024 ("CrossQ (TD3)"
# in Figure 5). One self-contained file: Batch Renormalization layer, networks, replay buffer,
# jitted joint-pass update and training loop. Copy it, read it top to bottom, change it.
# `python crossq_td3_jax.py td3 ...` runs the TD3 baseline of the same figure instead (see PRESETS).
import dataclasses
import json
import os
import random
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState


@dataclasses.dataclass
class Args:
    exp_name: str = os.path.basename(__file__)[: -len(".py")]
    """the name of this experiment"""
    seed: int = 1
    """seed of the experiment: the env, its action space and the JAX keys all derive from it"""
    track: bool = False
    """if toggled, this experiment will be tracked with Weights and Biases (needs `pip install wandb`)"""
    wandb_project_name: str = "crossq"
    """the wandb's project name"""
    wandb_entity: str | None = None
    """the entity (team) of wandb's project"""
    capture_video: bool = False
    """if toggled, record videos of the evaluation episodes to `videos/{run_name}` (needs `pip install moviepy`)"""
    save_model: bool = False
    """if toggled, save the actor and critic (parameters and batch statistics) to `runs/{run_name}`"""

    # Algorithm specific arguments (defaults: the CrossQ column of the paper's Table 1)
    env_id: str = "Hopper-v4"
    """the id of the environment (any gymnasium env with a continuous Box action space)"""
    total_timesteps: int = 1_000_000
    """total timesteps of the experiment (env steps)"""
    learning_starts: int = 5_000
    """env steps of uniform-random actions before learning starts"""
    gamma: float = 0.99
    """the discount factor gamma"""
    learning_rate: float = 1e-3
    """the learning rate of the actor and critic optimizers"""
    buffer_size: int = 1_000_000
    """the replay memory buffer size"""
    batch_size: int = 256
    """the batch size of sample from the replay memory (the joint pass sees twice as many rows)"""
    activation: Literal["relu", "tanh", "elu", "gelu", "silu", "relu6", "sin"] = "relu"
    """the activation function of the hidden layers"""
    bn_mode: Literal["brn", "bn", "none"] = "brn"
    """normalisation layers: Batch Renormalization, plain BatchNorm, or none"""
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
    """the actor is updated after every `policy_delay`-th critic update, on the same batch"""
    n_critics: int = 2
    """the number of critics in the ensemble (the TD target and the actor loss take their minimum)"""
    policy_noise: float = 0.2
    """std of the Gaussian noise added to each dimension of the target action (target policy smoothing)"""
    noise_clip: float = 0.5
    """the target action's noise is clipped to [-noise_clip, noise_clip]"""
    exploration_noise: float = 0.1
    """std of the Gaussian noise added to each dimension of the action while collecting data"""
    tau: float | None = None
    """Polyak rate of target actor and critics; None: no target networks (CrossQ). The `td3` preset sets 0.005"""
    eval_freq: int = 10_000
    """evaluate the deterministic policy every `eval_freq` env steps (0: only at the end)"""
    eval_episodes: int = 10
    """the number of episodes of each evaluation"""
    log_freq: int = 1_000
    """log losses every `log_freq` env steps and print a progress line"""


# Every path the run writes lives under `runs/{run_name}`; these are its file names.
ARGS_FILE = "args.json"

# Named starting points for the flags, picked by a word in front of them. `td3` is the TD3 baseline
# of the paper's Figure 5: target actor and critics with tau 0.005, no normalisation, critic width
# 256, Adam b1 0.9, policy delay 2 (smoothing and exploration noise as in CrossQ-TD3).
#   python crossq_td3_jax.py td3 --env-id Hopper-v4     (flags after the word override the preset)
#   python crossq_td3_jax.py --env-id Hopper-v4         (no word: CrossQ-TD3, the defaults of Args)
PRESETS: dict[str, dict[str, Any]] = {
    "td3": {
        "exp_name": "td3_baseline",
        "tau": 0.005,
        "bn_mode": "none",
        "critic_width": 256,
        "adam_b1": 0.9,
        "policy_delay": 2,
    },
}


def parse_args(argv: list[str]) -> Args:
    """The command line as Args: an optional preset word (see PRESETS), then tyro flags."""
    preset, flags = (argv[0], argv[1:]) if argv and argv[0] in PRESETS else (None, argv)
    default = dataclasses.replace(Args(), **PRESETS[preset]) if preset else Args()
    td3_flags = " ".join(f"--{name.replace('_', '-')} {value}" for name, value in PRESETS["td3"].items())
    description = f"CrossQ (TD3 base). The word `td3` before the flags starts from the TD3 baseline: {td3_flags}"
    return tyro.cli(Args, args=flags, default=default, description=description)


class ConfigError(ValueError):
    """A bad command line or environment, reported as one line before any compute is spent."""


def check_args(args: Args) -> None:
    """Reject nonsensical hyperparameters with a message that names the flag."""
    positive = ["total_timesteps", "batch_size", "buffer_size", "critic_width", "actor_width"]
    positive += ["utd", "policy_delay", "n_critics", "eval_episodes", "log_freq"]
    for name in positive:
        if getattr(args, name) <= 0:
            raise ConfigError(f"--{name.replace('_', '-')} must be positive (got {getattr(args, name)})")
    for name in ["learning_starts", "bn_warmup_steps", "eval_freq", "policy_noise", "noise_clip", "exploration_noise"]:
        if getattr(args, name) < 0:
            raise ConfigError(f"--{name.replace('_', '-')} must not be negative (got {getattr(args, name)})")
    if args.tau is not None and not 0.0 < args.tau <= 1.0:
        raise ConfigError(f"--tau must lie in (0, 1] when set (got {args.tau})")
    if not 0.0 < args.bn_momentum < 1.0:
        raise ConfigError(f"--bn-momentum must lie in (0, 1) (got {args.bn_momentum})")
    if not 0.0 <= args.gamma <= 1.0:
        raise ConfigError(f"--gamma must lie in [0, 1] (got {args.gamma})")
    if not 0.0 <= args.adam_b1 < 1.0:
        raise ConfigError(f"--adam-b1 must lie in [0, 1) (got {args.adam_b1})")
    if not 0.0 < args.learning_rate < float("inf"):
        raise ConfigError(f"--learning-rate must be positive (got {args.learning_rate})")
    if args.learning_starts < args.batch_size:
        raise ConfigError(
            f"--learning-starts ({args.learning_starts}) must be at least --batch-size ({args.batch_size}): "
            "the first update samples a full batch"
        )
    if args.buffer_size < args.batch_size:
        raise ConfigError(f"--buffer-size ({args.buffer_size}) must be at least --batch-size ({args.batch_size})")


def make_env(env_id: str, seed: int, capture_video: bool = False, run_name: str = "") -> Callable[[], gym.Env]:
    """A thunk (CleanRL's convention) that builds the env with the agent's [-1, 1] action scale."""

    def thunk() -> gym.Env:
        if capture_video:
            env = gym.make(env_id, render_mode="rgb_array")
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=lambda _: True)
        else:
            env = gym.make(env_id)
        env = gym.wrappers.RecordEpisodeStatistics(env)
        # The agent acts in [-1, 1] (tanh squashing); the wrapper maps to [low, high].
        env = gym.wrappers.RescaleAction(env, -1.0, 1.0)
        env.action_space.seed(seed)
        return env

    return thunk


def check_env(env_id: str) -> None:
    """Fail fast on an env CrossQ cannot drive: unknown id, discrete actions, non-vector observations."""
    try:
        env = gym.make(env_id)
    except gym.error.Error as e:  # unknown id, missing MuJoCo, bad version ...
        raise ConfigError(f"cannot make env {env_id!r}: {e}") from None
    action_space, observation_space = env.action_space, env.observation_space
    env.close()
    if not isinstance(action_space, gym.spaces.Box):
        raise ConfigError(
            f"{env_id} has a {type(action_space).__name__} action space; CrossQ needs a continuous Box action space"
        )
    if not np.all(np.isfinite(action_space.low)) or not np.all(np.isfinite(action_space.high)):
        raise ConfigError(f"{env_id} has an unbounded action space; CrossQ needs finite action bounds")
    if not isinstance(observation_space, gym.spaces.Box) or len(observation_space.shape) != 1:
        raise ConfigError(f"{env_id} needs flat vector observations (got {observation_space})")


def check_optional_dependencies(args: Args) -> None:
    """Flags that need an extra package say so before anything is trained."""
    needs = {"track": ("wandb", "wandb"), "capture_video": ("moviepy", "moviepy")}
    for flag, (module, package) in needs.items():
        if getattr(args, flag):
            try:
                __import__(module)
            except ImportError:
                raise ConfigError(f"--{flag.replace('_', '-')} needs {package}: pip install {package}") from None


class SummaryWriter:
    """A minimal TensorBoard writer on the `tensorboard` package alone (no torch, no TensorFlow)."""

    def __init__(self, log_dir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self._writer = EventFileWriter(log_dir)

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        from tensorboard.compat.proto import event_pb2, summary_pb2

        summary = summary_pb2.Summary(value=[summary_pb2.Summary.Value(tag=tag, simple_value=float(value))])
        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=summary))

    def add_text(self, tag: str, text: str, step: int = 0) -> None:
        from tensorboard.compat.proto import event_pb2
        from tensorboard.plugins.text.summary_v2 import text_pb

        self._writer.add_event(event_pb2.Event(wall_time=time.time(), step=step, summary=text_pb(tag, text)))

    def close(self) -> None:
        self._writer.close()


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

        return scale * (x - mean) * jax.lax.rsqrt(var + self.epsilon) + bias


# ALGO LOGIC: networks
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": nn.relu,
    "tanh": nn.tanh,
    "elu": nn.elu,
    "gelu": nn.gelu,
    "silu": nn.silu,
    "relu6": nn.relu6,
    "sin": jnp.sin,
}


class Normalization(nn.Module):
    """The normalisation layer the `--bn-mode` flag selects: BRN, plain BN (BRN with r=1, d=0) or none."""

    mode: str = "brn"
    momentum: float = 0.99
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.mode == "none":
            return x
        limits = {"brn": {"r_max": 3.0, "d_max": 5.0}, "bn": {"r_max": 1.0, "d_max": 0.0}}[self.mode]
        return BatchRenorm(
            use_running_average=not train, momentum=self.momentum, warmup_steps=self.warmup_steps, **limits
        )(x)


class Critic(nn.Module):
    """Q(s, a): concat(s, a) -> norm -> [Dense -> act -> norm] x 2 -> Dense(1)."""

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
            x = norm()(ACTIVATIONS[self.activation](nn.Dense(self.width)(x)), train)
        return nn.Dense(1)(x).squeeze(-1)


class CriticEnsemble(nn.Module):
    """`n_critics` independent critics evaluated in one vectorised call; returns (n_critics, batch)."""

    n_critics: int = 2
    width: int = 2048
    activation: str = "relu"
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

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


class Actor(nn.Module):
    """The deterministic policy pi(s): s -> norm -> [Dense -> act -> norm] x 2 -> Dense(|A|) -> tanh."""

    action_dim: int
    width: int = 256
    activation: str = "relu"
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, obs: jax.Array, train: bool) -> jax.Array:
        norm = lambda: Normalization(self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        x = norm()(obs, train)
        for _ in range(2):
            x = norm()(ACTIVATIONS[self.activation](nn.Dense(self.width)(x)), train)
        return jnp.tanh(nn.Dense(self.action_dim)(x))


def add_noise(actions: jax.Array, key: jax.Array, std: float, noise_clip: float = jnp.inf) -> jax.Array:
    """clip(a + clip(eps, -noise_clip, noise_clip), -1, 1), eps ~ N(0, std^2) drawn independently for
    every entry, i.e. for each action dimension of each row: exploration and target policy smoothing."""
    noise = jnp.clip(std * jax.random.normal(key, actions.shape), -noise_clip, noise_clip)
    return jnp.clip(actions + noise, -1.0, 1.0)


class BNTrainState(TrainState):
    """A flax TrainState that also carries the network's running statistics (`batch_stats`)."""

    batch_stats: Any


class Targets(NamedTuple):
    """TD3 baseline only (`--tau`): Polyak averages of the actor's and the critics' parameters. They
    run with the live networks' running statistics (irrelevant for the baseline, which has none)."""

    actor: Any
    critic: Any


class AgentState(NamedTuple):
    actor: BNTrainState
    critic: BNTrainState
    targets: Targets | None  # None for CrossQ: no target networks


class Metrics(NamedTuple):
    """What the update reports; carried between steps so that delayed actor losses stay visible."""

    qf_loss: jax.Array
    qf_values: jax.Array
    actor_loss: jax.Array
    nonfinite_step: jax.Array  # first env step with a NaN/inf loss, -1 while all is well

    @classmethod
    def initial(cls) -> "Metrics":
        zero = jnp.zeros((), jnp.float32)
        return cls(zero, zero, zero, -jnp.ones((), jnp.int32))


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


# ALGO LOGIC: the CrossQ update
def create_agent(args: Args, obs_dim: int, action_dim: int, key: jax.Array) -> AgentState:
    """Fresh actor and critic ensemble (plus target copies with `--tau`); the modules ride along as `apply_fn`."""
    norm = {"bn_momentum": args.bn_momentum, "bn_warmup_steps": args.bn_warmup_steps}
    actor_bn_mode = args.bn_mode if args.actor_bn else "none"
    actor = Actor(action_dim, args.actor_width, args.activation, actor_bn_mode, **norm)
    critic = CriticEnsemble(args.n_critics, args.critic_width, args.activation, args.bn_mode, **norm)
    actor_key, critic_key = jax.random.split(key)
    obs, actions = jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    actor_vars = actor.init(actor_key, obs, train=False)
    critic_vars = critic.init(critic_key, obs, actions, train=False)
    adam = optax.adam(args.learning_rate, b1=args.adam_b1)
    # TD3 baseline only: the targets start as copies (buffers of their own: the live ones get donated).
    targets = None if args.tau is None else jax.tree.map(jnp.copy, Targets(actor_vars["params"], critic_vars["params"]))
    return AgentState(
        actor=BNTrainState.create(
            apply_fn=actor.apply, params=actor_vars["params"], batch_stats=actor_vars.get("batch_stats", {}), tx=adam
        ),
        critic=BNTrainState.create(
            apply_fn=critic.apply, params=critic_vars["params"], batch_stats=critic_vars.get("batch_stats", {}), tx=adam
        ),
        targets=targets,
    )


def variables_of(state: BNTrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def critic_loss(params, agent: AgentState, batch: Transition, key: jax.Array, args: Args):
    """TD loss with target policy smoothing; returns (loss, (new critic batch_stats, mean Q))."""
    critic_vars = {"params": params, "batch_stats": agent.critic.batch_stats}
    actor_params = agent.actor.params if agent.targets is None else agent.targets.actor  # TD3 baseline: target actor
    next_actions = agent.actor.apply_fn(
        {"params": actor_params, "batch_stats": agent.actor.batch_stats}, batch.next_obs, train=False
    )
    # Target policy smoothing: clipped Gaussian noise on every dimension of pi(s'), actor in eval mode.
    next_actions = add_noise(next_actions, key, args.policy_noise, args.noise_clip)
    if agent.targets is None:
        # The joint pass: (s, a) and (s', a') go through the critic together in train mode, so every
        # BRN layer normalises both halves with the statistics of all 2B rows. This is what lets
        # CrossQ drop the target network.
        q_all, updates = agent.critic.apply_fn(
            critic_vars,
            jnp.concatenate([batch.obs, batch.next_obs]),
            jnp.concatenate([batch.actions, next_actions]),
            train=True,
            mutable=["batch_stats"],
        )
        q, next_q = jnp.split(q_all, 2, axis=1)  # each (n_critics, B)
    else:  # TD3 BASELINE ONLY (`--tau`): the target critics score (s', a') in a pass of their own
        target_critic = {"params": agent.targets.critic, "batch_stats": agent.critic.batch_stats}
        next_q = agent.critic.apply_fn(target_critic, batch.next_obs, next_actions, train=False)
        q, updates = agent.critic.apply_fn(critic_vars, batch.obs, batch.actions, train=True, mutable=["batch_stats"])
    target = jax.lax.stop_gradient(batch.rewards + args.gamma * (1.0 - batch.terminations) * next_q.min(axis=0))
    loss = 0.5 * ((q - target) ** 2).mean(axis=1).sum()
    return loss, (updates.get("batch_stats", {}), q.mean())


def actor_loss(params, agent: AgentState, obs: jax.Array):
    """-mean(min_i Q_i(s, pi(s))), actor in train mode, critic in eval mode; returns (loss, new actor batch_stats)."""
    actions, updates = agent.actor.apply_fn(
        {"params": params, "batch_stats": agent.actor.batch_stats}, obs, train=True, mutable=["batch_stats"]
    )
    q = agent.critic.apply_fn(variables_of(agent.critic), obs, actions, train=False)  # no statistics update
    return -q.min(axis=0).mean(), updates.get("batch_stats", {})


def make_train_step(args: Args):
    """Build the jitted per-env-step function: store the transition, then `utd` CrossQ updates."""

    def update_actor(agent: AgentState, metrics: Metrics, obs: jax.Array):
        (loss, batch_stats), grads = jax.value_and_grad(actor_loss, has_aux=True)(agent.actor.params, agent, obs)
        agent = agent._replace(actor=agent.actor.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
        if agent.targets is not None:  # TD3 BASELINE ONLY: Polyak averaging, on the actor's schedule
            live = Targets(agent.actor.params, agent.critic.params)
            agent = agent._replace(targets=optax.incremental_update(live, agent.targets, args.tau))
        return agent, metrics._replace(actor_loss=loss)

    def update(carry, key: jax.Array):
        agent, metrics, buffer = carry
        batch_key, critic_key = jax.random.split(key)
        batch = buffer_sample(buffer, batch_key, args.batch_size)
        (qf_loss, (batch_stats, qf_values)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            agent.critic.params, agent, batch, critic_key, args
        )
        agent = agent._replace(critic=agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
        metrics = metrics._replace(qf_loss=qf_loss, qf_values=qf_values)
        # The actor learns on the same batch after every `policy_delay`-th critic update.
        agent, metrics = jax.lax.cond(
            agent.critic.step % args.policy_delay == 0,
            update_actor,
            lambda agent, metrics, _: (agent, metrics),
            agent,
            metrics,
            batch.obs,
        )
        return (agent, metrics, buffer), None

    def train_step(agent: AgentState, buffer: ReplayBuffer, transition: Transition, metrics: Metrics, key, step):
        buffer = buffer_add(buffer, transition)
        (agent, metrics, buffer), _ = jax.lax.scan(update, (agent, metrics, buffer), jax.random.split(key, args.utd))
        losses_finite = jnp.isfinite(jnp.stack([metrics.qf_loss, metrics.actor_loss])).all()
        nonfinite_step = jnp.where((metrics.nonfinite_step < 0) & ~losses_finite, step, metrics.nonfinite_step)
        return agent, buffer, metrics._replace(nonfinite_step=nonfinite_step)

    return jax.jit(train_step, donate_argnums=(0, 1))


@jax.jit
def act(actor_state: BNTrainState, obs: jax.Array) -> jax.Array:
    """The deterministic evaluation action pi(s), actor in eval mode."""
    return actor_state.apply_fn(variables_of(actor_state), obs, train=False)


@jax.jit
def explore(actor_state: BNTrainState, obs: jax.Array, key: jax.Array, std: float) -> tuple[jax.Array, jax.Array]:
    """An exploration action clip(pi(s) + N(0, std^2) per dimension, -1, 1), actor in eval mode; and the next key."""
    key, noise_key = jax.random.split(key)
    return add_noise(act(actor_state, obs), noise_key, std), key


def evaluate(actor_state: BNTrainState, env: gym.Env, n_episodes: int) -> list[float]:
    """Returns of `n_episodes` episodes of the deterministic policy."""
    returns = []
    for _ in range(n_episodes):
        obs, _ = env.reset()
        done, episode_return = False, 0.0
        while not done:
            action = np.asarray(act(actor_state, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return returns


def train(args: Args) -> dict[str, float]:
    """Run CrossQ-TD3 (or the TD3 baseline) as `args` says; returns the last eval's mean return and the run's name."""
    check_args(args)
    check_env(args.env_id)
    check_optional_dependencies(args)
    run_name = f"{args.env_id}__{args.exp_name}__{args.seed}__{int(time.time())}"
    run_dir = os.path.join("runs", run_name)
    try:
        os.makedirs(run_dir, exist_ok=False)
        writer = SummaryWriter(run_dir)
    except OSError as e:
        raise ConfigError(f"cannot write the run directory {run_dir}: {e.strerror}") from None
    if args.track:
        import wandb

        wandb.init(
            project=args.wandb_project_name,
            entity=args.wandb_entity,
            sync_tensorboard=True,
            config=vars(args),
            name=run_name,
            save_code=True,
        )
    with open(os.path.join(run_dir, ARGS_FILE), "w") as f:
        json.dump(dataclasses.asdict(args), f, indent=2)
    writer.add_text(
        "hyperparameters",
        "|param|value|\n|-|-|\n" + "\n".join(f"|{key}|{value}|" for key, value in vars(args).items()),
    )
    print(f"run {run_name}: logging to {run_dir}", flush=True)

    # Seeding: Python and numpy for good measure; the env, its action space and JAX explicitly.
    random.seed(args.seed)
    np.random.seed(args.seed)
    key = jax.random.PRNGKey(args.seed)
    key, agent_key, explore_key = jax.random.split(key, 3)

    env = make_env(args.env_id, args.seed)()
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, run_name)()
    eval_env.reset(seed=args.seed + 10_000)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]

    agent = create_agent(args, obs_dim, action_dim, agent_key)
    buffer = ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
    train_step = make_train_step(args)
    store = jax.jit(buffer_add, donate_argnums=0)
    metrics = Metrics.initial()

    def check_finite(step: int) -> None:
        bad = int(metrics.nonfinite_step)
        if bad >= 0:
            raise FloatingPointError(f"training diverged: a loss became NaN/inf at env step {bad} (checked at {step})")

    def log_eval(step: int) -> float:
        returns = evaluate(agent.actor, eval_env, args.eval_episodes)
        writer.add_scalar("eval/episodic_return", np.mean(returns), step)
        print(
            f"step={step} eval/episodic_return={np.mean(returns):.1f} +- {np.std(returns):.1f} "
            f"({len(returns)} episodes)",
            flush=True,
        )
        return float(np.mean(returns))

    # TRY NOT TO MODIFY: start the game
    obs, _ = env.reset(seed=args.seed)
    eval_return = float("nan")
    start_time, eval_time = time.perf_counter(), 0.0  # SPS counts training time only, not evaluation
    for global_step in range(1, args.total_timesteps + 1):
        # ALGO LOGIC: put action logic here
        learning = global_step > args.learning_starts
        if learning:
            action, explore_key = explore(
                agent.actor, obs[None].astype(np.float32), explore_key, args.exploration_noise
            )
            action = np.asarray(action)[0]
        else:
            action = env.action_space.sample()

        next_obs, reward, terminated, truncated, info = env.step(action)
        # Bootstrap through time-limit truncations: only a true terminal ends the return.
        transition = Transition(
            obs.astype(np.float32),
            action.astype(np.float32),
            np.float32(reward),
            next_obs.astype(np.float32),
            np.float32(terminated),
        )
        if learning:
            key, update_key = jax.random.split(key)
            agent, buffer, metrics = train_step(agent, buffer, transition, metrics, update_key, global_step)
        else:
            buffer = store(buffer, transition)

        if terminated or truncated:
            writer.add_scalar("charts/episodic_return", info["episode"]["r"], global_step)
            writer.add_scalar("charts/episodic_length", info["episode"]["l"], global_step)
            obs, _ = env.reset()
        else:
            obs = next_obs

        if global_step % args.log_freq == 0:
            sps = int(global_step / (time.perf_counter() - start_time - eval_time))
            writer.add_scalar("charts/SPS", sps, global_step)
            if learning:
                check_finite(global_step)
                for name in ["qf_loss", "qf_values", "actor_loss"]:
                    writer.add_scalar(f"losses/{name}", float(getattr(metrics, name)), global_step)
                print(
                    f"step={global_step} SPS={sps} qf_loss={float(metrics.qf_loss):.3f} "
                    f"qf_values={float(metrics.qf_values):.2f} actor_loss={float(metrics.actor_loss):.3f}",
                    flush=True,
                )
            else:
                print(f"step={global_step} SPS={sps} (random actions until step {args.learning_starts})", flush=True)
        if (args.eval_freq and global_step % args.eval_freq == 0) or global_step == args.total_timesteps:
            eval_start = time.perf_counter()
            check_finite(global_step)
            eval_return = log_eval(global_step)
            eval_time += time.perf_counter() - eval_start

    if args.save_model:
        model_path = os.path.join(run_dir, f"{args.exp_name}.crossq_model")
        with open(model_path, "wb") as f:
            f.write(
                flax.serialization.to_bytes({"actor": variables_of(agent.actor), "critic": variables_of(agent.critic)})
            )
        print(f"model saved to {model_path}", flush=True)
    env.close()
    eval_env.close()
    writer.close()
    return {"eval_return": eval_return, "run_name": run_name}


if __name__ == "__main__":
    args = parse_args(sys.argv[1:])
    try:
        train(args)
    except (ConfigError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
