"""Tests of crossq_td3_jax.py: CrossQ on a TD3 base, and the TD3 baseline preset."""

import dataclasses
import json
import math

import conftest
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import learning_steps, read_scalars, run_dirs, run_script, small_args

import crossq_td3_jax as m
import crossq_utils

SCRIPT = "crossq_td3_jax.py"
OBS_DIM, ACTION_DIM = 5, 3
TINY_RUN = [
    "--total-timesteps", "300", "--learning-starts", "256", "--batch-size", "32", "--critic-width", "32",
    "--buffer-size", "1000", "--eval-episodes", "1", "--log-freq", "100",
]  # fmt: skip


def random_batch(key: jax.Array, n: int) -> m.Transition:
    """Observations far from the BRN layers' initial running statistics, so train and eval mode differ."""
    k = jax.random.split(key, 4)
    return m.Transition(
        obs=2.0 + jax.random.normal(k[0], (n, OBS_DIM)),
        actions=jax.random.uniform(k[1], (n, ACTION_DIM), minval=-1.0, maxval=1.0),
        rewards=jax.random.normal(k[2], (n,)),
        next_obs=-1.0 + jax.random.normal(k[3], (n, OBS_DIM)),
        terminations=jnp.zeros(n),
    )


def full_buffer(args: m.Args, key: jax.Array) -> m.ReplayBuffer:
    data = random_batch(key, args.buffer_size)
    return m.ReplayBuffer(**data._asdict(), position=jnp.zeros((), jnp.int32), size=jnp.array(args.buffer_size))


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def with_output_bias(params: dict, bias: jax.Array) -> dict:
    """A copy of the critic ensemble's parameters with the bias of the last Dense layer replaced."""
    params = jax.tree.map(lambda x: x, params)  # new nested dicts, same arrays
    params["VmapCritic_0"]["Dense_2"]["bias"] = bias
    return params


def same(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(x, y)), a, b)))


@pytest.fixture
def noise_calls(monkeypatch):
    """Record every (eager) call of `add_noise`: its inputs and its output."""
    calls = []
    real = m.add_noise

    def recording(actions, key, std, noise_clip=jnp.inf):
        out = real(actions, key, std, noise_clip)
        calls.append({"actions": actions, "std": std, "noise_clip": noise_clip, "out": out})
        return out

    monkeypatch.setattr(m, "add_noise", recording)
    return calls


# Noise


def clipped_normal_std(std: float, clip: float) -> float:
    """The standard deviation of N(0, std) clipped to [-clip, clip] (0.1977 for 0.2 and 0.5): the
    variance of the part inside, plus clip**2 times the mass piled up at the two clip values."""
    k = clip / std
    density, inside = math.exp(-(k**2) / 2) / math.sqrt(2 * math.pi), math.erf(k / math.sqrt(2))
    return std * math.sqrt(inside - 2 * k * density + k**2 * (1 - inside))


def test_target_smoothing_noise_is_clipped_and_per_dimension():
    noisy = np.asarray(m.add_noise(jnp.zeros((20_000, 4)), jax.random.PRNGKey(0), 0.2, 0.5))
    assert np.abs(noisy).max() == pytest.approx(0.5)  # the clip binds (|N(0, 0.2)| > 0.5 about 1% of the time)
    assert 0.005 < np.mean(np.abs(noisy) == 0.5) < 0.02
    assert np.std(noisy, axis=0) == pytest.approx(clipped_normal_std(0.2, 0.5), abs=0.004)  # 4 standard errors
    # independent per dimension: the dimensions of a row are uncorrelated (one scalar per row would give 1)
    assert np.abs(np.corrcoef(noisy.T) - np.eye(4)).max() < 0.05
    # and the noisy action stays in [-1, 1]
    near_edge = np.asarray(m.add_noise(jnp.full((1000, 4), 0.9), jax.random.PRNGKey(1), 0.2, 0.5))
    assert near_edge.max() == 1.0 and near_edge.min() >= 0.4 - 1e-6


