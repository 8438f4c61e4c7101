"""What every training script must do alike, each test run against each script that it applies to:
the env boundary (action rescaling, terminations vs truncations), the TD target, the tanh-Gaussian
policy, the entropy coefficient, the optimisers, and the Batch Renormalization warm-up switch across a resume.

Runs are in-process (`module.train(args)` in a temporary folder), to keep the suite fast.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import sys

import flax
import gymnasium as gym
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import (
    ACTION_DIM,
    MAIN_WITH_EACH,
    OBS_DIM,
    OPTIMISED_XLA,
    REPO,
    SCRIPTS,
    fake_checkpoint,
    filled_buffer,
    lead_of,
    module_of,
    read_scalars,
    run_dirs,
    run_script,
    script_env,
    small_args,
    train_in,
    train_steps,
)
from conftest import learning_steps as module_learning_steps
from programs import step_programs
from throughput import noise_of

import crossq_utils

CROSSQ_SCRIPTS = ["crossq_jax.py", "crossq_td3_jax.py"]  # the two with Batch Renormalization
SAC_BASED = ["crossq_jax.py", "sac_jax.py"]  # a tanh-Gaussian actor and a learned entropy coefficient


# ---------------------------------------------------------------------------------------------
# The env boundary: action rescaling, terminations vs truncations
# ---------------------------------------------------------------------------------------------


class BoundsAndEndings(gym.Env):
    """Humanoid-like bounds (+-0.4) on one action dimension and asymmetric ones ([0, 2]) on the other.
    Even episodes terminate after 5 steps; odd ones run into the 8-step time limit (a truncation).
    The observation is (t, episode parity, the action the env received)."""

    observation_space = gym.spaces.Box(-np.inf, np.inf, (4,), np.float32)
    action_space = gym.spaces.Box(np.array([-0.4, 0.0], np.float32), np.array([0.4, 2.0], np.float32))

    def __init__(self, render_mode=None):
        self.t, self.episode = 0, -1

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        self.t, self.episode = 0, self.episode + 1
        return np.array([0.0, self.episode % 2, 0.0, 0.0], np.float32), {}

    def step(self, action):
        self.t += 1
        obs = np.array([self.t, self.episode % 2, *action], np.float32)
        return obs, 1.0, self.episode % 2 == 0 and self.t == 5, False, {}


gym.register("BoundsAndEndings-v0", entry_point=BoundsAndEndings, max_episode_steps=8)


@pytest.mark.parametrize("script", SCRIPTS)
def test_actions_are_rescaled_to_the_env_bounds_and_only_terminations_stop_the_bootstrap(script, tmp_path):
    """The buffer (read back from the run's checkpoint) holds the agent's [-1, 1] actions, the env
    received them mapped linearly onto its [low, high], and a row is terminal exactly where the env
    terminated: the time-limit truncations are stored as non-terminal, so the TD target bootstraps."""
    module = module_of(script)
    args = small_args(script, env_id="BoundsAndEndings-v0", total_timesteps=60, learning_starts=60)
    args = dataclasses.replace(args, checkpoint_freq=60, eval_freq=0, eval_episodes=1, log_freq=60)
    train_in(tmp_path, module, args)
    arrays, _ = crossq_utils.read_checkpoint(module, str(run_dirs(tmp_path)[0]))
    actions, next_obs = arrays["buffer/actions"], arrays["buffer/next_obs"]
    terminations = arrays["buffer/terminations"]
    assert len(actions) == 60
    assert np.abs(actions).max() <= 1.0 and np.abs(actions).max() > 0.9
    low, high = np.array([-0.4, 0.0]), np.array([0.4, 2.0])
    np.testing.assert_allclose(next_obs[:, 2:], low + (actions + 1) / 2 * (high - low), rtol=1e-5, atol=1e-6)
    terminated = (next_obs[:, 0] == 5) & (next_obs[:, 1] == 0)
    truncated = next_obs[:, 0] == 8
    assert terminated.sum() >= 3 and truncated.sum() >= 3
    np.testing.assert_array_equal(terminations, terminated.astype(np.float32))


def td_loss(module, args, agent, batch, key):
    """The critic loss of one batch, whatever the script's loss functions take."""
    if hasattr(module, "td_target"):  # sac_jax: the target comes from the target critics, apart
        target = module.td_target(agent, batch, key, args.gamma, args.target_subset_size)
        return module.critic_loss(agent.critic.params, agent, batch, target, key, args)[0]
    return module.critic_loss(agent.critic.params, agent, batch, key, args)[0]


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_terminal_cuts_the_bootstrap_and_a_truncation_does_not(script):
    """Terminal rows: the loss is 0.5 * sum_i mean_b (Q_i(s, a) - r)^2, whatever s' is. Rows stored as
    non-terminal (a time-limit truncation) bootstrap: another s' gives another loss. (No normalisation
    layers here, so that Q(s, a) itself does not see s' through the joint pass's batch statistics.)"""
    module = module_of(script)
    args = small_args(script, **({"bn_mode": "none"} if script in CROSSQ_SCRIPTS else {}))
    agent = module.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = module.buffer_sample(filled_buffer(module, args), jax.random.PRNGKey(1), args.batch_size)
    other_next_obs = batch.next_obs + 3.0
    key = jax.random.PRNGKey(2)
    q = np.asarray(agent.critic.apply_fn(module.variables_of(agent.critic), batch.obs, batch.actions, train=False))
    closed_form = 0.5 * ((q - np.asarray(batch.rewards)) ** 2).mean(1).sum()

    terminal = batch._replace(terminations=jnp.ones_like(batch.terminations))
    for next_obs in (batch.next_obs, other_next_obs):
        loss = float(td_loss(module, args, agent, terminal._replace(next_obs=next_obs), key))
        assert loss == pytest.approx(closed_form, rel=1e-5)
    truncated = batch._replace(terminations=jnp.zeros_like(batch.terminations))
    losses = [
        float(td_loss(module, args, agent, truncated._replace(next_obs=o), key))
        for o in (batch.next_obs, other_next_obs)
    ]
    assert losses[0] != pytest.approx(closed_form, rel=1e-3)
    assert losses[0] != pytest.approx(losses[1], rel=1e-3)


# ---------------------------------------------------------------------------------------------
# The policy, the entropy coefficient and the optimisers
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("script", SAC_BASED)
def test_tanh_gaussian_log_probability_matches_the_change_of_variables(script):
    """log pi(a) = log N(u; mean, std) - sum log(1 - tanh(u)^2) with u = atanh(a), in float64 numpy;
    and exp(log pi) is a density on (-1, 1): its average over the samples in a bin matches the
    histogram's height there (a wrong or missing Jacobian would not)."""
    module = module_of(script)
    mean = jnp.asarray([[0.3, -1.2, 0.0]] * 4, jnp.float32)
    log_std = jnp.asarray([[np.log(0.8), np.log(0.3), np.log(1.5)]] * 4, jnp.float32)
    actions, logp = module.sample_tanh_gaussian(mean, log_std, jax.random.PRNGKey(0))
    a = np.asarray(actions, np.float64)
    u = np.arctanh(a)
    m, s = np.asarray(mean, np.float64), np.exp(np.asarray(log_std, np.float64))
    gaussian = -0.5 * ((u - m) / s) ** 2 - np.log(s) - 0.5 * np.log(2 * np.pi)
    expected = (gaussian - np.log(1 - np.tanh(u) ** 2)).sum(-1)
    np.testing.assert_allclose(logp, expected, rtol=1e-4, atol=1e-4)

    n = 200_000
    samples, logp = module.sample_tanh_gaussian(
        jnp.full((n, 1), 0.3), jnp.full((n, 1), np.log(0.8)), jax.random.PRNGKey(1)
    )
    samples, density = np.asarray(samples)[:, 0], np.exp(np.asarray(logp, np.float64))
    edges = np.linspace(-0.9, 0.9, 19)
    heights, _ = np.histogram(samples, edges)
    heights = heights / (n * np.diff(edges))
    bins = np.digitize(samples, edges) - 1
    mean_density = np.array([density[bins == i].mean() for i in range(len(edges) - 1)])
    np.testing.assert_allclose(mean_density, heights, rtol=0.05)


@pytest.mark.parametrize("script", SAC_BASED)
def test_alpha_loss_and_a_target_entropy_of_minus_the_action_dimension(script, monkeypatch):
    """alpha_loss = -log_alpha * mean(log pi + target): its gradient pushes alpha up when the policy's
    entropy (-mean log pi) is below the target and down when above; the update passes -|A| as target."""
    module = module_of(script)
    logp = jnp.asarray([1.0, -3.0, 0.5])  # mean -0.5: entropy 0.5
    for target, direction in [(-1.0, +1), (2.0, -1)]:  # entropy above -1, below 2
        value, grad = jax.value_and_grad(module.alpha_loss)({"log_alpha": jnp.float32(0.7)}, logp, target)
        assert float(value) == pytest.approx(-0.7 * (-0.5 + target))
        assert float(grad["log_alpha"]) == pytest.approx(-(-0.5 + target))
        assert np.sign(-float(grad["log_alpha"])) == -direction  # gradient descent lowers log_alpha iff above

    targets = []
    real = module.alpha_loss
    monkeypatch.setattr(module, "alpha_loss", lambda p, logp, target: targets.append(target) or real(p, logp, target))
    args = small_args(script, policy_delay=1, utd=1)
    action_dim = 3
    buffer = module.ReplayBuffer.create(args.buffer_size, OBS_DIM, action_dim)
    buffer = buffer._replace(size=jnp.int32(16))
    agent = module.create_agent(args, OBS_DIM, action_dim, jax.random.PRNGKey(0))
    agent, metrics = train_steps(module, args, agent, buffer)
    assert targets == [-3.0]
    assert int(agent.log_alpha.step) == 1 and float(metrics.alpha) != 1.0


def numpy_adam(params, grads_list, lr, b1, b2=0.999, eps=1e-8):
    """Adam by hand (Kingma & Ba, Algorithm 1), float64."""
    p = {k: np.asarray(v, np.float64) for k, v in params.items()}
    m = {k: np.zeros_like(v) for k, v in p.items()}
    v = {k: np.zeros_like(x) for k, x in p.items()}
    for t, grads in enumerate(grads_list, start=1):
        for k, g in grads.items():
            g = np.asarray(g, np.float64)
            m[k] = b1 * m[k] + (1 - b1) * g
            v[k] = b2 * v[k] + (1 - b2) * g**2
            p[k] = p[k] - lr * (m[k] / (1 - b1**t)) / (np.sqrt(v[k] / (1 - b2**t)) + eps)
    return p


@pytest.mark.parametrize("script", SCRIPTS)
def test_learning_rate_and_adam_b1_reach_the_optimisers(script):
    """Two steps of each network's optimiser against Adam by hand: actor and critic with --learning-rate
    and --adam-b1 (b2 0.999), the entropy coefficient with --learning-rate and Adam's default b1 0.9.
    (The first Adam step is lr * sign(g) whatever b1 is; the second one shows b1.)"""
    module = module_of(script)
    args = small_args(script, learning_rate=0.01, adam_b1=0.3)
    agent = module.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    states = {"actor": (agent.actor, 0.3), "critic": (agent.critic, 0.3)}
    if hasattr(agent, "log_alpha"):
        states["log_alpha"] = (agent.log_alpha, 0.9)
    for name, (state, b1) in states.items():
        flat = flax.traverse_util.flatten_dict(state.params, sep="/")
        grads_list = [{k: rng.normal(size=np.shape(v)) for k, v in flat.items()} for _ in range(2)]
        for grads in grads_list:
            tree = flax.traverse_util.unflatten_dict(
                {k: jnp.asarray(g, jnp.float32) for k, g in grads.items()}, sep="/"
            )
            state = state.apply_gradients(grads=tree)
        expected = numpy_adam(flat, grads_list, lr=0.01, b1=b1)
        got = flax.traverse_util.flatten_dict(state.params, sep="/")
        for k in flat:
            np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-6, err_msg=f"{name} {k}")


