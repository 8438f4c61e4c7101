# CrossQ (SAC base) in JAX: Bhatt, Palenicek et al., "CrossQ: Batch Normalization in Deep
# Reinforcement Learning for Greater Sample Efficiency and Simplicity", ICLR 2024,
# https://arxiv.org/abs/1902.05605 (the authors' code: https://github.com/adityab/CrossQ).
# One self-contained file: Batch Renormalization layer, networks, replay buffer, jitted joint-pass
# update and training loop. Copy it, read it top to bottom, change it. What goes beyond CleanRL
# (checkpoints and exact resume, --eval-model, the Q-bias measurement, DeepMind Control) is in
# crossq_utils.py, which only the flags that need it import. Documentation: docs/crossq.md.
import dataclasses
import io
import json
import os
import random
import signal
import sys
import time
import warnings
from collections.abc import Callable
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
    exp_name: str = os.path.basename(__file__)[: -len(".py")]  # the name of this experiment
    seed: int = 1  # seed of the experiment: the env, its action space and the JAX keys all derive from it
    track: bool = False  # if toggled, this experiment will be tracked with Weights and Biases
    wandb_project_name: str = "crossq"  # the wandb's project name
    wandb_entity: str | None = None  # the entity (team) of wandb's project
    capture_video: bool = False  # if toggled, record the first episode of each evaluation to `videos/{run_name}`
    save_model: bool = False  # if toggled, save the actor and critic (with batch statistics) to `runs/{run_name}`
    eval_model: str | None = None  # evaluate a saved run (its directory, model file or checkpoint) and exit (*)

    # Algorithm specific arguments (defaults: the CrossQ column of the paper's Table 1)
    env_id: str = "Hopper-v4"  # the id of the environment (DeepMind Control: `dm_control/<domain>-<task>` (*))
    total_timesteps: int = 1_000_000  # total timesteps of the experiment (env steps)
    learning_starts: int = 5_000  # env steps of uniform-random actions before learning starts
    gamma: float = 0.99  # the discount factor gamma
    learning_rate: float = 1e-3  # the learning rate of the actor, critic and entropy-coefficient optimizers
    buffer_size: int = 1_000_000  # the replay memory buffer size
    batch_size: int = 256  # the batch size of sample from the replay memory (the joint pass sees twice as many rows)
    critic_activation: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(CRITIC_ACTIVATIONS) + "}")] = "relu"
    """the activation of the critics' hidden layers (the actor always uses relu); glu halves the width"""
    bn_mode: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(BN_MODES) + "}")] = "brn"
    """normalisation layers: Batch Renormalization, plain BatchNorm, none, or layernorm (the paper's LayerNorm
    ablation: LayerNorm before each hidden activation of the critics, no normalisation in the actor)"""
    bn_momentum: float = 0.99  # momentum of the running statistics of the normalisation layers
    bn_warmup_steps: int = 100_000  # train-mode calls of a BRN layer during which it acts as plain BatchNorm
    actor_bn: bool = True  # normalise the actor too (`--no-actor-bn`: the paper's critic-only ablation)
    critic_width: int = 2048  # the width of the critic's hidden layers (two: the loop in Critic.__call__)
    actor_width: int = 256  # the width of the actor's two hidden layers
    adam_b1: float = 0.5  # Adam's beta1 for the actor and the critic
    utd: int = 1  # update-to-data ratio: critic updates per env step
    policy_delay: int = 3  # the actor (and alpha) is updated after every `policy_delay`-th critic update
    n_critics: int = 2  # the number of critics in the ensemble (the TD target takes their minimum)
    eval_freq: int = 10_000  # evaluate the deterministic policy every `eval_freq` env steps (0: only at the end)
    eval_episodes: int = 10  # the number of episodes of each evaluation
    log_freq: int = 1_000  # log losses every `log_freq` env steps and print a progress line
    q_bias_freq: int = 0  # measure the critic's Q bias every `q_bias_freq` env steps (0: off; Figures 7, 17) (*)
    q_bias_samples: int = 1_000  # the states (s, a) at which each Q-bias measurement compares Q with the MC return
    q_bias_cutoff: int = 350  # only the first `q_bias_cutoff` states of each Q-bias episode count
    checkpoint_freq: int = 0  # checkpoint every `checkpoint_freq` env steps, at the end and on SIGTERM/Ctrl-C (*)
    resume: str | None = None  # continue the run saved in this run directory or checkpoint, exactly (*)
    # (*) needs crossq_utils.py beside this file


# Named starting points for the flags, picked by a word in front of them (the first: when none is given); flags after
# the word override its values. `small` is the paper's CrossQ (small) of Table 2 and Figure 9: 256-wide critics.
#   python crossq_jax.py small --env-id Hopper-v4
PRESETS: dict[str, tuple[str, Args]] = {
    "crossq": ("CrossQ with the paper's Table 1 hyperparameters (the defaults)", Args()),
    "small": (
        "CrossQ (small): 256-wide critics, as in the paper's Table 2",
        Args(exp_name="crossq_jax_small", critic_width=256),
    ),
}