@pytest.mark.parametrize("tau", [None, 0.005])
def test_target_action_uses_the_noise_flags_and_the_actor_in_eval_mode(noise_calls, tau):
    args = small_args(m, policy_noise=0.3, noise_clip=0.4, tau=tau)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    if tau is not None:  # make the target actor differ from the live one
        agent = agent._replace(
            targets=agent.targets._replace(actor=jax.tree.map(lambda x: 0.5 * x, agent.targets.actor))
        )
    batch = random_batch(jax.random.PRNGKey(1), args.batch_size)
    m.critic_loss(agent.critic.params, agent, batch, jax.random.PRNGKey(2), args)

    (call,) = noise_calls
    assert (call["std"], call["noise_clip"]) == (0.3, 0.4)
    actor_params = agent.actor.params if tau is None else agent.targets.actor
    actor_vars = {"params": actor_params, "batch_stats": agent.actor.batch_stats}
    eval_actions = agent.actor.apply_fn(actor_vars, batch.next_obs, train=False)
    train_actions, _ = agent.actor.apply_fn(actor_vars, batch.next_obs, train=True, mutable=["batch_stats"])
    assert call["actions"].shape == (args.batch_size, ACTION_DIM)
    np.testing.assert_allclose(call["actions"], eval_actions, rtol=1e-6)
    assert not np.allclose(call["actions"], train_actions, atol=1e-3)


def test_exploration_noise_is_per_dimension():
    agent = m.create_agent(small_args(m), OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    obs = 0.3 * jax.random.normal(jax.random.PRNGKey(1), (5000, OBS_DIM))
    clean = np.asarray(m.deterministic_action(agent.actor, obs))
    noisy = m.explore(agent.actor, obs, jax.random.PRNGKey(2), 0.1)
    noise = np.asarray(noisy) - clean
    assert np.abs(clean).max() < 0.8  # so that the [-1, 1] clip (2 sigma away or more) hardly ever binds
    assert np.std(noise, axis=0) == pytest.approx(0.1, abs=0.005)
    assert np.abs(np.corrcoef(noise.T) - np.eye(ACTION_DIM)).max() < 0.05
    assert np.array_equal(m.explore(agent.actor, obs, jax.random.PRNGKey(2), 0.0), clean)


# The CrossQ update


def test_critic_loss_is_one_joint_train_pass_over_s_and_s_next(noise_calls):
    args = small_args(m)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = random_batch(jax.random.PRNGKey(1), args.batch_size)
    loss, (batch_stats, _) = m.critic_loss(agent.critic.params, agent, batch, jax.random.PRNGKey(2), args)
    next_actions = noise_calls[0]["out"]

    # The input BRN layer's running mean moved (momentum 0.99, from 0) toward the mean of all 2B rows.
    rows = jnp.concatenate(
        [jnp.concatenate([batch.obs, batch.next_obs]), jnp.concatenate([batch.actions, next_actions])], 1
    )
    input_stats = batch_stats["VmapCritic_0"]["Normalization_0"]["BatchRenorm_0"]
    for member in range(args.n_critics):
        np.testing.assert_allclose(input_stats["mean"][member], 0.01 * rows.mean(0), atol=1e-6)
        assert input_stats["steps"][member] == 1

    # q and q' come from that one pass; the TD target uses the min over the critics.
    def joint_q(params):
        variables = {"params": params, "batch_stats": agent.critic.batch_stats}
        q_all = agent.critic.apply_fn(
            variables, rows[:, :OBS_DIM], rows[:, OBS_DIM:], train=True, mutable=["batch_stats"]
        )
        return jnp.split(q_all[0], 2, axis=1)

    next_q = joint_q(agent.critic.params)[1]
    target = np.asarray(batch.rewards + args.gamma * next_q.min(0))
    manual_loss = lambda p: 0.5 * ((joint_q(p)[0] - target) ** 2).mean(1).sum()
    assert float(loss) == pytest.approx(float(manual_loss(agent.critic.params)), rel=1e-5)
    # ... and the target is a constant for the gradient (stop_gradient), as a target network's would be.
    noise_key = jax.random.PRNGKey(2)
    grads = jax.grad(lambda p: m.critic_loss(p, agent, batch, noise_key, args)[0])(agent.critic.params)
    frozen = jax.grad(manual_loss)(agent.critic.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6), grads, frozen)


