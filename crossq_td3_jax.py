# CrossQ (TD3 base; first word `td3`: the TD3 baseline) in JAX, Figure 5 of https://arxiv.org/abs/1902.05605. One file:
# copy it, read it top to bottom, change it. Beyond CleanRL: crossq_utils.py, imported only by the flags that need it.
import dataclasses
import io
import json
import os
import random
import signal
import sys
import time
import warnings
from typing import Annotated, Any, Literal, NamedTuple

import flax
import flax.linen as nn
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tyro
from flax.training.train_state import TrainState
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.text.summary_v2 import text_pb

CRITIC_ACTIVATIONS = ("relu", "tanh", "elu", "glu", "relu6", "sin", "relu_over_max", "layernormed_relu", "gelu", "silu")
TARGET_SCHEDULES = ("fujimoto", "authors")
LOSS_NAMES = ("qf_loss", "actor_loss")  # the losses whose NaN/inf the update flags (Metrics.nonfinite_loss indexes it)
THIS = sys.modules[__name__]  # what crossq_utils.py is given: it looks up this file's functions when it calls them
STOPPED: list[int] = []  # a Ctrl-C, acted on at the end of the step (a KeyboardInterrupt mid-compile can crash Python)


@dataclasses.dataclass
class Args:  # (*): needs crossq_utils.py beside this file
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
    learning_rate: float = 1e-3  # the learning rate of the actor and critic optimizers
    buffer_size: int = 1_000_000  # the replay memory buffer size
    batch_size: int = 256  # the batch size of sample from the replay memory (the joint pass sees twice as many rows)
    critic_activation: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(CRITIC_ACTIVATIONS) + "}")] = "relu"
    """the activation of the critics' hidden layers (the actor always uses relu); glu halves the width"""
    bn_mode: Literal["brn", "bn", "none"] = "brn"  # normalisation: Batch Renormalization, plain BatchNorm, or none
    bn_momentum: float = 0.99  # momentum of the running statistics of the normalisation layers
    bn_warmup_steps: int = 100_000  # train-mode calls of a BRN layer during which it acts as plain BatchNorm
    actor_bn: bool = True  # normalise the actor too (`--no-actor-bn`: the paper's critic-only ablation)
    critic_width: int = 2048  # the width of the critic's hidden layers (two: the loop in Critic.__call__)
    actor_width: int = 256  # the width of the actor's two hidden layers
    adam_b1: float = 0.5  # Adam's beta1 for the actor and the critic
    utd: int = 1  # update-to-data ratio: critic updates per env step
    policy_delay: int = 3  # the actor is updated after every `policy_delay`-th critic update, on the same batch
    n_critics: int = 2  # the number of critics in the ensemble (the TD target and the actor loss take their minimum)
    policy_noise: float = 0.2  # std of the Gaussian noise added to each dimension of the target action (smoothing)
    noise_clip: float = 0.5  # the target action's noise is clipped to [-noise_clip, noise_clip]
    exploration_noise: float = 0.1  # std of the Gaussian noise added to each action dimension while collecting data
    tau: float | None = None  # Polyak rate of target actor and critics; None: no target networks (CrossQ)
    target_schedule: Annotated[str, tyro.conf.arg(metavar="{" + ",".join(TARGET_SCHEDULES) + "}")] = "fujimoto"
    """with --tau: fujimoto (Fujimoto et al.'s: target actor and critics, after each actor update) or authors (the
    CrossQ authors' TD3 mode: target critics only, moved after every critic update, a' from the live actor)"""
    eval_freq: int = 10_000  # evaluate the deterministic policy every `eval_freq` env steps (0: only at the end)
    eval_episodes: int = 10  # the number of episodes of each evaluation
    log_freq: int = 1_000  # log losses every `log_freq` env steps and print a progress line
    q_bias_freq: int = 0  # measure the critic's Q bias every `q_bias_freq` env steps (0: off; Figures 7, 17) (*)
    q_bias_samples: int = 1_000  # the states (s, a) at which each Q-bias measurement compares Q with the MC return
    q_bias_cutoff: int = 350  # only the first `q_bias_cutoff` states of each Q-bias episode count
    checkpoint_freq: int = 0  # checkpoint every `checkpoint_freq` env steps, at the end and on SIGTERM/Ctrl-C (*)
    resume: str | None = None  # continue the run saved in this run directory or checkpoint, exactly (*)