def parse_args(argv: list[str] | None = None) -> Args:
    """`[PRESET] [--flag value ...]`: an optional preset word picks the defaults, every flag overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    word = argv.pop(0) if argv and argv[0] in PRESETS else None
    description, defaults = PRESETS[word or next(iter(PRESETS))]
    description += (
        f". Presets, chosen by a first word: {', '.join(PRESETS)}. (*): needs crossq_utils.py beside this file."
    )
    args = tyro.cli(Args, args=argv, default=defaults, description=description)
    if args.resume or args.eval_model:  # flags not given take the saved run's values
        args = load_utils("--resume" if args.resume else "--eval-model").saved_run_args(THIS, args, argv, word)
    return args


class ConfigError(ValueError):
    """A bad command line or environment, reported as one line (exit 2) before any compute is spent."""


THIS = sys.modules[__name__]  # what crossq_utils.py is given: it looks up this file's functions when it calls them


def load_utils(flag: str):
    """crossq_utils.py, for a flag that goes beyond CleanRL (only such a flag imports it: copied alone, this trains)."""
    try:
        import crossq_utils
    except ModuleNotFoundError as e:
        if e.name != "crossq_utils":
            raise
        raise ConfigError(f"{flag} needs crossq_utils.py beside {os.path.basename(__file__)}: copy it too") from None
    return crossq_utils


def make_env(
    env_id: str, seed: int, capture_video: bool = False, run_name: str = "", record_episode=lambda episode: episode > 0
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


def gym_make(env_id: str, **kwargs) -> gym.Env:
    """gym.make, DeepMind Control's ids registered (`dm_control/...`), observations flattened into one vector."""
    if env_id.startswith("dm_control/"):
        load_utils("--env-id dm_control/...").import_dm_control(THIS)
    with warnings.catch_warnings():  # the paper's v4 MuJoCo envs, which gymnasium 1.x calls out of date
        warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
        env = gym.make(env_id, **kwargs)
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        # DeepMind Control observes a dict of arrays: each entry flattened, in the Dict space's (sorted) key order, as
        # the authors' SB3 MultiInputPolicy concatenates them; an image or matrix Box is raveled.
        try:
            env = gym.wrappers.FlattenObservation(env)
        except Exception:  # a space gymnasium cannot flatten (a custom one)
            env = None
        if (
            env is None
            or not isinstance(env.observation_space, gym.spaces.Box)
            or len(env.observation_space.shape) != 1
        ):
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
    """The layer `--bn-mode` selects: BRN, plain BN (BRN with r=1, d=0 and flax's epsilon) or none (also for
    `layernorm`, whose LayerNorm sits elsewhere: see Critic)."""

    mode: str = "brn"
    momentum: float = 0.99
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.mode in ("none", "layernorm"):
            return x
        # Plain BN is flax's BatchNorm, as in the authors' plain-BN runs: its epsilon is 1e-5, not BRN's 1e-3 (with
        # 1e-3 a feature of variance below about 1e-3 would come out shrunk instead of normalised).
        limits = {"brn": {"r_max": 3.0, "d_max": 5.0}, "bn": {"r_max": 1.0, "d_max": 0.0, "epsilon": 1e-5}}[self.mode]
        norm = BatchRenorm(
            use_running_average=not train, momentum=self.momentum, warmup_steps=self.warmup_steps, **limits
        )
        return norm(x)