@pytest.mark.parametrize("tau", [None, 0.005])
def test_no_target_network_the_td_target_moves_with_the_live_critic(tau):
    """With gamma 1 and no terminals, shifting the live critics' output by c leaves the CrossQ loss
    unchanged (q and q' both move); with target networks (TD3 baseline) only q moves."""
    args = small_args(m, gamma=1.0, tau=tau)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(agent)[0]]
    assert any("targets" in path for path in paths) == (tau is not None)
    batch = random_batch(jax.random.PRNGKey(1), args.batch_size)
    params = agent.critic.params
    shifted = with_output_bias(params, params["VmapCritic_0"]["Dense_2"]["bias"] + 5.0)
    key = jax.random.PRNGKey(2)
    loss = float(m.critic_loss(params, agent, batch, key, args)[0])
    loss_shifted = float(m.critic_loss(shifted, agent, batch, key, args)[0])
    if tau is None:
        assert loss_shifted == pytest.approx(loss, rel=1e-4)
    else:
        assert loss_shifted > loss + 10.0


def test_actor_loss_is_min_over_critics_critic_in_eval_mode_actor_in_train_mode():
    args = small_args(m)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    # make the two critics disagree, so that min, mean and Q1 differ
    params = with_output_bias(agent.critic.params, jnp.array([[3.0], [-3.0]]))
    agent = agent._replace(critic=agent.critic.replace(params=params))
    obs = random_batch(jax.random.PRNGKey(1), args.batch_size).obs
    loss, actor_stats = m.actor_loss(agent.actor.params, agent, obs)
    actions = agent.actor.apply_fn(m.variables_of(agent.actor), obs, train=True, mutable=["batch_stats"])[0]
    q = agent.critic.apply_fn(m.variables_of(agent.critic), obs, actions, train=False)
    assert float(loss) == pytest.approx(float(-q.min(0).mean()), rel=1e-5)
    assert float(loss) > float(-q.mean()) + 1.0
    assert actor_stats["Normalization_0"]["BatchRenorm_0"]["steps"] == 1  # train mode: statistics updated


@pytest.mark.parametrize(("policy_delay", "utd"), [(3, 1), (2, 3)])
def test_actor_changes_exactly_every_policy_delay_critic_updates(policy_delay, utd):
    args = small_args(m, policy_delay=policy_delay, utd=utd)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    buffer = full_buffer(args, jax.random.PRNGKey(1))
    actor_changes, before = [], snapshot((agent.actor.params, agent.critic.params))
    steps = learning_steps(m, args, agent, buffer, 7, seed=10)
    for call, (agent, metrics) in enumerate(steps, start=1):  # noqa: B007 (metrics: after the loop)
        critic_updates = call * utd
        assert int(agent.critic.step) == critic_updates
        assert int(agent.actor.step) == critic_updates // policy_delay
        assert not same(before[1], agent.critic.params)
        actor_changes.append(not same(before[0], agent.actor.params))
        before = snapshot((agent.actor.params, agent.critic.params))
    expected = [(c * utd) // policy_delay > ((c - 1) * utd) // policy_delay for c in range(1, 8)]
    assert actor_changes == expected
    assert int(metrics.nonfinite_step) == -1


def test_td3_targets_are_polyak_averaged_on_the_actor_schedule():
    args = small_args(m, tau=0.25, policy_delay=2)
    agent = m.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert same(agent.targets, m.Targets(agent.actor.params, agent.critic.params))
    buffer = full_buffer(args, jax.random.PRNGKey(1))
    old_targets = snapshot(agent.targets)
    steps = learning_steps(m, args, agent, buffer, 4)
    for call, (agent, _) in enumerate(steps, start=1):
        if call % 2:
            assert same(old_targets, agent.targets)
        else:
            live = m.Targets(agent.actor.params, agent.critic.params)
            expected = jax.tree.map(lambda t, p: 0.75 * t + 0.25 * p, old_targets, live)
            jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), agent.targets, expected)
            assert not same(old_targets, agent.targets)
        old_targets = snapshot(agent.targets)


# Command line


def test_td3_preset_and_overrides():
    assert m.parse_args([]) == m.Args()
    crossq = m.parse_args(["--env-id", "Walker2d-v4"])
    assert (crossq.tau, crossq.bn_mode, crossq.critic_width, crossq.adam_b1, crossq.policy_delay) == (
        None, "brn", 2048, 0.5, 3,
    )  # fmt: skip
    td3 = m.parse_args(["td3", "--env-id", "Walker2d-v4", "--seed", "7"])
    assert (td3.tau, td3.bn_mode, td3.critic_width, td3.adam_b1, td3.policy_delay) == (0.005, "none", 256, 0.9, 2)
    assert (td3.env_id, td3.seed, td3.learning_rate, td3.policy_noise, td3.noise_clip) == (
        "Walker2d-v4", 7, 1e-3, 0.2, 0.5,
    )  # fmt: skip
    assert td3.exploration_noise == 0.1 and td3.exp_name != m.Args().exp_name
    assert m.parse_args(["td3", "--policy-delay", "5"]).policy_delay == 5


