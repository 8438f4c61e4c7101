"""Behavioural tests of sac_jax.py: Polyak targets, REDQ's subset min, DroQ's dropout, UTD, presets, CLI."""

import dataclasses
import json

import conftest
import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTION_DIM, OBS_DIM, filled_buffer, learning_steps, read_scalars, run_dirs, small_args, train_steps

import crossq_utils
import sac_jax as sac


def trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


# ---------------------------------------------------------------------------------------------
# Target networks: Polyak averaging after every critic update
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0.005, 0.3, 1.0])
def test_polyak_update_is_the_convex_combination(tau):
    rng = np.random.default_rng(0)
    online = {"a": rng.normal(size=(3, 4)), "b": {"c": rng.normal(size=5)}}
    target = jax.tree.map(lambda x: rng.normal(size=x.shape), online)
    updated = sac.polyak_update(jax.tree.map(jnp.asarray, online), jax.tree.map(jnp.asarray, target), tau)
    for new, o, t in zip(jax.tree.leaves(updated), jax.tree.leaves(online), jax.tree.leaves(target), strict=True):
        np.testing.assert_allclose(new, tau * o + (1 - tau) * t, rtol=1e-6, atol=1e-6)
    if tau == 1.0:
        assert trees_equal(updated, jax.tree.map(jnp.asarray, online))


def test_target_critics_start_as_a_copy_and_trail_each_update_by_tau():
    tau = 0.3
    args = small_args(sac, tau=tau)
    buffer = filled_buffer(sac, args, terminal_every=5)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert trees_equal(agent.critic.params, agent.critic.target_params)
    target_before = jax.tree.map(np.asarray, agent.critic.target_params)
    agent, _ = train_steps(sac, args, agent, buffer)
    expected = jax.tree.map(lambda p, t: tau * np.asarray(p) + (1 - tau) * t, agent.critic.params, target_before)
    jax.tree.map(
        lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), agent.critic.target_params, expected
    )
    assert not trees_equal(agent.critic.target_params, agent.critic.params)  # tau < 1: the target lags


def test_with_tau_one_the_target_equals_the_critic_after_the_last_of_several_updates():
    args = small_args(sac, tau=1.0, utd=3)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    agent, _ = train_steps(sac, args, agent, filled_buffer(sac, args, terminal_every=5))
    assert int(agent.critic.step) == 3
    assert trees_equal(agent.critic.target_params, agent.critic.params)


def test_td_target_bootstraps_from_the_target_critics_on_next_states():
    """Zero the target critics' output layer: y must become r - gamma * (1 - done) * alpha * log pi(a'|s')."""
    args = small_args(sac)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    zeroed = flax.traverse_util.flatten_dict(agent.critic.target_params)
    zeroed = {k: (jnp.zeros_like(v) if "Dense_2" in k else v) for k, v in zeroed.items()}
    agent = agent._replace(critic=agent.critic.replace(target_params=flax.traverse_util.unflatten_dict(zeroed)))
    batch = sac.buffer_sample(filled_buffer(sac, args, terminal_every=5), jax.random.PRNGKey(2), args.batch_size)
    key = jax.random.PRNGKey(3)
    y = sac.td_target(agent, batch, key, args.gamma, args.target_subset_size)

    action_key, _ = jax.random.split(key)
    mean, log_std = agent.actor.apply_fn(sac.variables_of(agent.actor), batch.next_obs)
    _, next_logp = sac.sample_tanh_gaussian(mean, log_std, action_key)
    expected = batch.rewards - args.gamma * (1 - batch.terminations) * 1.0 * next_logp  # alpha = 1 at start
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
    # The online critics (not zeroed) would give another target: the check has teeth.
    online_q = agent.critic.apply_fn({"params": agent.critic.params}, batch.next_obs, jnp.tanh(mean), train=False)
    assert np.abs(np.asarray(online_q)).max() > 1e-3


# ---------------------------------------------------------------------------------------------
# REDQ: the target is the min over a random subset of M target critics
# ---------------------------------------------------------------------------------------------


def random_batch(n: int, seed: int) -> sac.Transition:
    """`n` random transitions, every third one terminal."""
    rng = np.random.default_rng(seed)
    column = lambda *shape: jnp.asarray(rng.normal(size=(n, *shape)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, (n, ACTION_DIM)), jnp.float32)
    terminations = jnp.asarray(np.arange(n) % 3 == 0, jnp.float32)
    return sac.Transition(column(OBS_DIM), actions, column(), column(OBS_DIM), terminations)


