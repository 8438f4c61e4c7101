"""DeepMind Control Suite through shimmy (`--env-id dm_control/<domain>-<task>`, the paper's
Appendix A.1) in the three scripts. The packages come from requirements-dmc.txt (CI installs it);
without them only the test of the error message runs."""

import importlib.util
import json
import sys

import gymnasium as gym
import numpy as np
import pytest
from conftest import read_scalars, run_dirs

import crossq_jax
import crossq_td3_jax
import crossq_utils
import sac_jax

SCRIPTS = [crossq_jax, crossq_td3_jax, sac_jax]
needs_dmc = pytest.mark.skipif(
    importlib.util.find_spec("shimmy") is None or importlib.util.find_spec("dm_control") is None,
    reason="the DeepMind Control packages are not installed: pip install -r requirements-dmc.txt",
)


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_without_the_packages_a_dm_control_id_says_what_to_install(script, monkeypatch):
    monkeypatch.setitem(sys.modules, "shimmy", None)  # `import shimmy` now fails as if not installed
    with pytest.raises(script.ConfigError, match=r"pip install -r requirements-dmc\.txt"):
        script.check_env("dm_control/reacher-easy")


def test_without_the_packages_the_command_line_exits_2_with_one_line(script_runner, monkeypatch, tmp_path):
    fake = tmp_path / "fake_site"
    (fake / "shimmy").mkdir(parents=True)
    (fake / "shimmy" / "__init__.py").write_text("raise ImportError('No module named shimmy')\n")
    monkeypatch.setenv("PYTHONPATH", str(fake))
    result, cwd = script_runner("crossq_td3_jax.py", "--env-id", "dm_control/reacher-easy")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "requirements-dmc.txt" in lines[0], result.stderr
    assert not run_dirs(cwd)


@needs_dmc
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_dict_observations_become_one_vector_in_sorted_key_order(script):
    """humanoid-stand: dm_control's own key order is not alphabetical, and head_height is a scalar."""
    env = script.make_env("dm_control/humanoid-stand", seed=0)()
    obs, _ = env.reset(seed=3)
    raw_obs, _ = gym.make("dm_control/humanoid-stand").reset(seed=3)
    assert list(raw_obs) != sorted(raw_obs)
    expected = np.concatenate([np.ravel(raw_obs[key]) for key in sorted(raw_obs)])
    assert obs.shape == env.observation_space.shape == (67,)
    np.testing.assert_array_equal(obs, expected)


@needs_dmc
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_a_dmc_episode_runs_end_to_end(script, tmp_path, monkeypatch):
    """One 1000-step reacher-easy episode (DMC's time limit truncates it), updates from step 900 on
    with the Figure 11 learning rate, then an evaluation episode."""
    monkeypatch.chdir(tmp_path)
    args = script.Args(
        env_id="dm_control/reacher-easy",
        total_timesteps=1000,
        learning_starts=900,
        learning_rate=8e-4,
        batch_size=32,
        buffer_size=1000,
        critic_width=32,
        actor_width=32,
        eval_freq=0,
        eval_episodes=1,
        log_freq=500,
    )
    script.train(args)
    (run_dir,) = run_dirs(tmp_path)
    scalars = read_scalars(run_dir)
    assert scalars["charts/episodic_length"] == [(1000, 1000.0)]
    ((step, eval_return),) = scalars["eval/episodic_return"]
    assert step == 1000 and 0.0 <= eval_return <= 1000.0  # DMC rewards lie in [0, 1]
    assert [step for step, _ in scalars["losses/qf_loss"]] == [1000]


@needs_dmc
@pytest.mark.parametrize("script", SCRIPTS, ids=lambda m: m.__name__)
def test_the_env_generator_state_survives_a_checkpoint_so_a_dmc_run_can_resume(script):
    """DMC envs draw from a legacy RandomState; its state goes through a checkpoint's JSON and back."""
    env = script.make_env("dm_control/reacher-easy", seed=0)()
    env.reset(seed=5)
    state = json.loads(json.dumps(crossq_utils.generator_state(env.np_random), default=np.ndarray.tolist))
    first, _ = env.reset()
    crossq_utils.set_generator_state(env.np_random, state)
    again, _ = env.reset()
    np.testing.assert_array_equal(first, again)