# ---------------------------------------------------------------------------------------------
# The Batch Renormalization warm-up switch inside a run, and across a resume
# ---------------------------------------------------------------------------------------------


def brn_counters(arrays: dict, network: str) -> set[int]:
    """The train-call counters of a network's BRN layers in a checkpoint (one per ensemble member)."""
    prefix = f"agent/{network}/batch_stats/"
    return {
        int(c) for path, v in arrays.items() if path.startswith(prefix) and path.endswith("/steps") for c in np.ravel(v)
    }


@pytest.mark.parametrize("script", CROSSQ_SCRIPTS)
def test_a_resume_from_before_the_brn_switch_to_past_it_matches_the_uninterrupted_run(script, tmp_path):
    """Warm-up of 60 train calls: the critic's layers switch to renormalising at env step 160, the
    actor's (policy delay 3) at 280. A run stopped at 130, before both, and resumed to 390, past both,
    logs exactly what the uninterrupted run does (the counters travel in the checkpoint). It stops at an
    evaluation step: a run evaluates at its last step, and that draws from the evaluation env's generator."""
    module = module_of(script)
    args = small_args(script, env_id="Pendulum-v1", seed=4, learning_starts=100, bn_warmup_steps=60)
    args = dataclasses.replace(args, batch_size=16, log_freq=10, eval_freq=130, eval_episodes=1)
    reference, stopped = tmp_path / "reference", tmp_path / "stopped"
    reference.mkdir(), stopped.mkdir()
    train_in(reference, module, dataclasses.replace(args, total_timesteps=390))
    train_in(stopped, module, dataclasses.replace(args, total_timesteps=130, checkpoint_freq=130))
    (run_dir,) = run_dirs(stopped)
    arrays, _ = crossq_utils.read_checkpoint(module, str(run_dir))
    assert brn_counters(arrays, "critic") == {30} and brn_counters(arrays, "actor") == {10}  # still warming up
    train_in(stopped, module, module.parse_args(["--resume", str(run_dir), "--total-timesteps", "390"]))
    arrays, host_state = crossq_utils.read_checkpoint(module, str(run_dir))
    assert host_state["global_step"] == 390
    assert brn_counters(arrays, "critic") == {290} and brn_counters(arrays, "actor") == {96}  # renormalising
    expected, got = read_scalars(run_dirs(reference)[0]), read_scalars(run_dir)
    for timed in ("charts/SPS", "charts/train_seconds"):
        expected.pop(timed), got.pop(timed)
    assert [step for step, _ in got["eval/episodic_return"]] == [130, 260, 390]
    assert got == expected


