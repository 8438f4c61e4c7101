"""Behavioural tests of crossq_jax.py: the BRN layer, the joint pass, the update schedule, the CLI."""

import dataclasses
import json

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tyro
from conftest import read_scalars, run_dirs

import crossq_jax as cq

# ---------------------------------------------------------------------------------------------
# The agent: joint pass, stop-gradient, no target network, policy delay
# ---------------------------------------------------------------------------------------------

OBS_DIM, ACTION_DIM = 3, 2


def small_args(**overrides) -> cq.Args:
    defaults = {"critic_width": 16, "actor_width": 16, "batch_size": 8, "learning_starts": 8, "buffer_size": 64}
    return dataclasses.replace(cq.Args(), **{**defaults, **overrides})


def filled_buffer(args, obs, next_obs, n=16, seed=0) -> cq.ReplayBuffer:
    rng = np.random.default_rng(seed)
    buffer = cq.ReplayBuffer.create(args.buffer_size, OBS_DIM, ACTION_DIM)
    for _ in range(n):
        transition = cq.Transition(
            jnp.asarray(obs, jnp.float32),
            jnp.asarray(rng.uniform(-1, 1, ACTION_DIM), jnp.float32),
            jnp.float32(rng.normal()),
            jnp.asarray(next_obs, jnp.float32),
            jnp.float32(0.0),
        )
        buffer = cq.buffer_add(buffer, transition)
    return buffer


def test_one_update_normalises_current_and_next_states_together():
    """The critic's input-layer statistics must come from [s; s'] in ONE train-mode call.

    Every stored transition has the same s and s', so the joint batch's obs columns have mean
    (s + s') / 2 and variance ((s - s') / 2)^2 whatever rows are sampled. Two separate passes
    would give steps == 2, or statistics of s alone (variance 0).
    """
    args = small_args(bn_momentum=0.9)
    s, s_next = np.array([1.0, -2.0, 3.0]), np.array([3.0, 2.0, -1.0])
    buffer = filled_buffer(args, s, s_next)
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    train_step = cq.make_train_step(args, ACTION_DIM)
    agent, _ = train_step(agent, buffer, cq.Metrics.initial(), jax.random.PRNGKey(1), 9)

    input_layer = agent.critic.batch_stats["VmapCritic_0"]["Normalization_0"]["BatchRenorm_0"]
    np.testing.assert_array_equal(input_layer["steps"], [1] * args.n_critics)
    expected_mean = 0.1 * (s + s_next) / 2
    expected_var = 0.9 + 0.1 * ((s - s_next) / 2) ** 2
    for i in range(args.n_critics):
        np.testing.assert_allclose(input_layer["mean"][i, :OBS_DIM], expected_mean, rtol=1e-5)
        np.testing.assert_allclose(input_layer["var"][i, :OBS_DIM], expected_var, rtol=1e-5)


def test_td_target_carries_no_gradient():
    """grad of the critic loss == grad of 0.5 * sum_i mean (q_i - y)^2 with y a frozen constant."""
    args = small_args()
    buffer = filled_buffer(args, [0.5, 1.0, -1.0], [1.0, 0.0, 2.0])
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = cq.buffer_sample(buffer, jax.random.PRNGKey(3), args.batch_size)
    key = jax.random.PRNGKey(4)
    grads = jax.grad(lambda p: cq.critic_loss(p, agent, batch, key, args.gamma)[0])(agent.critic.params)

    next_mean, next_log_std = agent.actor.apply_fn(cq.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = cq.sample_tanh_gaussian(next_mean, next_log_std, key)

    def joint_q(params):
        q_all, _ = agent.critic.apply_fn(
            {"params": params, "batch_stats": agent.critic.batch_stats},
            jnp.concatenate([batch.obs, batch.next_obs]),
            jnp.concatenate([batch.actions, next_actions]),
            train=True,
            mutable=["batch_stats"],
        )
        return jnp.split(q_all, 2, axis=1)

    _, next_q = joint_q(agent.critic.params)
    y = np.asarray(batch.rewards + args.gamma * (next_q.min(0) - 1.0 * next_logp))  # alpha = 1 at start
    frozen = jax.grad(lambda p: 0.5 * ((joint_q(p)[0] - y) ** 2).mean(1).sum())(agent.critic.params)
    leaked = jax.grad(
        lambda p: 0.5 * ((joint_q(p)[0] - batch.rewards - args.gamma * joint_q(p)[1].min(0)) ** 2).mean(1).sum()
    )(agent.critic.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, frozen)
    # The check has teeth: letting the gradient through the target changes it.
    assert not all(jax.tree.leaves(jax.tree.map(lambda a, b: np.allclose(a, b, atol=1e-6), grads, leaked)))


def test_there_is_no_target_network():
    args = small_args(n_critics=2)
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(agent)[0]]
    assert not [p for p in paths if "target" in p.lower()]
    # Exactly n_critics critics' worth of weights: one hidden kernel pair per critic, nothing else.
    kernels = jax.tree.leaves(agent.critic.params)
    n_weights = sum(k.size for k in kernels)
    per_critic = (OBS_DIM + ACTION_DIM) * 2  # input BRN scale and bias
    per_critic += (OBS_DIM + ACTION_DIM) * 16 + 16 + 16 * 2 + 16 * 16 + 16 + 16 * 2 + 16 + 1
    assert n_weights == args.n_critics * per_critic