def test_good_edge_values_are_accepted():
    m.check_args(dataclasses.replace(m.Args(), tau=1.0, policy_noise=0.0, noise_clip=0.0, exploration_noise=0.0))


# Checkpoints and the td3 preset


def fake_checkpoint(path, **args) -> str:
    return conftest.fake_checkpoint(m, path, dataclasses.replace(m.Args(), **args))


def test_resume_takes_the_preset_from_the_checkpoint(tmp_path):
    td3 = dataclasses.replace(m.PRESETS["td3"][1], policy_delay=5, env_id="Walker2d-v4")  # `td3 --policy-delay 5 ...`
    td3_args = {name: getattr(td3, name) for name in ("exp_name", "tau", "bn_mode", "critic_width", "adam_b1")}
    td3_args |= {"policy_delay": 5, "env_id": "Walker2d-v4"}
    td3_run = fake_checkpoint(tmp_path / "td3.npz", **td3_args)
    crossq_run = fake_checkpoint(tmp_path / "crossq.npz", env_id="Walker2d-v4")
    resumed = m.parse_args(["--resume", td3_run])
    assert resumed == dataclasses.replace(m.Args(), **td3_args, resume=td3_run)  # td3, without the word
    # The word may restate the command line that started the run (the word stands for all its values)
    assert m.parse_args(["td3", "--policy-delay", "5", "--resume", td3_run]) == resumed
    with pytest.raises(m.ConfigError, match="--policy-delay is 5 in the checkpoint, not 2: a resumed run keeps its"):
        m.parse_args(["td3", "--resume", td3_run])
    assert m.parse_args(["--resume", td3_run, "--total-timesteps", "9"]).total_timesteps == 9
    assert m.parse_args(["--resume", crossq_run]) == dataclasses.replace(
        m.Args(), env_id="Walker2d-v4", resume=crossq_run
    )
    with pytest.raises(m.ConfigError, match=r"^--\S+ is .* in the checkpoint, not .*: a resumed run keeps its"):
        m.parse_args(["td3", "--resume", crossq_run])


def test_the_td3_word_on_a_crossq_checkpoint_is_refused_with_one_line(script_runner, tmp_path):
    crossq_run = fake_checkpoint(tmp_path / "crossq.npz", env_id="Pendulum-v1")
    result, cwd = script_runner(SCRIPT, "td3", "--resume", crossq_run, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith("error: ") and "a resumed run keeps its hyperparameters" in result.stderr
    assert run_dirs(cwd) == []


def test_a_td3_run_resumes_as_td3_with_its_target_networks(tmp_path):
    """A td3 run stopped mid-episode at step 350 and resumed without the preset word logs exactly
    what the uninterrupted run logs: the target networks travel in the checkpoint."""
    flags = ["--env-id", "Pendulum-v1", "--seed", "5", *TINY_RUN, "--log-freq", "50", "--eval-freq", "50"]
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    for cwd in (reference, stopped):
        cwd.mkdir()
    result = run_script(SCRIPT, "td3", *flags, "--total-timesteps", "500", cwd=reference)
    assert result.returncode == 0, result.stderr
    result = run_script(SCRIPT, "td3", *flags, "--total-timesteps", "350", "--checkpoint-freq", "350", cwd=stopped)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(stopped)
    arrays, host_state = crossq_utils.read_checkpoint(m, str(run_dir))
    assert host_state["global_step"] == 350 and host_state["args"]["tau"] == 0.005
    assert any(path.startswith("agent/targets/actor/") for path in arrays)
    assert any(path.startswith("agent/targets/critic/") for path in arrays)

    result = run_script(SCRIPT, "--resume", str(run_dir), "--total-timesteps", "500", cwd=stopped)
    assert result.returncode == 0, result.stderr
    assert "resumed" in result.stdout and run_dirs(stopped) == [run_dir]
    assert json.loads((run_dir / "args.json").read_text())["exp_name"] == "td3_baseline"
    expected, got = read_scalars(run_dirs(reference)[0]), read_scalars(run_dir)
    for timed in ("charts/SPS", "charts/train_seconds"):
        expected.pop(timed), got.pop(timed)
    assert [step for step, _ in got["losses/qf_loss"]] == list(range(300, 501, 50))
    assert got == expected