def target_critics_q(agent, batch, key):
    """What td_target(agent, batch, key, ...) draws, recomputed with its key split: (the key of its target subset,
    every target critic's Q(s', a') with its dropout key, (n_critics, B), and alpha * log pi(a'|s'))."""
    action_key, target_key = jax.random.split(key)
    subset_key, dropout_key = jax.random.split(target_key)
    mean, log_std = agent.actor.apply_fn(sac.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = sac.sample_tanh_gaussian(mean, log_std, action_key)
    variables = {"params": agent.critic.target_params, "batch_stats": agent.critic.batch_stats}
    q_all = sac.q_values(agent.critic.apply_fn, variables, batch.next_obs, next_actions, dropout_key)
    alpha = float(jnp.exp(agent.log_alpha.params["log_alpha"]))
    return subset_key, np.asarray(q_all, np.float64), alpha * np.asarray(next_logp, np.float64)


def np_td_target(batch, next_q, alpha_logp, gamma):
    rewards, terminations = np.asarray(batch.rewards, np.float64), np.asarray(batch.terminations, np.float64)
    return rewards + gamma * (1 - terminations) * (next_q - alpha_logp)


def test_redq_target_subset_is_m_distinct_critics_drawn_by_the_key():
    args = small_args(sac, "redq")
    assert (args.n_critics, args.target_subset_size) == (10, 2)
    subsets = set()
    for seed in range(30):
        key = jax.random.PRNGKey(seed)
        subset = tuple(int(i) for i in sac.target_subset(key, args.n_critics, args.target_subset_size))
        assert len(subset) == len(set(subset)) == 2 and all(0 <= i < 10 for i in subset)
        assert tuple(int(i) for i in sac.target_subset(key, args.n_critics, args.target_subset_size)) == subset
        subsets.add(frozenset(subset))
    assert len(subsets) >= 10  # the subset changes with the key


def test_redq_target_is_the_min_over_a_random_subset_of_target_critics():
    args = small_args(sac, "redq")
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = random_batch(32, seed=1)
    subsets, differs_from_full_min = set(), 0
    for seed in range(30):
        key = jax.random.PRNGKey(seed)
        y = np.asarray(sac.td_target(agent, batch, key, args.gamma, args.target_subset_size), np.float64)
        subset_key, q_all, alpha_logp = target_critics_q(agent, batch, key)
        assert q_all.shape == (10, 32)
        subset = [int(i) for i in sac.target_subset(subset_key, args.n_critics, args.target_subset_size)]
        expected = np_td_target(batch, q_all[subset].min(0), alpha_logp, args.gamma)  # over the subset only
        np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-5)
        differs_from_full_min += not np.allclose(y, np_td_target(batch, q_all.min(0), alpha_logp, args.gamma))
        subsets.add(frozenset(subset))
        again = sac.td_target(agent, batch, key, args.gamma, args.target_subset_size)
        assert np.array_equal(again, y)  # the key decides
    assert len(subsets) >= 10  # the subset changes with the key
    assert differs_from_full_min >= 10  # not the min over all ten


def test_sac_target_takes_the_min_over_both_target_critics():
    args = small_args(sac)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert sorted(int(i) for i in sac.target_subset(jax.random.PRNGKey(5), 2, args.target_subset_size)) == [0, 1]
    batch = random_batch(16, seed=2)
    key = jax.random.PRNGKey(5)
    y = sac.td_target(agent, batch, key, args.gamma, args.target_subset_size)
    _, q_all, alpha_logp = target_critics_q(agent, batch, key)
    np.testing.assert_allclose(y, np_td_target(batch, q_all.min(0), alpha_logp, args.gamma), rtol=1e-5, atol=1e-6)
    # The check has teeth: the max (or the mean) of the two gives another target.
    for other in (q_all.max(0), q_all.mean(0)):
        assert not np.allclose(y, np_td_target(batch, other, alpha_logp, args.gamma), rtol=1e-5, atol=1e-6)