# ---------------------------------------------------------------------------------------------
# The command line and whole runs, for each script and each of its presets
# ---------------------------------------------------------------------------------------------

# (script, preset word or None): every system the three scripts run.
SYSTEMS = [
    ("crossq_jax.py", None),
    ("crossq_td3_jax.py", None),
    ("crossq_td3_jax.py", "td3"),
    ("sac_jax.py", None),
    ("sac_jax.py", "redq"),
    ("sac_jax.py", "droq"),
]
PRESET_WORDS = {"crossq_jax.py": ["small"], "crossq_td3_jax.py": ["td3"], "sac_jax.py": ["redq", "droq"]}


def system_id(system: tuple[str, str | None]) -> str:
    script, preset = system
    return script[:-3] + (f"-{preset}" if preset else "")


def logged_tags(script: str) -> set[str]:
    tags = {"charts/episodic_return", "charts/episodic_length", "charts/SPS", "charts/train_seconds"}
    tags |= {"eval/episodic_return"}
    tags |= {"losses/qf_loss", "losses/qf_values", "losses/actor_loss"}
    return tags | ({"losses/alpha", "losses/alpha_loss"} if script in SAC_BASED else set())


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_lists_every_flag_and_the_preset_words(script, script_runner):
    result, _ = script_runner(script, "--help", timeout=120)
    assert result.returncode == 0, result.stderr
    for field in dataclasses.fields(module_of(script).Args):
        flag = f"--{field.name.replace('_', '-')}"
        assert re.search(re.escape(flag) + "[ ,]", result.stdout), flag  # `--seed INT`, `--track, --no-track`
    for word in PRESET_WORDS[script]:
        assert word in result.stdout, word


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_preset_word_sets_its_values_flags_override_them_and_a_resume_must_agree_with_it(script, tmp_path):
    """A resumed run takes the checkpoint's flags; a preset word beside --resume stands for its values, which must be
    the checkpoint's (a sweep resumes with its cell's own command line, preset word included)."""
    module = module_of(script)
    default_word, *words = module.PRESETS
    assert words == PRESET_WORDS[script]
    assert module.parse_args([]) == module.parse_args([default_word]) == module.PRESETS[default_word][1]
    for word in words:
        preset = module.PRESETS[word][1]
        assert module.parse_args([word]) == preset != module.Args()
        assert module.parse_args([word, "--seed", "7"]) == dataclasses.replace(preset, seed=7)
    # A run of the defaults resumed with another word, which it was not started with: refused, naming a flag.
    checkpoint = fake_checkpoint(module, tmp_path / "checkpoint.npz", module.Args(env_id="Pendulum-v1"))
    assert module.parse_args(["--resume", checkpoint]) == module.Args(env_id="Pendulum-v1", resume=checkpoint)
    with pytest.raises(module.ConfigError, match=r"^--\S+ is .* in the checkpoint, not .*: a resumed run keeps its"):
        module.parse_args([words[0], "--resume", checkpoint])
    started = fake_checkpoint(module, tmp_path / "word.npz", module.parse_args([words[0], "--env-id", "Pendulum-v1"]))
    assert module.parse_args([words[0], "--resume", started]).resume == started  # the word it was started with