class Critic(nn.Module):
    """Q(s, a): concat(s, a) -> norm -> [Dense -> act -> norm] x 2 -> Dense(1). With `bn_mode` layernorm (the
    authors' `-bn 0 -ln 1` runs): concat(s, a) -> [Dense -> LayerNorm -> act] x 2 -> Dense(1)."""

    width: int = 2048
    activation: str = "relu"
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array, train: bool) -> jax.Array:
        norm = lambda: Normalization(self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        x = norm()(jnp.concatenate([obs, actions], axis=-1), train)
        for _ in range(2):  # the hidden layers
            x = nn.Dense(self.width)(x)
            if self.bn_mode == "layernorm":
                x = nn.LayerNorm()(x)
            x = norm()(CriticActivation(self.activation)(x), train)
        return nn.Dense(1)(x).squeeze(-1)


class CriticEnsemble(Critic):
    """`n_critics` independent Critics with these settings, in one vectorised call: (n_critics, batch)."""

    n_critics: int = 2

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array, train: bool) -> jax.Array:
        vmap = {"variable_axes": {"params": 0, "batch_stats": 0}, "split_rngs": {"params": True}, "in_axes": None}
        ensemble = nn.vmap(Critic, **vmap, out_axes=0, axis_size=self.n_critics)
        critic = ensemble(self.width, self.activation, self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        return critic(obs, actions, train)


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
    batch_stats: Any  # the network's running statistics, beside its parameters


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
    def initial(cls) -> "Metrics":  # distinct arrays, not one shared zero: the update donates these buffers
        zeros = [jnp.zeros((), jnp.float32) for _ in range(4)]
        return cls(*zeros, jnp.ones((), jnp.float32), jnp.full((), -1, jnp.int32), jnp.zeros((), jnp.int32))


LOSS_NAMES = ("qf_loss", "actor_loss", "alpha_loss")


# ALGO LOGIC: replay buffer, on the device so that sampling happens inside the jitted update
class Transition(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminations: jax.Array  # 1.0 on a true terminal only; time-limit truncations bootstrap


class ReplayBuffer(NamedTuple):
    obs: jax.Array
    actions: jax.Array
    rewards: jax.Array
    next_obs: jax.Array
    terminations: jax.Array
    position: jax.Array  # where the next transition goes
    size: jax.Array  # how many slots hold data

    @classmethod
    def create(cls, capacity: int, obs_dim: int, action_dim: int) -> "ReplayBuffer":
        rows = [jnp.zeros((capacity, *shape), jnp.float32) for shape in [(obs_dim,), (action_dim,), (), (obs_dim,), ()]]
        return cls(*rows, position=jnp.zeros((), jnp.int32), size=jnp.zeros((), jnp.int32))


def buffer_add(buffer: ReplayBuffer, transition: Transition) -> ReplayBuffer:
    capacity, i = buffer.rewards.shape[0], buffer.position
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
    obs, action, (reward, terminated), next_obs, policy_obs = jnp.split(
        step_data, np.cumsum([obs_dim, action_dim, 2, obs_dim])
    )
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
    state = lambda module, v: BNTrainState.create(
        apply_fn=module.apply, params=v["params"], batch_stats=v.get("batch_stats", {}), tx=adam
    )
    # alpha starts at 1.0; its Adam keeps the default betas.
    log_alpha = {"log_alpha": jnp.zeros((), jnp.float32)}
    log_alpha = TrainState.create(apply_fn=None, params=log_alpha, tx=optax.adam(args.learning_rate))
    return AgentState(actor=state(actor, actor_vars), critic=state(critic, critic_vars), log_alpha=log_alpha)


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
    `train_step(agent, metrics, buffer, keys, obs, lead)` -> (agent, metrics, keys, action for `obs`), where `lead` is
    the number of this step's critic updates before the first one the actor follows (see train())."""
    target_entropy = -float(action_dim)

    def update(carry: tuple, inputs: tuple, with_actor: bool):
        """A critic update on one batch, then (`with_actor`) an actor and alpha update on its observations."""
        (agent, metrics), (batch, critic_key, actor_key) = carry, inputs
        (qf_loss, (batch_stats, qf_values)), grads = jax.value_and_grad(critic_loss, has_aux=True)(
            agent.critic.params, agent, batch, critic_key, args
        )
        agent = agent._replace(critic=agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
        metrics = metrics._replace(qf_loss=qf_loss, qf_values=qf_values)
        if with_actor:
            (loss, (batch_stats, logp)), grads = jax.value_and_grad(actor_loss, has_aux=True)(
                agent.actor.params, agent, batch.obs, actor_key
            )
            actor = agent.actor.apply_gradients(grads=grads).replace(batch_stats=batch_stats)
            entropy_loss, alpha_grad = jax.value_and_grad(alpha_loss)(agent.log_alpha.params, logp, target_entropy)
            log_alpha = agent.log_alpha.apply_gradients(grads=alpha_grad)
            agent = agent._replace(actor=actor, log_alpha=log_alpha)
            alpha = jnp.exp(log_alpha.params["log_alpha"])
            metrics = metrics._replace(actor_loss=loss, alpha_loss=entropy_loss, alpha=alpha)
        return (agent, metrics), jnp.isfinite(jnp.stack([getattr(metrics, name) for name in LOSS_NAMES]))

    def updates(carry: tuple, inputs: tuple, with_actor: bool):
        """One update per batch of `inputs`, as a loop of known length: on a GPU no host round trip (and XLA removes
        a loop of one update). Also returns whether each update's losses are finite."""
        return jax.lax.scan(lambda carry, x: update(carry, x, with_actor), carry, inputs)

    def train_step(agent: AgentState, metrics: Metrics, buffer: ReplayBuffer, keys: dict, obs: jax.Array, lead: int):
        # The buffer is only read here: storing happens in its own jitted call, since XLA on CPU copies whole
        # buffer columns when one call both writes and samples the buffer. All of the step's batches are drawn
        # first, so that no loop carries or closes over the buffer.
        next_update_key, step_key = jax.random.split(keys["update"])
        batch_keys, critic_keys, actor_keys = jnp.moveaxis(
            jax.vmap(lambda key: jax.random.split(key, 3))(jax.random.split(step_key, args.utd)), 1, 0
        )
        batches = jax.vmap(lambda key: buffer_sample(buffer, key, args.batch_size))(batch_keys)
        take = lambda start, n: jax.tree.map(lambda x: x[start : start + n], (batches, critic_keys, actor_keys))
        # After `lead` critic-only updates, the actor follows the first update of each period of `policy_delay`; a
        # loop over the whole periods keeps the program's size whatever --utd is.
        delay = args.policy_delay
        periods, rest = divmod(args.utd - lead, delay)
        carry, finite = (agent, metrics), []

        def period(carry: tuple, inputs: tuple):  # an update the actor follows, then up to delay - 1 critic-only ones
            carry, actor_finite = updates(carry, jax.tree.map(lambda x: x[:1], inputs), True)
            if len(inputs[1]) == 1:
                return carry, actor_finite
            carry, critic_finite = updates(carry, jax.tree.map(lambda x: x[1:], inputs), False)
            return carry, jnp.concatenate([actor_finite, critic_finite])

        if lead:
            carry, lead_finite = updates(carry, take(0, lead), False)
            finite.append(lead_finite)
        if periods:
            inputs = jax.tree.map(lambda x: x.reshape(periods, delay, *x.shape[1:]), take(lead, periods * delay))
            carry, periods_finite = jax.lax.scan(period, carry, inputs)
            finite.append(periods_finite.reshape(-1, len(LOSS_NAMES)))
        if rest:
            carry, rest_finite = period(carry, take(args.utd - rest, rest))
            finite.append(rest_finite)
        agent, metrics = carry
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

    return jax.jit(train_step, static_argnames="lead", donate_argnums=(0, 1))


# ALGO LOGIC: acting and evaluation
@jax.jit
def explore(actor_state: BNTrainState, obs: jax.Array, explore_key: jax.Array) -> jax.Array:
    """An exploration action sampled from pi (actor in eval mode) with split(explore_key)[1]. The key moves on to
    split(explore_key)[0] once that action is taken (in the next train_step): a checkpoint's key draws next."""
    mean, log_std = actor_state.apply_fn(variables_of(actor_state), obs, train=False)
    return sample_tanh_gaussian(mean, log_std, jax.random.split(explore_key)[1])[0]


@jax.jit
def deterministic_action(actor_state: BNTrainState, obs: jax.Array) -> jax.Array:
    return jnp.tanh(actor_state.apply_fn(variables_of(actor_state), obs, train=False)[0])  # tanh(mean), eval mode


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


@jax.jit
def q_bias_pass(agent: AgentState, obs: jax.Array, actions: jax.Array, key: jax.Array) -> tuple:
    """What --q-bias-freq compares (crossq_utils.py plays the episodes), networks in eval mode: the critics' mean Q
    of (obs, actions), as Chen et al. and the authors measure it; an action from pi for each obs with its log pi (the
    Q is soft); and alpha."""
    mean_q = agent.critic.apply_fn(variables_of(agent.critic), obs, actions, train=False).mean(axis=0)
    mean, log_std = agent.actor.apply_fn(variables_of(agent.actor), obs, train=False)
    return mean_q, sample_tanh_gaussian(mean, log_std, key), jnp.exp(agent.log_alpha.params["log_alpha"])


# Checks that refuse a bad command line or env in one line (exit 2) before any compute is spent
INT32_MAX = 2**31 - 1  # env steps, update counters and buffer positions are int32 on the device
POSITIVE, NOT_NEGATIVE = (0, INT32_MAX, False, True), (0, INT32_MAX, True, True)
# Each number flag's range: (lowest, highest, whether the lowest is allowed, whether the highest is); a float is
# checked as the float32 it becomes on the device (1e-50 is 0 there, 1e39 inf).
FLAG_RANGES = {
    **dict.fromkeys(["total_timesteps", "batch_size", "critic_width", "actor_width", "utd", "policy_delay"], POSITIVE),
    **dict.fromkeys(["n_critics", "eval_episodes", "log_freq", "q_bias_samples", "q_bias_cutoff"], POSITIVE),
    **dict.fromkeys(
        ["learning_starts", "bn_warmup_steps", "eval_freq", "checkpoint_freq", "q_bias_freq"], NOT_NEGATIVE
    ),
    "buffer_size": POSITIVE,
    "seed": (0, 2**32 - 1 - 30_000, True, True),  # np.random.seed's limit, less the eval and Q-bias envs' offsets
    "gamma": (0.0, 1.0, True, True),
    "learning_rate": (0.0, float("inf"), False, False),
    "adam_b1": (0.0, 1.0, True, False),  # 1 would divide Adam's bias correction by zero
    "bn_momentum": (0.0, 1.0, False, False),
}
CHOICES = {"critic_activation": CRITIC_ACTIVATIONS, "bn_mode": BN_MODES}


def check_args(args: Args) -> None:
    """Refuse hyperparameters out of the range their use needs, naming the flag."""
    for name, (low, high, low_ok, high_ok) in FLAG_RANGES.items():
        value = getattr(args, name)
        with np.errstate(over="ignore"):  # 1e300 is inf in float32: refused below
            x = value if isinstance(value, int) else float(np.float32(value))
        if (low < x or (low_ok and x == low)) and (x < high or (high_ok and x == high)):
            continue
        if high == INT32_MAX and x > high:
            rule = f"must be at most {INT32_MAX}, an int32 on the device"
        elif low == 0 and high in (INT32_MAX, float("inf")):
            rule = ("must not be negative" if low_ok else "must be positive") + ("" if high_ok else " and finite")
        else:
            ends = [f"{end:g}" if isinstance(end, float) else f"{end}" for end in (low, high)]
            rule = f"must lie in {'[('[not low_ok]}{ends[0]}, {ends[1]}{'])'[not high_ok]}"
        raise ConfigError(f"--{name.replace('_', '-')} {rule} (got {value}{'' if x == value else f', {x} in float32'})")
    for name, choices in CHOICES.items():
        if (value := getattr(args, name)) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} (got {value!r})")
    if args.exp_name in ("", ".", "..") or "/" in args.exp_name or "\0" in args.exp_name or len(args.exp_name) > 200:
        raise ConfigError(
            f"--exp-name must name a file: no '/', not . or .., at most 200 characters ({args.exp_name!r})"
        )
    if args.critic_activation == "glu" and args.critic_width % 2:
        raise ConfigError(
            f"--critic-activation glu halves the width: --critic-width must be even ({args.critic_width})"
        )
    if (updates := args.utd * max(args.total_timesteps - args.learning_starts, 0)) > INT32_MAX:
        raise ConfigError(f"--utd x (--total-timesteps - --learning-starts) is {updates} updates (at most {INT32_MAX})")
    for name in ("learning_starts", "buffer_size"):  # the first update samples a full batch
        if (value := getattr(args, name)) < args.batch_size:
            raise ConfigError(f"--{name.replace('_', '-')} ({value}) must be at least --batch-size ({args.batch_size})")


def check_env(env_id: str, render: bool = False) -> tuple[int, int]:
    """Refuse an env the agent cannot drive (unknown id or module, discrete or unbounded actions, observations that
    do not flatten, a reset or step that breaks); with `render` (--capture-video), one that cannot draw a frame.
    Returns (obs_dim, action_dim)."""
    try:
        env = gym_make(env_id, **({"render_mode": "rgb_array"} if render else {}))
        if render and env.reset(seed=0) and np.ndim(env.render()) != 3:
            raise RuntimeError("render() gave no RGB image")
    except (gym.error.Error, ImportError) as e:  # an unknown id or module, MuJoCo missing ...
        raise ConfigError(f"cannot make env {env_id!r}: {e}") from None
    except Exception as e:
        if not render:
            raise
        gl = os.environ.get("MUJOCO_GL", "(unset)")
        raise ConfigError(
            f"cannot render {env_id} with MUJOCO_GL={gl} ({type(e).__name__}: {e}); without a screen: "
            "apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri (docs/evaluation.md)"
        ) from None
    actions, observations = env.action_space, env.observation_space
    box = isinstance(actions, gym.spaces.Box)
    if not box or len(actions.shape) != 1 or actions.shape[0] == 0:
        what = f"actions of shape {actions.shape}" if box else f"a {type(actions).__name__} action space"
        raise ConfigError(f"{env_id} has {what}; the agent needs a continuous Box action space of one dimension")
    if not np.all(np.isfinite(actions.low) & np.isfinite(actions.high) & (actions.low < actions.high)):
        raise ConfigError(f"{env_id} has unbounded action bounds or low >= high; the agent needs finite low < high")
    if observations.shape[0] == 0:
        raise ConfigError(f"{env_id} has empty observations (shape {observations.shape})")
    try:  # once what the loop does with it: a malformed env is refused now, not after the first compile
        obs, (next_obs, reward, *_) = env.reset(seed=0)[0], env.step(actions.sample())
        assert np.shape(obs) == np.shape(next_obs) == observations.shape and np.ndim(reward) == 0, "malformed output"
    except Exception as e:
        raise ConfigError(f"{env_id} does not reset and step as its spaces say ({type(e).__name__}: {e})") from None
    env.close()
    return observations.shape[0], actions.shape[0]


def check_extras(args: Args) -> None:
    """--track and --capture-video need extra packages: say so before anything runs. Before MuJoCo is imported: on a
    headless machine it must render offscreen (EGL), and MuJoCo reads MUJOCO_GL as it is imported."""
    for flag, module in [("track", "wandb"), ("capture_video", "moviepy")]:
        try:
            __import__(module) if getattr(args, flag) else None
        except ImportError:
            raise ConfigError(
                f"--{flag.replace('_', '-')} needs {module}: pip install -r requirements-extras.txt"
            ) from None
    if args.capture_video and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")


def check_memory(args: Args, obs_dim: int, action_dim: int) -> None:
    """Refuse a run whose buffer and networks (by jax.eval_shape) exceed the available RAM, or the GPU's for JAX."""
    nbytes = lambda make: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(jax.eval_shape(make)))
    buffer = nbytes(lambda: ReplayBuffer.create(args.buffer_size, obs_dim, action_dim))
    networks = nbytes(lambda: create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(0)))
    device, available, where = jax.devices()[0], float("inf"), "this machine has RAM available:"
    if device.platform != "cpu":
        available, where = (device.memory_stats() or {}).get("bytes_limit", available), f"this {device.device_kind} has"
    elif os.path.exists("/proc/meminfo"):
        with open("/proc/meminfo") as f:
            available = next((int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:")), available)
    if buffer + networks > available:
        flags = f"--critic-width {args.critic_width} with --n-critics {args.n_critics}"
        need, flags = max((buffer, f"--buffer-size {args.buffer_size}"), (networks, flags))
        gib = lambda n: f"{n / 2**30:.1f} GiB"
        raise ConfigError(f"{flags} needs ~{gib(need)} (~{gib(buffer + networks)} in all); {where} {gib(available)}")


# Logging, saving, and stopping a diverged run (exit 1) with a message that names the step
class SummaryWriter:
    """What CleanRL's scripts use of torch's SummaryWriter, on the `tensorboard` package alone."""

    def __init__(self, log_dir: str):
        from tensorboard.summary.writer.event_file_writer import EventFileWriter

        self.log_dir, self.events = log_dir, EventFileWriter(log_dir)

    def add_scalar(self, tag: str, value: float, step: int, text: str | None = None) -> None:
        from tensorboard.compat.proto.event_pb2 import Event
        from tensorboard.compat.proto.summary_pb2 import Summary
        from tensorboard.plugins.text.summary_v2 import text_pb

        summary = text_pb(tag, text) if text else Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self.events.add_event(Event(wall_time=time.time(), step=step, summary=summary))

    def add_text(self, tag: str, text: str) -> None:
        self.add_scalar(tag, 0.0, 0, text)

    def close(self) -> None:
        self.events.close()


def save_model(agent: AgentState, args: Args, path: str) -> None:
    """--save-model: the actor and critic (parameters and batch statistics) and the hyperparameters that shape them,
    through a temporary file renamed once whole (a kill or a full disk leaves no partial file). --eval-model reads it.
    """
    model = {"actor": variables_of(agent.actor), "critic": variables_of(agent.critic), "args": json.dumps(vars(args))}
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.to_bytes(model))
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    print(
        f"model saved to {path}; evaluate it with: python {os.path.relpath(__file__)} --eval-model {path}", flush=True
    )


all_finite = jax.jit(lambda tree: jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all())


def check_finite(step: int, agent: AgentState, metrics: Metrics) -> None:
    """A NaN/inf loss that the update flagged, or NaN/inf in the networks' state, stops the run; checked where the
    host reads the state anyway: progress lines, evaluations and checkpoints."""
    if (bad := int(metrics.nonfinite_step)) >= 0:
        loss = LOSS_NAMES[int(metrics.nonfinite_loss)]
        raise FloatingPointError(f"training diverged: losses/{loss} became NaN/inf at env step {bad} (seen at {step})")
    for network in ("actor", "critic"):
        if not bool(all_finite(getattr(agent, network))):
            raise FloatingPointError(f"training diverged: the {network}'s state holds NaN/inf at env step {step}")


def start_logging(args: Args, run_name: str) -> SummaryWriter:
    """W&B (--track) and the TensorBoard writer of runs/{run_name}; a new run's first event: the hyperparameters."""
    if args.track:  # before the writer: W&B syncs TensorBoard by patching the event writer it creates
        import wandb

        wandb_run = {"project": args.wandb_project_name, "entity": args.wandb_entity, "name": run_name}
        try:
            wandb.init(**wandb_run, sync_tensorboard=True, config=vars(args), save_code=True)
        except Exception as e:  # not logged in, no network, a bad entity ...
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            message = f"--track: W&B could not start a run ({reason}); `wandb login`, or WANDB_MODE=offline"
            raise ConfigError(message) from None
    writer = SummaryWriter(f"runs/{run_name}")
    with open(f"runs/{run_name}/args.json", "w") as f:  # the flags of this run (a resumed one's as resumed)
        json.dump(vars(args), f, indent=2)
    if not args.resume:
        table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
        writer.add_text("hyperparameters", f"|param|value|\n|-|-|\n{table}")
    print(f"run {run_name}: logging to runs/{run_name}", flush=True)
    return writer


# ALGO LOGIC: the training loop
# What each progress line logs to TensorBoard as losses/<name> and prints in this format (None: logged only).
PROGRESS_METRICS = {"qf_loss": ".3f", "qf_values": ".2f", "actor_loss": ".3f", "alpha": ".4f", "alpha_loss": None}


def train(args: Args) -> dict:
    """Run CrossQ as `args` says; returns the last evaluation's mean return and the run's name."""
    check_args(args)
    check_extras(args)
    obs_dim, action_dim = check_env(args.env_id, render=args.capture_video)
    check_memory(args, obs_dim, action_dim)
    run_name = f"{args.env_id.replace('/', '-')}__{args.exp_name}__{args.seed}__{int(time.time())}"
    # --resume, --checkpoint-freq and --q-bias-freq need crossq_utils.py: refused now if it is missing
    flag = next((f for f in ["resume", "checkpoint_freq", "q_bias_freq"] if getattr(args, f)), None)
    utils, checkpoints = load_utils(f"--{flag.replace('_', '-')}") if flag else None, None
    if args.checkpoint_freq or args.resume:  # every check of the checkpoint to resume comes before any compute
        checkpoints = utils.Checkpoints(THIS, args, run_name, obs_dim, action_dim)
        run_name = checkpoints.run_name  # a resumed run keeps its own

    # Seeding: Python and numpy for good measure; the env, its action space and JAX explicitly.
    random.seed(args.seed), np.random.seed(args.seed)
    key, agent_key, explore_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    agent = create_agent(args, obs_dim, action_dim, agent_key)
    train_step = make_train_step(args, action_dim)

    env = make_env(args.env_id, args.seed)()
    env = checkpoints.recorder(env) if checkpoints else env  # it keeps each episode's start and actions, for resuming
    env.reset(seed=args.seed)  # seeds the env's generator; each later reset draws from it
    # One video per evaluation, of its first episode (episode 0 is the seeding reset below).
    first_of_each_evaluation = lambda episode: episode > 0 and (episode - 1) % args.eval_episodes == 0
    eval_env = make_env(args.env_id, args.seed + 10_000, args.capture_video, run_name, first_of_each_evaluation)()
    eval_env.reset(seed=args.seed + 10_000)
    buffer, metrics = ReplayBuffer.create(args.buffer_size, obs_dim, action_dim), Metrics.initial()
    store, keys = jax.jit(store_step, donate_argnums=0), {"update": key, "explore": explore_key}  # see train_step
    start_step, train_seconds, episodic_return, eval_return = 0, 0.0, float("nan"), float("nan")
    if args.resume:  # the checkpoint's arrays, generators and env state: the run goes on as if never stopped
        state = {"agent": agent, "buffer": buffer, "metrics": metrics, "keys": keys, "obs": np.zeros(obs_dim)}
        state, start_step, train_seconds, episodic_return, eval_return = checkpoints.restore(state, env, eval_env)
        agent, buffer, metrics, keys, obs = (state[name] for name in ("agent", "buffer", "metrics", "keys", "obs"))
    else:
        obs, _ = env.reset()
    writer = start_logging(args, run_name)
    # Each learning env step ends with the next step's action, drawn after the step's updates; the first is drawn here.
    if start_step >= args.learning_starts:
        next_action = explore(agent.actor, obs[None].astype(np.float32), keys["explore"])
    # SPS counts training alone (evaluations, Q bias and checkpoints are left out), from the start of its phase:
    # random actions until learning_starts run far faster than learning.
    clock_start = time.perf_counter() - train_seconds  # the training seconds are time.perf_counter() - clock_start
    sps_from = (start_step, train_seconds)

    try:
        for global_step in range(start_step + 1, args.total_timesteps + 1):
            if STOPPED:  # Ctrl-C (see stop)
                raise KeyboardInterrupt
            learning = global_step > args.learning_starts
            if learning:
                action = np.asarray(next_action)[0]  # waits for the previous step's device work
                if not np.isfinite(action).all():
                    check_finite(global_step, agent, metrics)  # names the loss that went NaN/inf first
                    raise FloatingPointError(f"training diverged: the action is NaN/inf at env step {global_step}")
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
                where = f"in float32 (as stored) at env step {global_step}"
                raise FloatingPointError(f"{args.env_id} returned an observation or reward that is NaN/inf {where}")
            buffer, device_obs = store(buffer, step_data)
            obs = policy_obs
            if learning:  # this step's updates, then the next step's action: one compiled program, no host wait
                # Delayed policy updates: the actor follows every policy_delay-th critic update of the run. `lead`, this
                # step's critic updates before its first such one, is static: one compiled program per value (at most
                # policy_delay) and no conditional, which on a GPU stops the host until the device gets there.
                updates_before = (global_step - args.learning_starts - 1) * args.utd
                lead = min(args.policy_delay - 1 - updates_before % args.policy_delay, args.utd)
                agent, metrics, keys, next_action = train_step(agent, metrics, buffer, keys, device_obs, lead)
            elif global_step == args.learning_starts:
                next_action = explore(agent.actor, device_obs, keys["explore"])

            if global_step % args.log_freq == 0:  # charts/SPS, losses/* and one plain line
                train_seconds = time.perf_counter() - clock_start
                sps = int((global_step - sps_from[0]) / max(train_seconds - sps_from[1], 1e-6))
                writer.add_scalar("charts/SPS", sps, global_step)
                writer.add_scalar("charts/train_seconds", train_seconds, global_step)
                line = f"step={global_step} SPS={sps} episodic_return={episodic_return:.1f}".replace("=nan", "=-")
                if learning:
                    check_finite(global_step, agent, metrics)
                    for name, spec in PROGRESS_METRICS.items():
                        value = float(getattr(metrics, name))
                        writer.add_scalar(f"losses/{name}", value, global_step)
                        line += f" {name}={value:{spec}}" if spec else ""
                    left = int((args.total_timesteps - global_step) / max(sps, 1))
                    line += f" time_left={left // 3600}:{left // 60 % 60:02d}:{left % 60:02d}"
                print(line if learning else f"{line} (random actions until step {args.learning_starts})", flush=True)
            if global_step == args.learning_starts:  # SPS from here on counts the learning phase alone
                sps_from = (global_step, time.perf_counter() - clock_start)

            paused_at = time.perf_counter()  # evaluations, Q bias and checkpoints do not count as training time
            if (args.eval_freq and global_step % args.eval_freq == 0) or global_step == args.total_timesteps:
                check_finite(global_step, agent, metrics)
                returns = evaluate(agent.actor, eval_env, args.eval_episodes)
                eval_return = float(np.mean(returns))
                writer.add_scalar("eval/episodic_return", eval_return, global_step)
                spread = f"+- {np.std(returns):.1f} ({len(returns)} episodes)"
                print(f"step={global_step} eval/episodic_return={eval_return:.1f} {spread}", flush=True)
            if args.q_bias_freq and global_step % args.q_bias_freq == 0:  # the paper's Figures 7 and 17
                utils.log_q_bias(THIS, writer, agent, args, global_step)
            if (
                checkpoints
            ):  # every --checkpoint-freq env steps, at the end, and after SIGTERM or Ctrl-C (then it stops)
                state = {"agent": agent, "buffer": buffer, "metrics": metrics, "keys": keys, "obs": obs}
                seconds = paused_at - clock_start
                checkpoints.save_if_due(global_step, state, seconds, episodic_return, eval_return, env, eval_env)
            clock_start += time.perf_counter() - paused_at

        if args.save_model:
            save_model(agent, args, f"runs/{run_name}/{args.exp_name}.crossq_model")
    finally:  # however the loop ends: the events flushed, the last video written, the signal handlers put back
        for resource in (writer, env, eval_env, checkpoints):
            if resource is not None:
                resource.close()
        if args.track:
            sys.modules["wandb"].finish()
    return {"eval_return": eval_return, "run_name": run_name}


STOPPED: list[int] = []  # the Ctrl-C the loop has yet to act on


def stop(signum: int, frame: Any) -> None:
    """Ctrl-C ends the run at the end of its step rather than where it comes (Python's own KeyboardInterrupt, raised
    while XLA compiles, can crash the interpreter); a second one ends it at once. With checkpoints on, crossq_utils.py
    takes the signal instead, and stops with a checkpoint."""
    if STOPPED:
        os._exit(128 + signum)
    STOPPED.append(signum)


class Stdout(io.TextIOBase):
    """stdout that, once its reader has gone (`python crossq_jax.py ... | head`), drops what follows instead of
    ending the run at its next line."""

    stream = sys.stdout  # the one this file was started with

    def write(self, text: str) -> int:
        try:
            print(text, end="", file=self.stream, flush=True)
        except BrokenPipeError:  # into /dev/null from now on (Python's own flush at exit would fail too)
            os.dup2(os.open(os.devnull, os.O_WRONLY), self.stream.fileno())
        return len(text)


if __name__ == "__main__":
    sys.stdout, _ = Stdout(), signal.signal(signal.SIGINT, stop)
    try:
        args = parse_args()
        load_utils("--eval-model").evaluate_model(THIS, args) if args.eval_model else train(args)
    except ConfigError as e:  # a bad command line or env, before any compute
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except (FloatingPointError, OSError) as e:  # diverged; a disk that is full or not writable
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C without checkpoints (with them, the run stops at a checkpoint)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
