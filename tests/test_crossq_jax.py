"""Behavioural tests of crossq_jax.py: the joint pass, no target network, the update schedule, the defaults
and the flag checks. What every script does alike (whole runs included) is in test_scripts.py, the BRN layer
in test_batch_renorm.py."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTION_DIM, OBS_DIM, filled_buffer, learning_steps, small_args, train_steps

import crossq_jax as cq

# ---------------------------------------------------------------------------------------------
# The agent: joint pass, stop-gradient, no target network, policy delay
# ---------------------------------------------------------------------------------------------


def test_one_update_normalises_current_and_next_states_together():
    """The critic's input-layer statistics must come from [s; s'] in ONE train-mode call.

    Every stored transition has the same s and s', so the joint batch's obs columns have mean
    (s + s') / 2 and variance ((s - s') / 2)^2 whatever rows are sampled. Two separate passes
    would give steps == 2, or statistics of s alone (variance 0).
    """
    args = small_args(cq, bn_momentum=0.9)
    s, s_next = np.array([1.0, -2.0, 3.0]), np.array([3.0, 2.0, -1.0])
    buffer = filled_buffer(cq, args, obs=s, next_obs=s_next)
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    agent, _ = train_steps(cq, args, agent, buffer)

    input_layer = agent.critic.batch_stats["VmapCritic_0"]["Normalization_0"]["BatchRenorm_0"]
    np.testing.assert_array_equal(input_layer["steps"], [1] * args.n_critics)
    expected_mean = 0.1 * (s + s_next) / 2
    expected_var = 0.9 + 0.1 * ((s - s_next) / 2) ** 2
    for i in range(args.n_critics):
        np.testing.assert_allclose(input_layer["mean"][i, :OBS_DIM], expected_mean, rtol=1e-5)
        np.testing.assert_allclose(input_layer["var"][i, :OBS_DIM], expected_var, rtol=1e-5)


def test_td_target_carries_no_gradient():
    """grad of the critic loss == grad of 0.5 * sum_i mean (q_i - y)^2 with y a frozen constant."""
    args = small_args(cq)
    buffer = filled_buffer(cq, args, obs=[0.5, 1.0, -1.0], next_obs=[1.0, 0.0, 2.0])
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = cq.buffer_sample(buffer, jax.random.PRNGKey(3), args.batch_size)
    key = jax.random.PRNGKey(4)
    grads = jax.grad(lambda p: cq.critic_loss(p, agent, batch, key, args)[0])(agent.critic.params)

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
    args = small_args(cq, n_critics=2)
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
    args = small_args(cq, utd=utd, policy_delay=policy_delay)
    buffer = filled_buffer(cq, args, obs=[0.5, 1.0, -1.0], next_obs=[1.0, 0.0, 2.0])
    agent = cq.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    actor_updates, before, critic_steps_before = 0, jax.tree.map(np.asarray, agent.actor.params), 0
    steps = learning_steps(cq, args, agent, buffer, 6)
    for env_step, (agent, _) in enumerate(steps, start=1):
        critic_steps = range(critic_steps_before + 1, int(agent.critic.step) + 1)
        assert len(critic_steps) == utd
        due = sum(k % policy_delay == 0 for k in critic_steps)
        changed = not all(jax.tree.leaves(jax.tree.map(np.array_equal, before, agent.actor.params)))
        assert changed == (due > 0), f"env step {env_step}"
        actor_updates += due
        before, critic_steps_before = jax.tree.map(np.asarray, agent.actor.params), int(agent.critic.step)
    assert int(agent.actor.step) == actor_updates == 6 * utd // policy_delay


# ---------------------------------------------------------------------------------------------
# The command line
# ---------------------------------------------------------------------------------------------


def test_the_defaults_are_the_crossq_column_of_table_1():
    args = cq.parse_args([])
    assert (args.critic_width, args.actor_width, args.adam_b1, args.policy_delay, args.utd) == (2048, 256, 0.5, 3, 1)
    assert (args.bn_mode, args.bn_momentum, args.bn_warmup_steps, args.learning_starts) == ("brn", 0.99, 100_000, 5000)
    assert (args.batch_size, args.buffer_size, args.learning_rate, args.gamma, args.n_critics) == (
        256,
        1_000_000,
        1e-3,
        0.99,
        2,
    )