SMOKE_FLAGS = [
    *["--env-id", "Hopper-v4", "--total-timesteps", "300", "--learning-starts", "256", "--batch-size", "32"],
    *["--critic-width", "32", "--actor-width", "32", "--buffer-size", "1000", "--eval-freq", "0"],
    *["--eval-episodes", "2", "--log-freq", "100", "--save-model"],
]


@pytest.mark.parametrize("system", SYSTEMS, ids=system_id)
def test_a_short_mujoco_run_trains_evaluates_logs_and_saves_a_model_that_acts_as_evaluated(
    system, script_runner, monkeypatch
):
    """Run as a user runs it. The saved model, read back by --eval-model, reproduces the final
    evaluation (the run evaluates only at its end, so both see the same episodes)."""
    script, preset = system
    module = module_of(script)
    result, cwd = script_runner(script, *([preset] if preset else []), *SMOKE_FLAGS)
    assert result.returncode == 0, result.stderr
    (run_dir,) = run_dirs(cwd)
    args = module.parse_args([*([preset] if preset else []), *SMOKE_FLAGS])
    assert run_dir.name.startswith(f"Hopper-v4__{args.exp_name}__1__")
    assert json.loads((run_dir / "args.json").read_text()) == dataclasses.asdict(args)
    scalars = read_scalars(run_dir)
    assert set(scalars) == logged_tags(script)
    assert all(np.isfinite(value) for values in scalars.values() for _, value in values)
    for tag in logged_tags(script):
        if tag.startswith("losses/"):
            assert [step for step, _ in scalars[tag]] == [300], tag  # logged once learning runs
    (final_eval,) = scalars["eval/episodic_return"]
    assert final_eval[0] == 300
    saved = flax.serialization.msgpack_restore((run_dir / f"{args.exp_name}.crossq_model").read_bytes())
    assert {"actor", "critic"} <= set(saved)
    monkeypatch.chdir(cwd)
    evaluated = crossq_utils.evaluate_model(
        module, module.parse_args(["--eval-model", str(run_dir), "--eval-episodes", "2"])
    )
    assert evaluated["eval_return"] == pytest.approx(final_eval[1], rel=1e-5)