@pytest.mark.parametrize("utd,policy_delay", [(1, 3), (1, 1), (2, 3)])
def test_actor_changes_exactly_every_policy_delay_critic_updates(utd, policy_delay):
    args = small_args(utd=utd, policy_delay=policy_delay)
    buffer = filled_buffer(args, [0.5, 1.0, -1.0], [1.0, 0.0, 2.0])
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    train_step = cq.make_train_step(args, ACTION_DIM)
    metrics = cq.Metrics.initial()
    key = jax.random.PRNGKey(1)
    actor_updates = 0
    for env_step in range(1, 7):
        before = jax.tree.map(np.asarray, agent.actor.params)
        critic_steps_before = int(agent.critic.step)
        key, step_key = jax.random.split(key)
        agent, metrics = train_step(agent, buffer, metrics, step_key, env_step)
        critic_steps = range(critic_steps_before + 1, int(agent.critic.step) + 1)
        assert len(critic_steps) == utd
        due = sum(k % policy_delay == 0 for k in critic_steps)
        changed = not all(jax.tree.leaves(jax.tree.map(np.array_equal, before, agent.actor.params)))
        assert changed == (due > 0), f"env step {env_step}"
        actor_updates += due
    assert int(agent.actor.step) == actor_updates == 6 * utd // policy_delay


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------

ISSUE_FLAGS = [
    "--env-id",
    "--seed",
    "--total-timesteps",
    "--learning-starts",
    "--gamma",
    "--learning-rate",
    "--buffer-size",
    "--batch-size",
    "--critic-activation",
    "--bn-mode",
    "--bn-momentum",
    "--bn-warmup-steps",
    "--critic-width",
    "--actor-width",
    "--adam-b1",
    "--utd",
    "--policy-delay",
    "--n-critics",
    "--eval-freq",
    "--eval-episodes",
    "--save-model",
    "--exp-name",
    "--track",
    "--wandb-project-name",
    "--wandb-entity",
    "--capture-video",
]


def test_help_lists_every_flag_with_paper_defaults(script_runner):
    result, _ = script_runner("crossq_jax.py", "--help")
    assert result.returncode == 0
    for flag in ISSUE_FLAGS:
        assert flag in result.stdout, flag
    args = tyro.cli(cq.Args, args=[])
    assert (args.critic_width, args.actor_width, args.adam_b1, args.policy_delay, args.utd) == (2048, 256, 0.5, 3, 1)
    assert (args.bn_mode, args.bn_momentum, args.bn_warmup_steps, args.learning_starts) == ("brn", 0.99, 100_000, 5000)
    assert (args.batch_size, args.buffer_size, args.learning_rate, args.gamma, args.n_critics) == (
        256,
        1_000_000,
        1e-3,
        0.99,
        2,
    )


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--batch-size", "0"], "--batch-size must be positive"),
        (["--critic-width", "-1"], "--critic-width must be positive"),
        (["--actor-width", "0"], "--actor-width must be positive"),
        (["--bn-momentum", "1.0"], "--bn-momentum must lie in (0, 1)"),
        (["--bn-momentum", "0"], "--bn-momentum must lie in (0, 1)"),
        (["--learning-starts", "100"], "--learning-starts (100) must be at least --batch-size (256)"),
        (["--buffer-size", "100", "--learning-starts", "5000"], "--buffer-size (100) must be at least --batch-size"),
        (["--learning-rate", "0"], "--learning-rate must be positive and finite"),
        (["--learning-rate", "nan"], "--learning-rate must be positive and finite"),
        (["--gamma", "1.5"], "--gamma must lie in [0, 1]"),
        (["--utd", "0"], "--utd must be positive"),
        (["--policy-delay", "0"], "--policy-delay must be positive"),
    ],
)
def test_nonsensical_hyperparameters_are_rejected(flags, message):
    with pytest.raises(cq.ConfigError) as error:
        cq.check_args(tyro.cli(cq.Args, args=flags))
    assert message in str(error.value)


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--env-id", "CartPole-v1"], "CrossQ needs a continuous Box action space"),
        (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
        (["--batch-size", "0"], "--batch-size must be positive"),
    ],
)
def test_bad_input_exits_with_one_line_before_any_compute(script_runner, flags, message):
    result, cwd = script_runner("crossq_jax.py", *flags)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert lines == [lines[-1]] and lines[0].startswith("error: ") and message in lines[0], result.stderr
    assert "Traceback" not in result.stderr
    assert not run_dirs(cwd)  # nothing was started


