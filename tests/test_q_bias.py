"""The Q-bias measurement (`--q-bias-freq`, the paper's Figures 7 and 17) of the three scripts.

On an env whose true Q is known in closed form (constant reward, a fixed number of steps, a
policy with a constant log-probability) the Monte-Carlo returns must equal the closed form, so
that a wrong discount, a missing or misplaced entropy bonus, or a return shifted by one step
shows up as a bias where there is none."""

import dataclasses

import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import read_scalars, run_dirs

import crossq_jax
import crossq_td3_jax
import crossq_utils
import sac_jax

SCRIPTS = [crossq_jax, crossq_td3_jax, sac_jax]


class ConstantReward(gym.Env):
    """Reward `reward` at every step; the episode ends after `horizon` steps (a true terminal,
    or a time-limit truncation); the observation is the index t of the step about to be taken."""

    observation_space = gym.spaces.Box(0.0, np.inf, (1,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def __init__(self, horizon: int = 12, reward: float = 2.0, truncate: bool = False):
        self.horizon, self.reward, self.truncate, self.t = horizon, reward, truncate, 0

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t = 0
        return np.array([0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        end = self.t == self.horizon
        return np.array([self.t], np.float32), self.reward, end and not self.truncate, end and self.truncate, {}


gym.register("ConstantReward12-v0", entry_point=ConstantReward)
gym.register("ConstantReward12Truncated-v0", entry_point=lambda: ConstantReward(truncate=True))

HORIZON, REWARD, GAMMA = 12, 2.0, 0.9
ALPHA, LOGP = 0.5, -1.5  # a policy whose every action has log pi = LOGP: entropy bonus +0.75 a step


def true_q(t: np.ndarray, alpha: float) -> np.ndarray:
    """Soft Q(s_t, a_t) with n = HORIZON - t steps left: the n rewards, discounted, and the entropy
    bonus -alpha * LOGP of the n - 1 actions after a_t (a_t itself is given, not drawn)."""
    n = HORIZON - t
    rewards = REWARD * (1 - GAMMA**n) / (1 - GAMMA)
    bonuses = -alpha * LOGP * GAMMA * (1 - GAMMA ** (n - 1)) / (1 - GAMMA)
    return rewards + bonuses


def alpha_of(script) -> float:
    return 0.0 if script is crossq_td3_jax else ALPHA


def measure(script, env_id: str, q_values, n_samples: int, cutoff: int) -> dict[str, float]:
    """The measurement on `env_id` (through the script's make_env) with the constant-logp policy; the TD3 base's
    deterministic policy has log pi 0 and alpha 0: plain discounted returns."""
    env = script.make_env(env_id, seed=0)()
    env.reset(seed=0)
    alpha, logp = (0.0, 0.0) if script is crossq_td3_jax else (ALPHA, LOGP)
    policy = lambda obs, key: (np.zeros(1, np.float32), logp)
    return crossq_utils.q_bias(env, policy, q_values, alpha, GAMMA, n_samples, cutoff, jax.random.PRNGKey(0))


@pytest.mark.parametrize("env_id", ["ConstantReward12-v0", "ConstantReward12Truncated-v0"])
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_a_critic_that_predicts_the_true_q_has_no_bias(script, env_id):
    alpha = alpha_of(script)
    stats = measure(script, env_id, lambda obs, actions: true_q(obs[:, 0], alpha), n_samples=25, cutoff=10)
    # 25 states: t = 0..9 of two episodes and t = 0..4 of a third (the cut-off keeps 10 per episode)
    states = np.concatenate([np.arange(10), np.arange(10), np.arange(5)])
    assert stats["mc_return"] == pytest.approx(true_q(states, alpha).mean(), rel=1e-6)
    assert stats["q_value"] == pytest.approx(true_q(states, alpha).mean(), rel=1e-6)
    for name in ["q_bias_mean", "q_bias_std", "q_bias_global_mean", "q_bias_global_std"]:
        assert abs(stats[name]) < 1e-6, (name, stats)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_bias_is_normalised_per_state_and_by_the_mean_return_over_the_first_states_only(script):
    """A critic off by +3 on the states the measurement keeps (and wildly off on those past the
    cut-off, which it must not look at): per state, the bias is divided by |MC| floored at 10."""
    alpha, offset, cutoff = alpha_of(script), 3.0, 10

    def q_values(obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        t = obs[:, 0]
        return true_q(t, alpha) + np.where(t < cutoff, offset, 1e6)

    stats = measure(script, "ConstantReward12-v0", q_values, n_samples=25, cutoff=cutoff)
    states = np.concatenate([np.arange(10), np.arange(10), np.arange(5)])
    mc = true_q(states, alpha)
    assert (np.abs(mc) < 10).any() and (np.abs(mc) > 10).any()  # both sides of the floor are tested
    per_state = offset / np.maximum(np.abs(mc), 10.0)
    assert stats["q_bias_mean"] == pytest.approx(per_state.mean(), rel=1e-6)
    assert stats["q_bias_std"] == pytest.approx(per_state.std(), rel=1e-6)
    assert stats["q_bias_global_mean"] == pytest.approx(offset / max(abs(mc.mean()), 10.0), rel=1e-6)
    assert stats["q_bias_global_std"] == pytest.approx(0.0, abs=1e-6)
    assert stats["q_value"] - stats["mc_return"] == pytest.approx(offset, rel=1e-6)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_the_critic_prediction_is_the_ensemble_mean_in_eval_mode(script):
    """Chen et al. and the CrossQ authors compare the mean over the ensemble, not the TD target's min."""
    args = script.Args(critic_width=32, actor_width=32, n_critics=3)
    agent = script.create_agent(args, 3, 2, jax.random.PRNGKey(0))
    obs, actions = jax.random.normal(jax.random.PRNGKey(1), (5, 3)), jnp.full((5, 2), 0.5)
    variables = {"params": agent.critic.params, "batch_stats": agent.critic.batch_stats}
    each = np.asarray(agent.critic.apply_fn(variables, obs, actions, train=False))  # (3, 5): one row per critic
    # (sac_jax's critics take a dropout key from it: DroQ's dropout stays on, as in all its critic passes)
    predicted = np.asarray(script.q_bias_pass(agent, np.asarray(obs), np.asarray(actions), jax.random.PRNGKey(2))[0])
    np.testing.assert_allclose(predicted, each.mean(axis=0), rtol=1e-5, atol=1e-6)
    assert not np.allclose(predicted, each.min(axis=0))


TINY = {
    "env_id": "Pendulum-v1",
    "critic_width": 32,
    "actor_width": 32,
    "batch_size": 32,
    "learning_starts": 200,
    "buffer_size": 1000,
    "total_timesteps": 300,
    "eval_freq": 0,
    "eval_episodes": 1,
    "log_freq": 100,
}


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_measuring_q_bias_leaves_training_unchanged_and_logs_it(script, tmp_path, monkeypatch, capsys):
    logs = {}
    for q_bias_freq in [0, 150]:
        cwd = tmp_path / str(q_bias_freq)
        cwd.mkdir()
        monkeypatch.chdir(cwd)
        args = dataclasses.replace(script.Args(**TINY), q_bias_freq=q_bias_freq, q_bias_samples=30, q_bias_cutoff=30)
        script.train(args)
        (run_dir,) = run_dirs(cwd)
        logs[q_bias_freq] = read_scalars(run_dir)
    off, on = logs[0], logs[150]
    for tag in ["losses/qf_loss", "losses/actor_loss", "charts/episodic_return", "eval/episodic_return"]:
        assert off[tag] == on[tag], tag
    for tag in ["eval/q_bias_mean", "eval/q_bias_std", "eval/q_bias_global_mean", "eval/q_bias_global_std"]:
        assert tag not in off
        assert [step for step, _ in on[tag]] == [150, 300], tag
        assert all(np.isfinite(value) for _, value in on[tag]), tag
    assert "eval/q_bias_mean=" in capsys.readouterr().out