def test_redq_actor_loss_uses_the_mean_and_sac_the_min_over_all_critics():
    for preset, reduce in [("sac", np.min), ("redq", np.mean)]:
        args = small_args(sac, preset)
        agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
        obs = jnp.asarray(np.random.default_rng(0).normal(size=(8, OBS_DIM)), jnp.float32)
        key = jax.random.PRNGKey(3)
        loss, _ = sac.actor_loss(agent.actor.params, agent, obs, key, args.actor_q_reduce)
        sample_key, _ = jax.random.split(key)
        actions, logp = sac.sample_tanh_gaussian(*agent.actor.apply_fn(sac.variables_of(agent.actor), obs), sample_key)
        q = np.asarray(agent.critic.apply_fn(sac.variables_of(agent.critic), obs, actions, train=False))
        np.testing.assert_allclose(loss, np.mean(1.0 * logp - reduce(q, axis=0)), rtol=1e-5, err_msg=preset)


# ---------------------------------------------------------------------------------------------
# DroQ: Dropout + LayerNorm critics, dropout active in the target, critic-loss and actor-loss passes
# ---------------------------------------------------------------------------------------------


def droq_setup(preset: str):
    args = small_args(sac, preset, critic_width=64, batch_size=32)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = sac.buffer_sample(filled_buffer(sac, args, terminal_every=5), jax.random.PRNGKey(1), args.batch_size)
    return args, agent, batch


@pytest.mark.parametrize("preset,layer_norms", [("droq", 2), ("sac", 0)])
def test_droq_critic_has_a_layer_norm_per_hidden_layer_and_sac_critic_has_none(preset, layer_norms):
    _, agent, _ = droq_setup(preset)
    names = {k[1] for k in flax.traverse_util.flatten_dict(agent.critic.params)}
    assert sum(name.startswith("LayerNorm") for name in names) == layer_norms