# Named starting points for the flags, picked by a first word (default: the first); flags after it override its values.
PRESETS: dict[str, tuple[str, Args]] = {
    "crossq_td3": ("CrossQ (TD3 base): no target networks, Batch Renormalization (the defaults)", Args()),
    "td3": (
        "TD3 baseline: target networks (tau 0.005), no normalisation, 256-wide critics, Adam b1 0.9, policy delay 2",
        Args(exp_name="td3_baseline", tau=0.005, bn_mode="none", critic_width=256, adam_b1=0.9, policy_delay=2),
    ),
}


def parse_args(argv: list[str] | None = None) -> Args:
    """`[PRESET] [--flag value ...]`: an optional preset word picks the defaults, every flag overrides them."""
    argv = list(sys.argv[1:] if argv is None else argv)
    word = argv.pop(0) if argv and argv[0] in PRESETS else None
    description, defaults = PRESETS[word or next(iter(PRESETS))]
    description += f". Presets, chosen by a first word: {', '.join(PRESETS)}. (*): needs crossq_utils.py beside it."
    args = tyro.cli(Args, args=argv, default=defaults, description=description)
    if args.resume or args.eval_model:  # flags not given take the saved run's values
        args = load_utils("--resume" if args.resume else "--eval-model").saved_run_args(THIS, args, argv, word)
    return args


class ConfigError(ValueError): ...  # a bad command line or env, reported in one line (exit 2) before any compute


def load_utils(flag: str):
    """crossq_utils.py, for a flag that goes beyond CleanRL (only such a flag imports it: copied alone, this trains)."""
    try:
        return __import__("crossq_utils")
    except ModuleNotFoundError as e:
        if e.name != "crossq_utils":
            raise
        raise ConfigError(f"{flag} needs crossq_utils.py beside {os.path.basename(__file__)}: copy it too") from None


def make_env(env_id: str, seed: int, capture_video: bool = False, run_name: str = "", record_episode=lambda i: i > 0):
    def thunk() -> gym.Env:  # CleanRL's: the env acting in [-1, 1]; videos of the episodes `record_episode` picks
        env = gym_make(env_id, **({"render_mode": "rgb_array"} if capture_video else {}))
        if capture_video:
            env = gym.wrappers.RecordVideo(env, f"videos/{run_name}", episode_trigger=record_episode)
        env = gym.wrappers.RescaleAction(gym.wrappers.RecordEpisodeStatistics(env), np.float32(-1.0), np.float32(1.0))
        env.action_space.seed(seed)
        return env

    return thunk


def gym_make(env_id: str, **kwargs) -> gym.Env:
    if env_id.startswith("dm_control/"):
        load_utils("--env-id dm_control/...").import_dm_control(THIS)
    with warnings.catch_warnings():  # the paper's v4 MuJoCo envs, which gymnasium 1.x calls out of date
        warnings.filterwarnings("ignore", message=".*is out of date", category=DeprecationWarning)
        env = gym.make(env_id, **kwargs)
    space = env.observation_space
    if not (isinstance(space, gym.spaces.Box) and len(space.shape) == 1):
        try:
            env = gym.wrappers.FlattenObservation(env)
        except Exception:  # a space gymnasium cannot flatten (a custom one)
            env = None
        flat = env is not None and isinstance(env.observation_space, gym.spaces.Box)  # a Graph flattens to a Graph
        if not flat or len(env.observation_space.shape) != 1:
            raise ConfigError(f"{env_id} has observations of {space}, which do not flatten into a vector")
    return env