# ---------------------------------------------------------------------------------------------
# One learning env step: two programs (store, train_step), no conditional, the next action inside
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "system,flags",
    [*[(system, []) for system in SYSTEMS], (("crossq_jax.py", None), ["--utd", "5", "--policy-delay", "2"])],
    ids=lambda value: system_id(value) if isinstance(value, tuple) else " ".join(value) or "defaults",
)
def test_no_per_step_program_holds_a_conditional(system, flags):
    """On a GPU a conditional makes the launching thread wait until every kernel before it has finished, and
    cuts the program's CUDA graph: none of the programs a learning env step runs may hold one (for each actor-
    update pattern of the schedule). Lowered for CUDA, which needs no GPU."""
    script, preset = system
    argv = [*([preset] if preset else []), "--critic-width", "16", "--actor-width", "16", "--buffer-size", "1000"]
    programs = step_programs(module_of(script), [*argv, *flags])
    leads = 1 if script == "sac_jax.py" else 2  # policy delay = UTD (SAC, REDQ, DroQ): every step alike
    assert sum(name.startswith("train_step") for name in programs) == leads
    for name, traced in programs.items():
        text = traced.lower(lowering_platforms=("cuda",)).as_text()
        assert "stablehlo.case" not in text and "stablehlo.if" not in text, name


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_action_drawn_inside_the_step_is_the_one_explore_draws(script):
    """train_step ends with the next env step's action: it must be exactly what `explore` draws from the updated
    actor with the key train_step returns, the draw a resumed run makes for its first step (else a resume would
    part from the uninterrupted run). And each step draws with a new key."""
    module = module_of(script)
    args = small_args(script)
    agent = module.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    buffer = filled_buffer(module, args)
    train_step = module.make_train_step(args, ACTION_DIM)
    metrics, keys = module.Metrics.initial(), {"update": jax.random.PRNGKey(1), "explore": jax.random.PRNGKey(2)}
    obs = jax.random.normal(jax.random.PRNGKey(3), (1, OBS_DIM))
    noise = noise_of(args)
    actions = []
    for step in range(args.learning_starts + 1, args.learning_starts + 4):
        agent, metrics, keys, action = train_step(agent, metrics, buffer, keys, obs, lead_of(args, step))
        np.testing.assert_array_equal(action, module.explore(agent.actor, obs, keys["explore"], *noise))
        actions.append(np.asarray(action))
    assert not np.array_equal(actions[0], actions[1]) and not np.array_equal(actions[1], actions[2])


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_same_seed_gives_identical_runs(script, tmp_path):
    module = module_of(script)
    args = small_args(script, env_id="Pendulum-v1", seed=7, total_timesteps=400, learning_starts=200)
    args = dataclasses.replace(args, batch_size=32, buffer_size=1000, log_freq=100, eval_freq=200, eval_episodes=1)
    logs = []
    for name in ("first", "second"):
        (tmp_path / name).mkdir()
        train_in(tmp_path / name, module, args)
        logs.append(read_scalars(run_dirs(tmp_path / name)[0]))
    assert len(logs[0]["losses/qf_loss"]) == 2 and len(logs[0]["eval/episodic_return"]) == 2
    for tag in ["charts/episodic_return", "losses/qf_loss", "losses/actor_loss", "eval/episodic_return"]:
        assert logs[0][tag] == logs[1][tag], tag