# ---------------------------------------------------------------------------------------------
# End to end: a short run that trains, evaluates, logs and saves; determinism; divergence
# ---------------------------------------------------------------------------------------------

TINY = [
    *["--critic-width", "32", "--actor-width", "32", "--batch-size", "32"],
    *["--learning-starts", "200", "--buffer-size", "1000"],
]


def test_smoke_run_on_mujoco_trains_evaluates_logs_and_saves(script_runner):
    result, cwd = script_runner(
        "crossq_jax.py",
        *["--env-id", "Hopper-v4", "--total-timesteps", "600", "--eval-freq", "300", "--eval-episodes", "2"],
        *[*TINY, "--log-freq", "100", "--save-model"],
    )
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(cwd)
    scalars = read_scalars(run_dir)
    for tag in ["charts/episodic_return", "charts/episodic_length", "charts/SPS", "eval/episodic_return"]:
        assert tag in scalars, tag
    for tag in ["losses/qf_loss", "losses/qf_values", "losses/actor_loss", "losses/alpha", "losses/alpha_loss"]:
        assert [step for step, _ in scalars[tag]] == [300, 400, 500, 600], tag
    assert [step for step, _ in scalars["eval/episodic_return"]] == [300, 600]
    assert "eval/episodic_return" in result.stdout

    # The saved model loads as the README shows and acts as the final evaluation did.
    args = cq.Args(**json.loads((run_dir / "args.json").read_text()))
    env = cq.make_env(args.env_id, seed=0)()
    agent = cq.create_agent(args, env.observation_space.shape[0], env.action_space.shape[0], jax.random.PRNGKey(0))
    saved = flax.serialization.from_bytes(
        {"actor": cq.variables_of(agent.actor), "critic": cq.variables_of(agent.critic)},
        (run_dir / "crossq_jax.crossq_model").read_bytes(),
    )
    actor = agent.actor.replace(**saved["actor"])
    # The BRN step counters are saved: 400 critic updates (steps 201..600), 400 // 3 actor updates.
    for network, updates in [("critic", 400), ("actor", 400 // 3)]:
        stats = flax.traverse_util.flatten_dict(saved[network]["batch_stats"])
        counters = [np.asarray(v) for k, v in stats.items() if k[-1] == "steps"]
        assert counters and all((c == updates).all() for c in counters), network
    returns = cq.evaluate(actor, env, n_episodes=1)
    assert np.isfinite(returns[0])


def test_same_seed_gives_identical_runs(finished_run):
    flags = ["--env-id", "Pendulum-v1", "--total-timesteps", "600", "--eval-freq", "0", "--eval-episodes", "1"]
    flags += [*TINY, "--log-freq", "100", "--seed", "7"]
    logs = [finished_run("crossq_jax.py", *flags) for _ in range(2)]
    for tag in ["charts/episodic_return", "losses/qf_loss", "losses/actor_loss", "eval/episodic_return"]:
        assert logs[0][tag] == logs[1][tag], tag


def test_an_env_that_returns_nan_stops_the_run_at_that_step(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = small_args(env_id="NaNRewardAfter300-v0", total_timesteps=2000, learning_starts=100, eval_freq=0)
    with pytest.raises(FloatingPointError, match=r"returned a NaN/inf observation or reward at env step 300$"):
        cq.train(args)


def test_divergence_stops_training_and_names_the_loss_and_step(tmp_path, monkeypatch):
    """Rewards of 1e30 are finite, but the squared TD error overflows: the loss becomes inf."""
    monkeypatch.chdir(tmp_path)
    args = small_args(env_id="HugeRewardAfter300-v0", total_timesteps=2000, learning_starts=100, log_freq=50)
    args = dataclasses.replace(args, eval_freq=0, eval_episodes=1)
    with pytest.raises(FloatingPointError, match=r"losses/qf_loss became NaN/inf at env step (\d+)") as error:
        cq.train(args)
    step = int(error.value.args[0].split("env step ")[1].split()[0])
    assert 300 <= step <= 400  # the huge reward enters at 300 and is sampled soon after
    assert step < 2000  # it stopped rather than running on


@pytest.mark.slow
def test_crossq_learns_pendulum(finished_run):
    """SAC-based CrossQ, 256-wide critic: deterministic eval return >= -250 within 5000 env steps."""
    scalars = finished_run(
        "crossq_jax.py",
        *["--env-id", "Pendulum-v1", "--critic-width", "256", "--learning-starts", "1000", "--seed", "1"],
        *["--total-timesteps", "5000", "--eval-freq", "1000", "--eval-episodes", "10"],
    )
    evals = dict(scalars["eval/episodic_return"])
    assert max(evals.values()) >= -250, evals