# ALGO LOGIC: Batch Renormalization (Ioffe, 2017), a drop-in for flax's BatchNorm: train mode normalises with the batch
# statistics corrected by r and d toward the running ones (plain BN for `warmup_steps` calls); eval mode, the running.
class BatchRenorm(nn.Module):
    use_running_average: bool | None = None
    momentum: float = 0.99
    epsilon: float = 1e-3
    r_max: float = 3.0
    d_max: float = 5.0
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, use_running_average: bool | None = None) -> jax.Array:
        use_running_average = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        features, reduction_axes, no_grad = (x.shape[-1],), tuple(range(x.ndim - 1)), jax.lax.stop_gradient
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
            r = no_grad(jnp.clip(jnp.sqrt(batch_var + self.epsilon) / running_std, 1.0 / self.r_max, self.r_max))
            d = no_grad(jnp.clip((batch_mean - running_mean.value) / running_std, -self.d_max, self.d_max))
            # sqrt(var_B) with a zero (not infinite) gradient where var_B == 0 (a dead ReLU unit): no NaN update.
            positive = batch_var > 0.0
            batch_std = jnp.where(positive, jnp.sqrt(jnp.where(positive, batch_var, 1.0)), 0.0)
            renormalise = steps.value >= self.warmup_steps
            mean = jnp.where(renormalise, batch_mean - d * batch_std / r, batch_mean)
            var = jnp.where(renormalise, batch_var / r**2, batch_var)
            if not self.is_initializing():
                running_mean.value = self.momentum * running_mean.value + (1.0 - self.momentum) * no_grad(batch_mean)
                running_var.value = self.momentum * running_var.value + (1.0 - self.momentum) * no_grad(batch_var)
                steps.value = steps.value + 1
        return (x - mean) * (scale * jax.lax.rsqrt(var + self.epsilon)) + bias


# ALGO LOGIC: networks
class CriticActivation(nn.Module):  # --critic-activation, as the authors' sbx/sac/utils.py (relu_over_max: one max)
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


class Normalization(nn.Module):  # --bn-mode: BRN, plain BN (BRN with r=1, d=0 and flax's epsilon) or none
    mode: str = "brn"
    momentum: float = 0.99
    warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, x: jax.Array, train: bool) -> jax.Array:
        if self.mode == "none":
            return x
        # Plain BN is flax's BatchNorm, as in the authors' plain-BN runs: epsilon 1e-5, not BRN's 1e-3.
        limits = {"brn": {"r_max": 3.0, "d_max": 5.0}, "bn": {"r_max": 1.0, "d_max": 0.0, "epsilon": 1e-5}}[self.mode]
        return BatchRenorm(not train, momentum=self.momentum, warmup_steps=self.warmup_steps, **limits)(x)


class Critic(nn.Module):  # Q(s, a): concat(s, a) -> norm -> [Dense -> act -> norm] x 2 -> Dense(1)
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
            x = norm()(CriticActivation(self.activation)(nn.Dense(self.width)(x)), train)
        return nn.Dense(1)(x).squeeze(-1)