# NaNRewardAfter300-v0, Float32OverflowAfter300-v0 and HugeRewardAfter300-v0 are registered in conftest.py.
@pytest.mark.parametrize("env_id", ["NaNRewardAfter300-v0", "Float32OverflowAfter300-v0"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_an_env_that_returns_nan_or_inf_in_float32_is_named_at_that_step(script, env_id, tmp_path):
    """A reward of 1e39 is finite as a Python float but inf in the float32 the buffer stores: the env is named."""
    args = small_args(script, env_id=env_id, total_timesteps=2000, learning_starts=100, eval_freq=0)
    with pytest.raises(FloatingPointError, match=rf"^{env_id} returned .* NaN/inf in float32 .* at env step 300$"):
        train_in(tmp_path, module_of(script), args)


@pytest.mark.parametrize("system", [s for s in SYSTEMS if s[1] not in ("redq", "droq")], ids=system_id)
def test_divergence_stops_training_and_names_the_loss_and_step(system, tmp_path):
    """Rewards of 1e30 are finite, but the squared TD error overflows: the loss becomes inf (UTD 20:
    tests/test_sac_jax.py)."""
    script, preset = system
    args = small_args(script, preset, env_id="HugeRewardAfter300-v0", total_timesteps=2000, learning_starts=100)
    args = dataclasses.replace(args, log_freq=50, eval_freq=0, eval_episodes=1)
    with pytest.raises(FloatingPointError, match=r"losses/qf_loss became NaN/inf at env step (\d+)") as error:
        train_in(tmp_path, module_of(script), args)
    step = int(re.search(r"env step (\d+)", str(error.value)).group(1))
    assert 300 <= step <= 400  # the huge reward enters the buffer at step 300 and is sampled soon after


# Pendulum-v1, 10 deterministic evaluation episodes every 1000 env steps, learning from step 1000, with
# networks of width 128 and batches of 128: half the time of the width-256 defaults on a CPU, and as sure
# to learn (crossq_jax's evaluations from env step 3000 on are the same to within a few points). The
# CrossQ scripts warm their BRN layers up for 1000 train calls only, so that the critics switch from
# BatchNorm to renormalising at env step 2000 and the actor (policy delay 3) at 4000: the last
# evaluations run Batch *Re*normalization, as every real run past 100k updates does.
SMALL_NETWORKS = ["--critic-width", "128", "--actor-width", "128", "--batch-size", "128"]
LEARNING = {
    "crossq_jax.py": [*SMALL_NETWORKS, "--bn-warmup-steps", "1000", "--total-timesteps", "5000"],
    "crossq_td3_jax.py": [*SMALL_NETWORKS, "--bn-warmup-steps", "1000", "--total-timesteps", "6000"],
    "sac_jax.py": [*SMALL_NETWORKS, "--total-timesteps", "8000"],
}


@pytest.mark.slow
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_script_learns_to_swing_the_pendulum_up(script, finished_run):
    scalars = finished_run(
        script,
        *["--env-id", "Pendulum-v1", "--seed", "1", "--learning-starts", "1000", *LEARNING[script]],
        *["--eval-freq", "1000", "--eval-episodes", "10", "--log-freq", "1000"],
        env=OPTIMISED_XLA,
    )
    evals = dict(scalars["eval/episodic_return"])
    assert evals[1000] < -600, evals  # the untrained policy lets it hang ...
    assert evals[max(evals)] >= -300, evals  # ... the trained one swings it up and holds it, after the switch


@pytest.mark.parametrize("utd,policy_delay", [(1, 3), (5, 2), (7, 3), (2, 5), (20, 20), (6, 1), (200, 3)])
def test_the_actor_follows_every_policy_delay_th_critic_update_of_the_run(utd, policy_delay):
    """Whatever --utd and --policy-delay, after each env step the actor has been updated once for every
    `policy_delay`-th of the run's critic updates so far (its BRN layers counted as many train-mode calls), and a
    step's program stays one of at most `policy_delay` compiled ones."""
    module = module_of("crossq_jax.py")
    args = small_args(module, utd=utd, policy_delay=policy_delay)
    initial = module.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    buffer, leads = filled_buffer(module, args), set()
    for n, (agent, _) in enumerate(module_learning_steps(module, args, initial, buffer, 7), start=1):
        leads.add(lead_of(args, args.learning_starts + n))
        actor_updates = n * utd // policy_delay
        assert int(agent.critic.step) == n * utd and int(agent.actor.step) == actor_updates, n
        counters = jax.tree.leaves(agent.actor.batch_stats["Normalization_0"]["BatchRenorm_0"]["steps"])
        assert all(int(c) == actor_updates for c in counters), n
    assert len(leads) <= policy_delay


# ---------------------------------------------------------------------------------------------
# A script copied alone into another project: it trains; what needs crossq_utils.py says so
# ---------------------------------------------------------------------------------------------
ALONE_FLAGS = [
    *["--env-id", "Pendulum-v1", "--total-timesteps", "400", "--learning-starts", "200", "--batch-size", "32"],
    *["--critic-width", "16", "--actor-width", "16", "--buffer-size", "1000", "--eval-freq", "200"],
    *["--eval-episodes", "2", "--log-freq", "100", "--save-model"],
]
MODULE_FLAGS = {  # each flag that goes beyond CleanRL, as a user would give it
    "--checkpoint-freq": ["--checkpoint-freq", "100"],
    "--resume": ["--resume", "runs/x"],
    "--eval-model": ["--eval-model", "runs/x"],
    "--q-bias-freq": ["--q-bias-freq", "100", "--env-id", "Pendulum-v1"],
    "--env-id dm_control/...": ["--env-id", "dm_control/reacher-easy"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_script_copied_alone_trains_as_in_the_repository_and_refuses_the_module_flags_in_one_line(script, tmp_path):
    """Copied alone into an empty folder, a script trains a tiny run with --save-model and prints the evaluations
    and losses it prints inside the repository. Each flag that needs crossq_utils.py is refused in one line that
    names the file, exit 2, before anything is written."""
    alone, inside = tmp_path / "alone", tmp_path / "inside"
    alone.mkdir(), inside.mkdir()
    shutil.copy(REPO / script, alone)
    env = {key: value for key, value in script_env().items() if key != "PYTHONPATH"}
    copied = subprocess.run(
        [sys.executable, script, *ALONE_FLAGS], cwd=alone, env=env, capture_output=True, text=True, timeout=600
    )
    assert copied.returncode == 0, copied.stderr
    in_repository = run_script(script, *ALONE_FLAGS, cwd=inside)
    assert in_repository.returncode == 0, in_repository.stderr
    # The same lines but for the times, the run's name and the script's path in the evaluation command
    numbers = lambda out: [
        re.sub(r"SPS=\d+ |time_left=\S+|Pendulum-v1__\S+|python \S+", "", line) for line in out.splitlines()
    ]
    assert numbers(copied.stdout) == numbers(in_repository.stdout)
    assert sum("eval/episodic_return=" in line for line in copied.stdout.splitlines()) == 2
    ((run_dir,),) = [run_dirs(alone)]
    assert (run_dir / f"{module_of(script).Args().exp_name}.crossq_model").exists()

    process = subprocess.run(
        [sys.executable, "-c", MAIN_WITH_EACH, str(alone / script), json.dumps(MODULE_FLAGS)],
        cwd=alone,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert process.returncode == 0, process.stderr[-3000:]
    for flag, result in json.loads(process.stdout.splitlines()[-1]).items():
        assert result["status"] == 2, (flag, result["stderr"])
        (line,) = result["stderr"].splitlines()
        assert line == f"error: {flag} needs crossq_utils.py beside {script}: copy it too", line
        assert result["new"] == [], flag