@pytest.mark.parametrize("preset,dropout_active", [("droq", True), ("sac", False)])
def test_droq_dropout_is_active_in_target_and_critic_loss_passes(preset, dropout_active):
    args, agent, batch = droq_setup(preset)
    key = jax.random.PRNGKey(2)
    target = sac.td_target(agent, batch, key, args.gamma, args.target_subset_size)
    # Target pass: the subset is all (2 of 2), so only dropout masks can make two dropout keys differ.
    subset_key, q_all, alpha_logp = target_critics_q(agent, batch, key)
    assert [int(i) for i in sac.target_subset(subset_key, args.n_critics, args.target_subset_size)] == [0, 1]
    np.testing.assert_allclose(target, np_td_target(batch, q_all.min(0), alpha_logp, args.gamma), rtol=1e-5, atol=1e-5)
    variables = {"params": agent.critic.target_params, "batch_stats": agent.critic.batch_stats}
    next_actions = jnp.zeros_like(batch.actions)
    targets = [
        sac.q_values(agent.critic.target_apply_fn, variables, batch.next_obs, next_actions, jax.random.PRNGKey(k))
        for k in (3, 4)
    ]
    assert (not np.array_equal(*targets)) == dropout_active
    # td_target's own pass has dropout on: without it (eval mode), the same target critics give another y.
    mean, log_std = agent.actor.apply_fn(sac.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, _ = sac.sample_tanh_gaussian(mean, log_std, jax.random.split(key)[0])
    no_dropout = np.asarray(agent.critic.apply_fn(variables, batch.next_obs, next_actions, train=False), np.float64)
    expected_without = np_td_target(batch, no_dropout.min(0), alpha_logp, args.gamma)
    assert (not np.allclose(target, expected_without, rtol=1e-5, atol=1e-6)) == dropout_active
    # Critic-loss pass: with the target given, the key is its dropout key alone.
    losses = [
        sac.critic_loss(agent.critic.params, agent, batch, target, jax.random.PRNGKey(k), args)[0] for k in (3, 4)
    ]
    assert (not np.array_equal(*losses)) == dropout_active


@pytest.mark.parametrize("preset,dropout_active", [("droq", True), ("sac", False)])
def test_droq_dropout_is_active_in_the_actor_loss_pass(preset, dropout_active):
    args, agent, batch = droq_setup(preset)
    key = jax.random.PRNGKey(5)
    loss, _ = sac.actor_loss(agent.actor.params, agent, batch.obs, key, args.actor_q_reduce)
    sample_key, dropout_key = jax.random.split(key)
    actions, logp = sac.sample_tanh_gaussian(
        *agent.actor.apply_fn(sac.variables_of(agent.actor), batch.obs), sample_key
    )
    reduce = jnp.mean if args.actor_q_reduce == "mean" else jnp.min

    def loss_with(train: bool):
        variables = sac.variables_of(agent.critic)
        q = agent.critic.apply_fn(variables, batch.obs, actions, train=train, rngs={"dropout": dropout_key})
        return float(jnp.mean(logp - reduce(q, axis=0)))

    np.testing.assert_allclose(loss, loss_with(train=True), rtol=1e-5)
    assert (not np.isclose(loss, loss_with(train=False), rtol=1e-6, atol=0)) == dropout_active


# ---------------------------------------------------------------------------------------------
# The update schedule: UTD critic updates and one actor update per env step, in one jitted scan
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preset,utd", [("sac", 1), ("redq", 20), ("droq", 20)])
def test_each_env_step_runs_utd_critic_updates_and_one_actor_update(preset, utd):
    args = small_args(sac, preset)
    assert (args.utd, args.policy_delay) == (utd, utd)
    buffer = filled_buffer(sac, args, terminal_every=5)
    agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    actor_before = jax.tree.map(np.asarray, agent.actor.params)
    steps = learning_steps(sac, args, agent, buffer, 3)
    for env_step, (agent, metrics) in enumerate(steps, start=1):  # noqa: B007 (metrics: after the loop)
        assert int(agent.critic.step) == env_step * utd
        assert int(agent.actor.step) == int(agent.log_alpha.step) == env_step
        assert not trees_equal(actor_before, agent.actor.params)
        actor_before = jax.tree.map(np.asarray, agent.actor.params)
    assert int(metrics.nonfinite_step) == -1


def test_the_utd_updates_are_one_scan_not_an_unrolled_python_loop():
    """REDQ's and DroQ's step: 19 critic updates in one scan, then the one the actor follows."""

    def traced(utd: int) -> str:
        args = small_args(sac, utd=utd, policy_delay=utd)
        agent = sac.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
        keys = {"update": jax.random.PRNGKey(1), "explore": jax.random.PRNGKey(2)}
        inputs = (
            agent,
            sac.Metrics.initial(),
            filled_buffer(sac, args, terminal_every=5),
            keys,
            np.zeros((1, OBS_DIM), np.float32),
        )
        lead = conftest.lead_of(args, args.learning_starts + 1)  # the first learning step's, as train() computes it
        assert lead == utd - 1
        return str(sac.make_train_step(args, ACTION_DIM).trace(*inputs, lead).jaxpr)

    text_20, text_1 = traced(20), traced(1)
    assert "scan" in text_20 and "length=19" in text_20
    # A critic-only scan beside the one critic-and-actor update: 20 unrolled updates would trace ~20 times.
    assert len(text_20) < 2 * len(text_1)


# ---------------------------------------------------------------------------------------------
# Presets and the command line
# ---------------------------------------------------------------------------------------------

TABLE_1 = ["gamma", "learning_rate", "buffer_size", "batch_size", "critic_activation", "layer_norm", "dropout_rate"]
TABLE_1 += ["critic_width", "tau", "adam_b1", "utd", "policy_delay", "n_critics", "target_subset_size"]


@pytest.mark.parametrize(
    "preset,column",
    [
        ("sac", [0.99, 1e-3, 1_000_000, 256, "relu", False, 0.0, 256, 0.005, 0.9, 1, 1, 2, 2]),
        ("redq", [0.99, 1e-3, 1_000_000, 256, "relu", False, 0.0, 256, 0.005, 0.9, 20, 20, 10, 2]),
        ("droq", [0.99, 1e-3, 1_000_000, 256, "relu", True, 0.01, 256, 0.005, 0.9, 20, 20, 2, 2]),
    ],
)
def test_presets_are_table_1_columns_and_every_flag_overrides_them(preset, column):
    args = sac.parse_args([preset])
    assert [getattr(args, name) for name in TABLE_1] == column
    assert args.actor_q_reduce == ("min" if preset == "sac" else "mean")
    assert args.exp_name == "sac_jax" + ("" if preset == "sac" else f"_{preset}")
    overridden = sac.parse_args([preset, "--env-id", "Walker2d-v4", "--utd", "5", "--dropout-rate", "0.1"])
    assert (overridden.env_id, overridden.utd, overridden.dropout_rate) == ("Walker2d-v4", 5, 0.1)
    assert overridden.n_critics == args.n_critics  # the rest stays the preset's


def test_no_preset_word_is_plain_sac():
    assert sac.parse_args([]) == sac.Args() == sac.PRESETS["sac"][1]
    assert sac.parse_args(["--env-id", "Ant-v4"]) == dataclasses.replace(sac.Args(), env_id="Ant-v4")


def test_the_help_of_a_preset_shows_its_values(script_runner):
    result, _ = script_runner("sac_jax.py", "--help")
    assert result.returncode == 0, result.stderr
    assert "(default: 20)" not in result.stdout and "REDQ: 10 critics" not in result.stdout
    result, _ = script_runner("sac_jax.py", "redq", "--help")
    assert result.returncode == 0, result.stderr
    assert "REDQ: 10 critics" in result.stdout  # the preset's description (sac.PRESETS["redq"][0])
    assert "(default: 20)" in result.stdout and "(default: mean)" in result.stdout


# ---------------------------------------------------------------------------------------------
# Divergence at UTD 20
# ---------------------------------------------------------------------------------------------


def test_divergence_in_any_of_a_steps_updates_spares_the_last_checkpoint(tmp_path, monkeypatch):
    """Rewards of 1e30 are finite, but the squared TD error overflows: the loss becomes inf. At UTD 20
    this may happen in any of a step's updates: it leaves Adam's second moment inf and the parameters
    finite, so only a check of every update's losses keeps that state out of the checkpoint."""
    monkeypatch.chdir(tmp_path)
    args = small_args(sac, "redq", env_id="HugeRewardAfter100-v0", total_timesteps=2000, learning_starts=30)
    args = dataclasses.replace(args, log_freq=50, eval_freq=0, eval_episodes=1, checkpoint_freq=1)
    with pytest.raises(FloatingPointError, match=r"losses/qf_loss became NaN/inf at env step (\d+)") as error:
        sac.train(args)
    step = int(error.value.args[0].split("env step ")[1].split()[0])
    assert 100 <= step <= 200  # the huge reward enters at 100 and is sampled soon after
    arrays, host_state = crossq_utils.read_checkpoint(sac, str(run_dirs(tmp_path)[0]))
    assert host_state["global_step"] == step - 1
    agent = {path: value for path, value in arrays.items() if path.startswith("agent/") and value.dtype.kind == "f"}
    assert any("/opt_state/" in path for path in agent)
    assert [path for path, value in agent.items() if not np.isfinite(value).all()] == []


# ---------------------------------------------------------------------------------------------
# Checkpoints: presets and --resume, exact resume of the high-UTD presets
# ---------------------------------------------------------------------------------------------


def fake_checkpoint(tmp_path, args: sac.Args) -> str:
    return conftest.fake_checkpoint(sac, tmp_path / crossq_utils.CHECKPOINT_FILE, args)


def test_resume_without_a_preset_word_continues_the_run_with_its_own_preset(tmp_path):
    redq = sac.parse_args(["redq", "--env-id", "Walker2d-v4", "--utd", "10"])
    path = fake_checkpoint(tmp_path, redq)
    assert sac.parse_args(["--resume", str(tmp_path)]) == dataclasses.replace(redq, resume=str(tmp_path))
    resumed = sac.parse_args(["--resume", path, "--total-timesteps", "5000000"])
    assert resumed == dataclasses.replace(redq, resume=path, total_timesteps=5_000_000)
    # Retyping the command line that started the run, plus --resume, works too.
    again = sac.parse_args(["redq", "--env-id", "Walker2d-v4", "--utd", "10", "--resume", path])
    assert again == dataclasses.replace(redq, resume=path)


KEEPS = ": a resumed run keeps its hyperparameters"


@pytest.mark.parametrize(
    "started,resumed,message",
    [  # the word stands for its values, as on the command line that started the run
        (["redq"], ["sac"], "--utd is 20 in the checkpoint, not 1" + KEEPS),
        (["redq"], ["droq"], "--layer-norm is False in the checkpoint, not True" + KEEPS),
        (["sac"], ["redq"], "--utd is 1 in the checkpoint, not 20" + KEEPS),
        (["redq", "--utd", "10"], ["redq"], "--utd is 10 in the checkpoint, not 20" + KEEPS),
    ],
)
def test_a_preset_word_that_contradicts_the_checkpoint_is_refused(tmp_path, started, resumed, message):
    path = fake_checkpoint(tmp_path, sac.parse_args(started))
    with pytest.raises(sac.ConfigError, match=f"^{message}$"):
        sac.parse_args([*resumed, "--resume", path])


def test_a_changed_hyperparameter_is_refused_by_name_when_parsed_and_when_training_starts(tmp_path, monkeypatch):
    redq = sac.parse_args(["redq", "--env-id", "Pendulum-v1"])
    path = fake_checkpoint(tmp_path, redq)
    with pytest.raises(sac.ConfigError, match="^--utd is 20 in the checkpoint, not 5" + KEEPS):
        sac.parse_args(["redq", "--utd", "5", "--resume", path])
    # Args not from the command line: train() refuses them before any compute, and leaves no run behind.
    monkeypatch.chdir(tmp_path)
    with pytest.raises(sac.ConfigError, match="^--utd is 20 in the checkpoint, not 5" + KEEPS):
        sac.train(dataclasses.replace(redq, utd=5, resume=path))
    assert run_dirs(tmp_path) == []
    with pytest.raises(sac.ConfigError, match="^--utd is 20 in the checkpoint, not 5" + KEEPS):
        crossq_utils.check_resume(
            sac, dataclasses.replace(redq, utd=5), {"args": dataclasses.asdict(redq), "global_step": 0}
        )
    # What may change on resume does not trip it.
    crossq_utils.check_resume(
        sac,
        dataclasses.replace(redq, total_timesteps=2_000_000, log_freq=7, resume=path),
        {"args": dataclasses.asdict(redq), "global_step": 0},
    )


def test_a_contradicting_preset_word_exits_with_one_line(script_runner, tmp_path):
    path = fake_checkpoint(tmp_path, sac.parse_args(["redq"]))
    result, _ = script_runner("sac_jax.py", "droq", "--resume", path)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == ["error: --layer-norm is False in the checkpoint, not True" + KEEPS], result.stderr


@pytest.mark.parametrize("preset", ["redq", "droq"])
def test_a_resumed_high_utd_run_matches_the_uninterrupted_run(tmp_path, monkeypatch, preset):
    """Resumed mid-episode: REDQ's target subsets and DroQ's dropout masks come from the saved keys,
    the target critics from the checkpoint. The first run stops at 210 (its checkpoint), then goes on to 240."""
    flags = [preset, "--env-id", "Pendulum-v1", "--seed", "2", "--learning-starts", "150", "--batch-size", "16"]
    flags += ["--buffer-size", "1000", "--critic-width", "16", "--actor-width", "16", "--log-freq", "15"]
    flags += ["--eval-freq", "0", "--eval-episodes", "1"]
    scalars = []
    for total, checkpoint_freq in [("240", "0"), ("210", "105")]:
        (tmp_path / total).mkdir()
        monkeypatch.chdir(tmp_path / total)
        sac.train(sac.parse_args([*flags, "--total-timesteps", total, "--checkpoint-freq", checkpoint_freq]))
        (run_dir,) = run_dirs(tmp_path / total)
        scalars.append(read_scalars(run_dir))
    arrays, host_state = crossq_utils.read_checkpoint(sac, str(run_dir))
    assert host_state["global_step"] == 210
    assert any(path.startswith("agent/critic/target_params/") for path in arrays)
    resumed = sac.parse_args(["--resume", str(run_dir), "--total-timesteps", "240"])
    started = sac.parse_args([*flags, "--total-timesteps", "240", "--checkpoint-freq", "105"])
    assert resumed == dataclasses.replace(started, resume=str(run_dir))  # the preset, from the checkpoint alone
    sac.train(resumed)
    expected, after_resume = scalars[0], read_scalars(run_dir)
    assert [step for step, _ in after_resume["losses/qf_loss"]][-2:] == [225, 240]
    for tag in ["charts/episodic_return", "losses/qf_loss", "losses/qf_values", "losses/actor_loss", "losses/alpha"]:
        assert after_resume[tag] == expected[tag], tag


def test_a_checkpoint_saved_before_target_bn_stats_existed_resumes_with_the_live_statistics(tmp_path):
    """Runs saved before --target-bn-stats was added used the live statistics: their checkpoints still resume."""
    path = fake_checkpoint(tmp_path, sac.parse_args(["redq"]))
    arrays, host_state = crossq_utils.read_checkpoint(sac, path)
    del host_state["args"]["target_bn_stats"]
    crossq_utils.write_checkpoint(sac, path, arrays, host_state)
    with np.load(path) as saved:  # the checkpoint as such a run wrote it: without the flag
        assert "target_bn_stats" not in json.loads(saved["__host_state__"].tobytes())["args"]
    args = sac.parse_args(["--resume", path])
    assert args.target_bn_stats == "live"
    crossq_utils.check_resume(sac, args, crossq_utils.read_checkpoint(sac, path, with_arrays=False)[1])  # unchanged