class CriticEnsemble(Critic):  # `n_critics` independent Critics, in one vectorised call: (n_critics, batch)
    n_critics: int = 2

    @nn.compact
    def __call__(self, obs: jax.Array, actions: jax.Array, train: bool) -> jax.Array:
        vmap = {"variable_axes": {"params": 0, "batch_stats": 0}, "split_rngs": {"params": True}, "in_axes": None}
        ensemble = nn.vmap(Critic, **vmap, out_axes=0, axis_size=self.n_critics)
        critic = ensemble(self.width, self.activation, self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        return critic(obs, actions, train)


class Actor(nn.Module):  # deterministic pi(s): s -> norm -> [Dense -> relu -> norm] x 2 -> Dense(|A|) -> tanh
    action_dim: int
    width: int = 256
    bn_mode: str = "brn"
    bn_momentum: float = 0.99
    bn_warmup_steps: int = 100_000

    @nn.compact
    def __call__(self, obs: jax.Array, train: bool) -> jax.Array:
        norm = lambda: Normalization(self.bn_mode, self.bn_momentum, self.bn_warmup_steps)
        x = norm()(obs, train)
        for _ in range(2):  # relu whatever the critics use: the authors' activation flag changes the critics only
            x = norm()(nn.relu(nn.Dense(self.width)(x)), train)
        return jnp.tanh(nn.Dense(self.action_dim)(x))


def add_noise(actions: jax.Array, key: jax.Array, std: float, noise_clip: float = jnp.inf) -> jax.Array:
    """clip(a + clip(N(0, std^2), -noise_clip, noise_clip), -1, 1) per entry: exploration and target smoothing."""
    noise = jnp.clip(std * jax.random.normal(key, actions.shape), -noise_clip, noise_clip)
    return jnp.clip(actions + noise, -1.0, 1.0)


class BNTrainState(TrainState):
    batch_stats: Any  # the network's running statistics, beside its parameters


class Targets(NamedTuple):  # TD3 baseline only (--tau): Polyak averages of the actor's and critics' parameters
    actor: Any  # None on the authors' schedule: a' from the live actor
    critic: Any


class AgentState(NamedTuple):
    actor: BNTrainState
    critic: BNTrainState
    targets: Targets | None  # None for CrossQ: no target networks


class Metrics(NamedTuple):  # what the update reports; carried between steps so that delayed actor losses stay visible
    qf_loss: jax.Array
    qf_values: jax.Array
    actor_loss: jax.Array
    nonfinite_step: jax.Array  # first env step with a NaN/inf loss, -1 while all is well
    nonfinite_loss: jax.Array  # which loss it was: an index into LOSS_NAMES

    @classmethod
    def initial(cls) -> "Metrics":  # distinct arrays, not one shared zero: the update donates these buffers
        zeros = [jnp.zeros((), jnp.float32) for _ in range(3)]
        return cls(*zeros, jnp.full((), -1, jnp.int32), jnp.zeros((), jnp.int32))


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
    return np.concatenate([obs, action, [reward, terminated], next_obs, policy_obs], dtype=np.float32)


def store_step(buffer: ReplayBuffer, step_data: jax.Array) -> tuple[ReplayBuffer, jax.Array]:
    ends = np.cumsum([buffer.obs.shape[1], buffer.actions.shape[1], 2, buffer.obs.shape[1]])
    obs, action, (reward, terminated), next_obs, policy_obs = jnp.split(step_data, ends)
    return buffer_add(buffer, Transition(obs, action, reward, next_obs, terminated)), policy_obs[None]


# ALGO LOGIC: the CrossQ (TD3 base) update
def create_agent(args: Args, obs_dim: int, action_dim: int, key: jax.Array) -> AgentState:
    norm = {"bn_momentum": args.bn_momentum, "bn_warmup_steps": args.bn_warmup_steps}
    actor = Actor(action_dim, args.actor_width, args.bn_mode if args.actor_bn else "none", **norm)
    critic = CriticEnsemble(args.critic_width, args.critic_activation, args.bn_mode, **norm, n_critics=args.n_critics)
    (actor_key, critic_key), obs, actions = jax.random.split(key), jnp.zeros((1, obs_dim)), jnp.zeros((1, action_dim))
    actor_vars = jax.jit(actor.init, static_argnames="train")(actor_key, obs, train=False)
    critic_vars = jax.jit(critic.init, static_argnames="train")(critic_key, obs, actions, train=False)
    adam = optax.adam(args.learning_rate, b1=args.adam_b1)
    state = lambda module, v: BNTrainState.create(apply_fn=module.apply, tx=adam, **{"batch_stats": {}, **v})
    # TD3 baseline only: the targets start as copies (buffers of their own: the live ones get donated).
    target_actor = actor_vars["params"] if args.target_schedule == "fujimoto" else None
    targets = None if args.tau is None else jax.tree.map(jnp.copy, Targets(target_actor, critic_vars["params"]))
    return AgentState(actor=state(actor, actor_vars), critic=state(critic, critic_vars), targets=targets)


def variables_of(state: BNTrainState) -> dict:
    return {"params": state.params, "batch_stats": state.batch_stats}


def critic_loss(params, agent: AgentState, batch: Transition, key: jax.Array, args: Args):
    """TD loss with target policy smoothing; returns (loss, (new critic batch_stats, mean Q))."""
    critic_vars = {"params": params, "batch_stats": agent.critic.batch_stats}
    # a' from the target actor (Fujimoto's TD3), else the live one (CrossQ; the authors' TD3), with smoothing noise.
    actor_params = agent.actor.params if agent.targets is None or agent.targets.actor is None else agent.targets.actor
    actor_vars = {"params": actor_params, "batch_stats": agent.actor.batch_stats}
    next_actions = agent.actor.apply_fn(actor_vars, batch.next_obs, train=False)
    next_actions = add_noise(next_actions, key, args.policy_noise, args.noise_clip)
    if agent.targets is None:
        # The joint pass: each BRN layer normalises (s, a) and (s', a') together (2B rows): CrossQ's lack of targets.
        obs, actions = jnp.concatenate([batch.obs, batch.next_obs]), jnp.concatenate([batch.actions, next_actions])
        q_all, updates = agent.critic.apply_fn(critic_vars, obs, actions, train=True, mutable=["batch_stats"])
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
    actor_vars = {"params": params, "batch_stats": agent.actor.batch_stats}
    actions, updates = agent.actor.apply_fn(actor_vars, obs, train=True, mutable=["batch_stats"])
    q = agent.critic.apply_fn(variables_of(agent.critic), obs, actions, train=False)  # no statistics update
    return -q.min(axis=0).mean(), updates.get("batch_stats", {})


def make_train_step(args: Args, action_dim: int):
    """The jitted `train_step(agent, metrics, buffer, keys, obs, lead)`: a step's updates, then the next action."""
    critic_grad, actor_grad = (jax.value_and_grad(loss, has_aux=True) for loss in (critic_loss, actor_loss))

    def update(carry: tuple, inputs: tuple, with_actor: bool):  # a critic update, then (with_actor) the actor's
        (agent, metrics), (batch, critic_key) = carry, inputs
        (qf_loss, (batch_stats, qf_values)), grads = critic_grad(agent.critic.params, agent, batch, critic_key, args)
        agent = agent._replace(critic=agent.critic.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
        if agent.targets is not None and args.target_schedule == "authors":  # the authors' TD3: every critic update
            target_critic = optax.incremental_update(agent.critic.params, agent.targets.critic, args.tau)
            agent = agent._replace(targets=agent.targets._replace(critic=target_critic))
        metrics = metrics._replace(qf_loss=qf_loss, qf_values=qf_values)
        if with_actor:
            (loss, batch_stats), grads = actor_grad(agent.actor.params, agent, batch.obs)
            agent = agent._replace(actor=agent.actor.apply_gradients(grads=grads).replace(batch_stats=batch_stats))
            if agent.targets is not None and args.target_schedule == "fujimoto":  # Fujimoto's TD3: after the actor
                live = Targets(agent.actor.params, agent.critic.params)
                agent = agent._replace(targets=optax.incremental_update(live, agent.targets, args.tau))
            metrics = metrics._replace(actor_loss=loss)
        return (agent, metrics), jnp.isfinite(jnp.stack([getattr(metrics, name) for name in LOSS_NAMES]))

    def updates(carry: tuple, inputs: tuple, with_actor: bool):  # one update per batch, in a loop; and which are finite
        return jax.lax.scan(lambda carry, x: update(carry, x, with_actor), carry, inputs)

    def train_step(agent: AgentState, metrics: Metrics, buffer: ReplayBuffer, keys: dict, obs: jax.Array, lead: int):
        # The buffer is only read here (XLA on CPU copies whole columns of a buffer a call both writes and samples).
        next_update_key, step_key = jax.random.split(keys["update"])
        update_keys = jax.vmap(lambda key: jax.random.split(key, 2))(jax.random.split(step_key, args.utd))
        batch_keys, critic_keys = jnp.moveaxis(update_keys, 1, 0)
        batches = jax.vmap(lambda key: buffer_sample(buffer, key, args.batch_size))(batch_keys)
        take = lambda start, n: jax.tree.map(lambda x: x[start : start + n], (batches, critic_keys))
        # After `lead` critic-only updates, each period's first update is the actor's: a loop over whole periods.
        delay, (periods, rest) = args.policy_delay, divmod(args.utd - lead, args.policy_delay)
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
        # The first env step with a NaN/inf loss in any update (later ones may look fine); the host looks when it logs.
        finite = jnp.concatenate(finite).all(axis=0)
        first = (metrics.nonfinite_step < 0) & ~finite.all()
        step = args.learning_starts + agent.critic.step // args.utd
        metrics = metrics._replace(
            nonfinite_step=jnp.where(first, step, metrics.nonfinite_step),
            nonfinite_loss=jnp.where(first, jnp.argmin(finite), metrics.nonfinite_loss),
        )
        # The next action with the key moved past this one's; the barrier keeps its bits those of `explore` (a resume).
        explore_key, noise = jax.random.split(keys["explore"])[0], jnp.float32(args.exploration_noise)
        action = explore(*jax.lax.optimization_barrier((agent.actor, obs, explore_key, noise)))
        return agent, metrics, {"update": next_update_key, "explore": explore_key}, action

    return jax.jit(train_step, static_argnames="lead", donate_argnums=(0, 1))


# ALGO LOGIC: acting and evaluation
@jax.jit
def deterministic_action(actor_state: BNTrainState, obs: jax.Array) -> jax.Array:
    return actor_state.apply_fn(variables_of(actor_state), obs, train=False)  # pi(s), actor in eval mode


@jax.jit
def explore(actor_state: BNTrainState, obs: jax.Array, explore_key: jax.Array, std: float) -> jax.Array:
    """clip(pi(s) + N(0, std^2), -1, 1) with split(explore_key)[1]; train_step moves the key on to split(key)[0]."""
    return add_noise(deterministic_action(actor_state, obs), jax.random.split(explore_key)[1], std)


def evaluate(actor_state: BNTrainState, env: gym.Env, n_episodes: int) -> list[float]:
    returns = []
    for _ in range(n_episodes):
        (obs, _), done, episode_return = env.reset(), False, 0.0
        while not done:
            action = np.asarray(deterministic_action(actor_state, obs[None].astype(np.float32)))[0]
            obs, reward, terminated, truncated, _ = env.step(action)
            episode_return += float(reward)
            done = terminated or truncated
        returns.append(episode_return)
    return returns


@jax.jit
def q_bias_pass(agent: AgentState, obs: jax.Array, actions: jax.Array, key: jax.Array) -> tuple:
    """For --q-bias-freq (eval mode): the critics' mean Q of (obs, actions), pi(obs) with log pi 0, and alpha 0."""
    mean_q = agent.critic.apply_fn(variables_of(agent.critic), obs, actions, train=False).mean(axis=0)
    policy = agent.actor.apply_fn(variables_of(agent.actor), obs, train=False)
    return mean_q, (policy, jnp.zeros(obs.shape[0])), jnp.zeros(())


# Checks that refuse a bad command line or env in one line (exit 2) before any compute is spent
INT32_MAX = 2**31 - 1  # env steps, update counters and buffer positions are int32 on the device
POSITIVE, NOT_NEGATIVE = (0, INT32_MAX, False, True), (0, INT32_MAX, True, True)
FLAG_RANGES = {  # each number flag's (lowest, highest, lowest allowed, highest allowed); a float as its float32
    **dict.fromkeys(["total_timesteps", "batch_size", "critic_width", "actor_width", "utd", "policy_delay"], POSITIVE),
    **dict.fromkeys(["n_critics", "eval_episodes", "log_freq", "q_bias_samples", "q_bias_cutoff"], POSITIVE),
    **dict.fromkeys(["learning_starts", "bn_warmup_steps", "eval_freq", "checkpoint_freq"], NOT_NEGATIVE),
    "buffer_size": POSITIVE,
    "q_bias_freq": NOT_NEGATIVE,
    "seed": (0, 2**32 - 1 - 30_000, True, True),  # np.random.seed's limit, less the eval and Q-bias envs' offsets
    "gamma": (0.0, 1.0, True, True),
    "learning_rate": (0.0, float("inf"), False, False),
    "adam_b1": (0.0, 1.0, True, False),  # 1 would divide Adam's bias correction by zero
    "bn_momentum": (0.0, 1.0, False, False),
    **dict.fromkeys(["policy_noise", "noise_clip", "exploration_noise"], (0.0, float("inf"), True, False)),
    "tau": (0.0, 1.0, False, True),  # when set (None: no target networks)
}


def check_args(args: Args) -> None:
    for name, (low, high, low_ok, high_ok) in FLAG_RANGES.items():
        with np.errstate(over="ignore"):  # 1e300 is inf in float32: refused below
            x = value if isinstance(value := getattr(args, name), int | None) else float(np.float32(value))
        if value is None or ((low < x or (low_ok and x == low)) and (x < high or (high_ok and x == high))):
            continue  # in range, or --tau unset (no target networks)
        if high == INT32_MAX and x > high:
            rule = f"must be at most {INT32_MAX}, an int32 on the device"
        elif low == 0 and high in (INT32_MAX, float("inf")):
            rule = ("must not be negative" if low_ok else "must be positive") + ("" if high_ok else " and finite")
        else:
            ends = [f"{end:g}" if isinstance(end, float) else f"{end}" for end in (low, high)]
            rule = f"must lie in {'[('[not low_ok]}{ends[0]}, {ends[1]}{'])'[not high_ok]}"
        raise ConfigError(f"--{name.replace('_', '-')} {rule} (got {value}{'' if x == value else f', {x} in float32'})")
    for name, choices in [("critic_activation", CRITIC_ACTIVATIONS), ("target_schedule", TARGET_SCHEDULES)]:
        if (value := getattr(args, name)) not in choices:
            raise ConfigError(f"--{name.replace('_', '-')} must be one of {', '.join(choices)} (got {value!r})")
    if args.target_schedule == "authors" and args.tau is None:
        raise ConfigError("--target-schedule authors needs target networks: give --tau (or use the td3 preset)")
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
    try:
        env = gym_make(env_id, **({"render_mode": "rgb_array"} if render else {}))
        if render and env.reset(seed=0) and np.ndim(env.render()) != 3:
            raise RuntimeError("render() gave no RGB image")
    except (gym.error.Error, ImportError) as e:  # an unknown id or module, MuJoCo missing ...
        raise ConfigError(f"cannot make env {env_id!r}: {e}") from None
    except Exception as e:
        if not render:
            raise
        raise ConfigError(
            f"cannot render {env_id} with MUJOCO_GL={os.environ.get('MUJOCO_GL', '(unset)')} ({type(e).__name__}: "
            f"{e}); without a screen: apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri (docs/evaluation.md)"
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
    for flag, module in [("track", "wandb"), ("capture-video", "moviepy")]:
        try:
            __import__(module) if getattr(args, flag.replace("-", "_")) else None
        except ImportError:
            raise ConfigError(f"--{flag} needs {module}: pip install -r requirements-extras.txt") from None
    if args.capture_video and sys.platform.startswith("linux") and not os.environ.get("DISPLAY"):
        os.environ.setdefault("MUJOCO_GL", "egl")  # headless: EGL, set before MuJoCo's import reads it


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
class SummaryWriter:  # what CleanRL's scripts use of torch's SummaryWriter, on the `tensorboard` package alone
    def __init__(self, log_dir: str):
        from tensorboard.summary.writer import event_file_writer  # looked up now: W&B's --track patches it

        self.log_dir, self.events = log_dir, event_file_writer.EventFileWriter(log_dir)
        self.close = self.events.close

    def add_scalar(self, tag: str, value: float, step: int, text: str | None = None) -> None:
        summary = text_pb(tag, text) if text else Summary(value=[Summary.Value(tag=tag, simple_value=float(value))])
        self.events.add_event(Event(wall_time=time.time(), step=step, summary=summary))


def save_model(agent: AgentState, args: Args, path: str) -> None:
    """--save-model: actor, critic and hyperparameters, written whole or not at all (renamed); --eval-model reads it."""
    model = {"actor": variables_of(agent.actor), "critic": variables_of(agent.critic), "args": json.dumps(vars(args))}
    with open(path + ".tmp", "wb") as f:
        f.write(flax.serialization.to_bytes(model))
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    command = f"python {os.path.relpath(__file__)} --eval-model {path}"
    print(f"model saved to {path}; evaluate it with: {command}", flush=True)


def check_finite(step: int, agent: AgentState, metrics: Metrics) -> None:
    if (bad := int(metrics.nonfinite_step)) >= 0:
        loss = LOSS_NAMES[int(metrics.nonfinite_loss)]
        raise FloatingPointError(f"training diverged: losses/{loss} became NaN/inf at env step {bad} (seen at {step})")
    for network in ("actor", "critic"):
        if not bool(all_finite(getattr(agent, network))):
            raise FloatingPointError(f"training diverged: the {network}'s state holds NaN/inf at env step {step}")


def start_logging(args: Args, run_name: str) -> SummaryWriter:
    if args.track:  # before the writer: W&B syncs TensorBoard by patching the event writer it creates
        wandb_run = {"project": args.wandb_project_name, "entity": args.wandb_entity, "name": run_name}
        try:
            __import__("wandb").init(**wandb_run, sync_tensorboard=True, config=vars(args), save_code=True)
        except Exception as e:  # not logged in, no network, a bad entity ...
            reason = f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"
            message = f"--track: W&B could not start a run ({reason}); `wandb login`, or WANDB_MODE=offline"
            raise ConfigError(message) from None
    writer = SummaryWriter(f"runs/{run_name}")
    with open(f"runs/{run_name}/args.json", "w") as f:  # the flags of this run (a resumed one's as resumed)
        json.dump(vars(args), f, indent=2)
    if not args.resume:
        table = "\n".join(f"|{name}|{value}|" for name, value in vars(args).items())
        writer.add_scalar("hyperparameters", 0.0, 0, text=f"|param|value|\n|-|-|\n{table}")
    print(f"run {run_name}: logging to runs/{run_name}", flush=True)
    return writer


# ALGO LOGIC: the training loop
PROGRESS_METRICS = {"qf_loss": ".3f", "qf_values": ".2f", "actor_loss": ".3f"}  # losses/<name>, printed in this format
all_finite = jax.jit(lambda tree: jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]).all())


def train(args: Args) -> dict:
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
    random.seed(args.seed), np.random.seed(args.seed)  # for good measure: the env and JAX are seeded apart
    key, agent_key, explore_key = jax.random.split(jax.random.PRNGKey(args.seed), 3)
    agent = create_agent(args, obs_dim, action_dim, agent_key)
    train_step = make_train_step(args, action_dim)
    env = make_env(args.env_id, args.seed)()
    env = checkpoints.recorder(env) if checkpoints else env  # it keeps each episode's start and actions, for resuming
    env.reset(seed=args.seed)  # seeds the env's generator; each later reset draws from it
    first_of_each_evaluation = lambda i: i > 0 and (i - 1) % args.eval_episodes == 0  # (episode 0: the seeding reset)
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
    if start_step >= args.learning_starts:  # the first action (each learning step then draws the next one)
        next_action = explore(agent.actor, obs[None].astype(np.float32), keys["explore"], args.exploration_noise)
    # SPS counts training alone (no evaluations, Q bias, checkpoints) from its phase's start (random actions are fast).
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
            # One transfer to the device per step, checked as the float32 it is (1e39 is inf). Truncations bootstrap.
            step_data = pack_step(obs, action, reward, terminated, next_obs, policy_obs)
            if not np.isfinite(step_data).all():
                where = f"in float32 (as stored) at env step {global_step}"
                raise FloatingPointError(f"{args.env_id} returned an observation or reward that is NaN/inf {where}")
            buffer, device_obs = store(buffer, step_data)
            obs = policy_obs
            if learning:  # this step's updates, then the next step's action: one compiled program, no host wait
                # The actor follows every policy_delay-th critic update; `lead` is static: no conditional on a GPU
                updates_before = (global_step - args.learning_starts - 1) * args.utd
                lead = min(args.policy_delay - 1 - updates_before % args.policy_delay, args.utd)
                agent, metrics, keys, next_action = train_step(agent, metrics, buffer, keys, device_obs, lead)
            elif global_step == args.learning_starts:
                next_action = explore(agent.actor, device_obs, keys["explore"], args.exploration_noise)
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
            if checkpoints:  # every --checkpoint-freq env steps, at the end, after SIGTERM or Ctrl-C (then it stops)
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


def stop(signum: int, frame: Any) -> None:  # Ctrl-C: the run ends at the end of its step (see STOPPED); twice: at once
    if STOPPED:
        os._exit(128 + signum)
    STOPPED.append(signum)


class Stdout(io.TextIOBase):  # stdout that drops what follows once its reader has gone (`... | head`), not the run
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
    except (ConfigError, FloatingPointError, OSError) as e:  # a bad command line or env (2); diverged, disk full (1)
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2 if isinstance(e, ConfigError) else 1)
    except KeyboardInterrupt:  # Ctrl-C without checkpoints (with them, the run stops at a checkpoint)
        print("\ninterrupted", file=sys.stderr)
        sys.exit(130)
