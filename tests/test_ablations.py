"""The paper's ablations (Sections 4.4, A.4-A.6): critic activations, LayerNorm instead of BRN, SAC with normalisation
with and without target networks, and the TD3 baseline's two target schedules. Cheap, in-process checks
against numpy re-derivations and against what each arm must (and must not) read."""

import dataclasses

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import ACTION_DIM, OBS_DIM, filled_buffer, learning_steps, small_args, train_steps

import crossq_jax
import crossq_td3_jax
import sac_jax

SCRIPTS = {"crossq_jax": crossq_jax, "crossq_td3_jax": crossq_td3_jax, "sac_jax": sac_jax}
PAPER_ACTIVATIONS = ["relu", "tanh", "elu", "glu", "relu6", "sin", "relu_over_max", "layernormed_relu"]


def plain(module, **overrides):
    """Small args without normalisation layers, whichever the script's default is."""
    return small_args(module, **({"bn_mode": "none"} | overrides))


def flat(tree) -> dict:
    return {"/".join(k): np.asarray(v, np.float64) for k, v in flax.traverse_util.flatten_dict(tree).items()}


def randomised(tree, seed: int):
    """The same pytree with every leaf replaced by N(0.5, 1) noise: no parameter keeps its initial value."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: jnp.asarray(0.5 + rng.normal(size=x.shape), x.dtype), tree)


def trees_equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(np.array_equal, a, b)))


# ---------------------------------------------------------------------------------------------
# numpy re-derivations
# ---------------------------------------------------------------------------------------------


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_layer_norm(x, scale, bias, eps=1e-6):
    """Per sample (over the features of one row): flax.linen.LayerNorm's defaults."""
    mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + eps) * scale + bias


def np_activation(name: str, x, layer_norm=None):
    """What each activation of the authors' sbx/sac/utils.py computes; `layer_norm` = (scale, bias)."""
    relu = np.maximum(x, 0.0)
    if name == "glu":  # flax.linen.glu: first half times the sigmoid of the second half
        half = x.shape[-1] // 2
        return x[..., :half] * np_sigmoid(x[..., half:])
    if name == "relu_over_max":  # one max over the whole tensor: every row and every feature
        return relu / (relu.max() + 1e-6)
    if name == "layernormed_relu":
        return np_layer_norm(relu, *layer_norm)
    return {
        "relu": lambda: relu,
        "tanh": lambda: np.tanh(x),
        "elu": lambda: np.where(x > 0, x, np.expm1(np.minimum(x, 0.0))),
        "relu6": lambda: np.minimum(relu, 6.0),
        "sin": lambda: np.sin(x),
        "gelu": lambda: 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3))),
        "silu": lambda: x * np_sigmoid(x),
    }[name]()


def np_dense(p: dict, name: str, x, member=None):
    kernel, bias = p[f"{name}/kernel"], p[f"{name}/bias"]
    if member is not None:
        kernel, bias = kernel[member], bias[member]
    return x @ kernel + bias


def np_critic(params, obs, actions, activation: str, layer_norm=False, stats=None, eps=1e-3):
    """Every critic of the ensemble, (n_critics, B): [Dense -> (LayerNorm) -> act -> (norm)] x 2 -> Dense.
    With `stats` (the batch_stats), the normalisation layers in eval mode: (x - mu_R) / sqrt(var_R + eps)."""
    p = {k.removeprefix("VmapCritic_0/"): v for k, v in flat(params).items()}
    s = None if stats is None else {k.removeprefix("VmapCritic_0/"): v for k, v in flat(stats).items()}
    n_critics = p["Dense_0/kernel"].shape[0]

    def norm(x, i, k):
        if s is None:
            return x
        prefix = f"Normalization_{k}/BatchRenorm_0"
        mean, var = s[f"{prefix}/mean"][i], s[f"{prefix}/var"][i]
        return (x - mean) / np.sqrt(var + eps) * p[f"{prefix}/scale"][i] + p[f"{prefix}/bias"][i]

    q = []
    for i in range(n_critics):
        x = norm(np.concatenate([obs, actions], -1).astype(np.float64), i, 0)
        for k in range(2):
            x = np_dense(p, f"Dense_{k}", x, i)
            if layer_norm:
                x = np_layer_norm(x, p[f"LayerNorm_{k}/scale"][i], p[f"LayerNorm_{k}/bias"][i])
            ln = f"CriticActivation_{k}/LayerNorm_0"
            x = np_activation(activation, x, (p[f"{ln}/scale"][i], p[f"{ln}/bias"][i]) if ln + "/scale" in p else None)
            x = norm(x, i, k + 1)
        q.append(np_dense(p, "Dense_2", x, i)[:, 0])
    return np.stack(q)


def np_relu_actor(params, obs):
    """The actor's hidden layers with relu, no normalisation: [Dense -> relu] x 2, then the first head."""
    p, x = flat(params), np.asarray(obs, np.float64)
    for k in range(2):
        x = np.maximum(np_dense(p, f"Dense_{k}", x), 0.0)
    return np_dense(p, "Dense_2", x)


def actor_head(module, agent, obs):
    """The actor's first output head before any squashing: the Gaussian mean, or TD3's pre-tanh action."""
    out = agent.actor.apply_fn(module.variables_of(agent.actor), obs, train=False)
    return np.arctanh(np.clip(np.asarray(out, np.float64), -1 + 1e-7, 1 - 1e-7)) if module is crossq_td3_jax else out[0]


# ---------------------------------------------------------------------------------------------
# Critic activations (Figures 8 and 16): each one as the authors define it, in the critics only
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [*PAPER_ACTIVATIONS, "gelu", "silu"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_each_activation_computes_what_its_name_says(script, name):
    module = SCRIPTS[script]
    assert set(PAPER_ACTIVATIONS) <= set(module.CRITIC_ACTIVATIONS)
    x = jnp.asarray(np.random.default_rng(1).normal(scale=3.0, size=(6, 8)), jnp.float32)
    layer = module.CriticActivation(name)
    variables = randomised(layer.init(jax.random.PRNGKey(0), x), seed=2)  # a learned LayerNorm scale and bias
    p = flat(variables.get("params", {}))
    layer_norm = (p["LayerNorm_0/scale"], p["LayerNorm_0/bias"]) if name == "layernormed_relu" else None
    expected = np_activation(name, np.asarray(x, np.float64), layer_norm)
    np.testing.assert_allclose(layer.apply(variables, x), expected, rtol=1e-5, atol=1e-5)
    if name == "relu_over_max":  # the whole tensor's max, not each row's: rows keep their relative scale
        assert np.asarray(layer.apply(variables, x)).max(-1).min() < 0.99


@pytest.mark.parametrize("name", ["tanh", "glu", "relu_over_max", "layernormed_relu"])
@pytest.mark.parametrize("script", SCRIPTS)
def test_the_critic_applies_the_critic_activation_and_the_actor_stays_relu(script, name):
    module = SCRIPTS[script]
    args = plain(module, critic_activation=name)
    agent = module.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    rng = np.random.default_rng(3)
    obs = jnp.asarray(rng.normal(size=(5, OBS_DIM)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, (5, ACTION_DIM)), jnp.float32)
    critic_params = randomised(agent.critic.params, seed=4)
    q = agent.critic.apply_fn({"params": critic_params}, obs, actions, train=False)
    np.testing.assert_allclose(q, np_critic(critic_params, obs, actions, name), rtol=2e-4, atol=2e-4)
    if name == "glu":  # the next Dense sees half the width
        shapes = {k: v.shape for k, v in flat(agent.critic.params).items()}
        half = args.critic_width // 2
        assert shapes["VmapCritic_0/Dense_1/kernel"] == (args.n_critics, half, args.critic_width)
        assert shapes["VmapCritic_0/Dense_2/kernel"] == (args.n_critics, half, 1)

    # The actor: the same parameters as with relu critics, and a relu network whatever the critics use.
    relu_agent = module.create_agent(plain(module), OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert trees_equal(agent.actor.params, relu_agent.actor.params)
    head = actor_head(module, agent, obs)
    np.testing.assert_allclose(head, actor_head(module, relu_agent, obs), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(head, np_relu_actor(agent.actor.params, obs), rtol=1e-4, atol=1e-4)
    # The check has teeth: the same actor with the critics' activation computes something else.
    p, x = flat(agent.actor.params), np.asarray(obs, np.float64)
    for k in range(2):
        x = np_activation("tanh" if name == "tanh" else "sin", np_dense(p, f"Dense_{k}", x))
    assert not np.allclose(head, np_dense(p, "Dense_2", x), atol=1e-3)


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_activation_flag_reaches_the_args(script):
    module = SCRIPTS[script]
    parse = module.parse_args
    args = parse(["--critic-activation", "tanh"])
    assert args.critic_activation == "tanh" and "activation" not in {f.name for f in dataclasses.fields(args)}
    module.check_args(args)  # its refusals: tests/test_refusals.py


# ---------------------------------------------------------------------------------------------
# LayerNorm instead of BRN (Figure 13): crossq_jax.py --bn-mode layernorm
# ---------------------------------------------------------------------------------------------


def test_layernorm_mode_normalises_each_sample_in_the_critic_and_leaves_the_actor_plain():
    args = small_args(crossq_jax, bn_mode="layernorm", critic_width=16)
    crossq_jax.check_args(crossq_jax.parse_args(["--bn-mode", "layernorm"]))
    agent = crossq_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    # The authors' LayerNorm runs: LayerNorm in the critic's two hidden layers, no BRN anywhere, and an
    # actor without any normalisation.
    assert not jax.tree.leaves(agent.critic.batch_stats) and not jax.tree.leaves(agent.actor.batch_stats)
    critic_layers = {k.split("/")[1] for k in flat(agent.critic.params)}
    assert critic_layers == {"Dense_0", "Dense_1", "Dense_2", "LayerNorm_0", "LayerNorm_1"}
    assert {k.split("/")[0] for k in flat(agent.actor.params)} == {"Dense_0", "Dense_1", "Dense_2", "Dense_3"}

    rng = np.random.default_rng(5)
    obs = jnp.asarray(rng.normal(size=(6, OBS_DIM)), jnp.float32)
    actions = jnp.asarray(rng.uniform(-1, 1, (6, ACTION_DIM)), jnp.float32)
    params = randomised(agent.critic.params, seed=6)  # learned LayerNorm scales and biases
    q = agent.critic.apply_fn({"params": params}, obs, actions, train=True)
    np.testing.assert_allclose(q, np_critic(params, obs, actions, "relu", layer_norm=True), rtol=2e-4, atol=2e-4)
    # Per sample: a row's value does not depend on the other rows of the batch, even in train mode.
    for i in range(6):
        alone = agent.critic.apply_fn({"params": params}, obs[i : i + 1], actions[i : i + 1], train=True)
        np.testing.assert_allclose(alone[:, 0], q[:, i], rtol=1e-5, atol=1e-5)

    agent, metrics = train_steps(crossq_jax, args, agent, filled_buffer(crossq_jax, args, terminal_every=5))
    assert int(metrics.nonfinite_step) == -1 and int(agent.critic.step) == 1


# ---------------------------------------------------------------------------------------------
# The SAC side of Figures 8 and 13: normalisation with target networks, and without them (-TN)
# ---------------------------------------------------------------------------------------------


def test_sac_bn_modes_and_target_network_flags_parse():
    args = sac_jax.parse_args(["--bn-mode", "brn", "--no-target-network", "--critic-activation", "tanh"])
    assert (args.bn_mode, args.target_network, args.critic_activation) == ("brn", False, "tanh")
    assert (sac_jax.Args().bn_mode, sac_jax.Args().target_network) == ("none", True)  # plain SAC by default
    for flags, message in [
        (["--bn-mode", "layernorm"], "--bn-mode must be one of none, bn, brn"),
        (["--bn-mode", "brn", "--bn-momentum", "1.0"], "--bn-momentum must lie in"),
    ]:
        with pytest.raises(sac_jax.ConfigError, match=message):
            sac_jax.check_args(sac_jax.parse_args(flags))


def test_with_target_networks_the_target_critic_reads_the_live_critics_running_statistics():
    """The "+BRN with target networks" arm (the authors' `bnstats_live_net`): target parameters, live
    running statistics, normalisation in eval mode. Live and initial statistics are made to differ."""
    args = small_args(sac_jax, bn_mode="brn")
    agent = sac_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    rng = np.random.default_rng(7)
    live_stats = jax.tree.map(  # running means and variances far from their initial 0 and 1
        lambda x: x if x.dtype == jnp.int32 else jnp.asarray(rng.uniform(0.5, 3.0, x.shape), x.dtype),
        agent.critic.batch_stats,
    )
    critic = agent.critic.replace(
        params=randomised(agent.critic.params, seed=8),  # the live critic differs from its target
        target_params=randomised(agent.critic.params, seed=9),
        batch_stats=live_stats,
    )
    agent = agent._replace(critic=critic)
    batch = sac_jax.buffer_sample(
        filled_buffer(sac_jax, args, terminal_every=5), jax.random.PRNGKey(2), args.batch_size
    )
    key = jax.random.PRNGKey(3)
    y = np.asarray(sac_jax.td_target(agent, batch, key, args.gamma, args.target_subset_size))

    action_key, _ = jax.random.split(key)
    mean, log_std = agent.actor.apply_fn(sac_jax.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = sac_jax.sample_tanh_gaussian(mean, log_std, action_key)

    def expected(params, stats):
        next_q = np_critic(params, batch.next_obs, next_actions, "relu", stats=stats).min(0)
        return batch.rewards + args.gamma * (1 - batch.terminations) * (next_q - 1.0 * next_logp)  # alpha = 1

    np.testing.assert_allclose(y, expected(critic.target_params, live_stats), rtol=1e-4, atol=1e-4)
    # The check has teeth: the initial statistics, or the live parameters, give other targets.
    init_stats = sac_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0)).critic.batch_stats
    assert not np.allclose(y, expected(critic.target_params, init_stats), atol=1e-2)
    assert not np.allclose(y, expected(critic.params, live_stats), atol=1e-2)


def test_with_own_target_statistics_they_trail_the_live_ones_by_tau_and_the_target_pass_reads_them():
    """--target-bn-stats polyak (the authors' default, `-bnstats_live_net 0`): the target critics start with a copy
    of the live running statistics, move to tau * live + (1 - tau) * theirs after each critic update (the
    integer call counters aside), and the TD target normalises with them, not with the live ones."""
    args = small_args(sac_jax, bn_mode="bn", bn_momentum=0.9, tau=0.3, target_bn_stats="polyak")
    agent = sac_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert trees_equal(agent.critic.target_batch_stats, agent.critic.batch_stats)
    before = jax.tree.map(np.asarray, agent.critic.target_batch_stats)
    agent, _ = train_steps(sac_jax, args, agent, filled_buffer(sac_jax, args, terminal_every=5))
    live, own = flat(agent.critic.batch_stats), flat(agent.critic.target_batch_stats)
    for keys, value in flax.traverse_util.flatten_dict(before).items():
        if value.dtype.kind == "f":  # by hand (the integer call counters aside)
            path = "/".join(keys)
            np.testing.assert_allclose(own[path], 0.3 * live[path] + 0.7 * value, rtol=1e-5, atol=1e-7)
    input_mean = "VmapCritic_0/Normalization_0/BatchRenorm_0/mean"
    assert not np.allclose(own[input_mean], flat(before)[input_mean])  # they moved

    rng = np.random.default_rng(11)
    own_stats = jax.tree.map(
        lambda x: x if x.dtype == jnp.int32 else jnp.asarray(rng.uniform(0.5, 3.0, x.shape), x.dtype),
        agent.critic.batch_stats,
    )
    critic = agent.critic.replace(target_params=randomised(agent.critic.params, seed=9), target_batch_stats=own_stats)
    agent = agent._replace(critic=critic)
    batch = sac_jax.buffer_sample(
        filled_buffer(sac_jax, args, terminal_every=5), jax.random.PRNGKey(2), args.batch_size
    )
    y = np.asarray(sac_jax.td_target(agent, batch, jax.random.PRNGKey(3), args.gamma, args.target_subset_size))
    mean, log_std = agent.actor.apply_fn(sac_jax.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = sac_jax.sample_tanh_gaussian(mean, log_std, jax.random.split(jax.random.PRNGKey(3))[0])
    alpha = float(jnp.exp(agent.log_alpha.params["log_alpha"]))

    def expected(stats):
        next_q = np_critic(critic.target_params, batch.next_obs, next_actions, "relu", stats=stats, eps=1e-5).min(0)
        return batch.rewards + args.gamma * (1 - batch.terminations) * (next_q - alpha * next_logp)

    np.testing.assert_allclose(y, expected(own_stats), rtol=1e-4, atol=1e-4)
    assert not np.allclose(y, expected(critic.batch_stats), atol=1e-2)  # the live statistics give another target


@pytest.mark.parametrize("target_network", [True, False])
def test_sac_critic_passes_with_and_without_target_networks(target_network):
    """Every stored transition has the same s and s'. -TN: one joint train-mode pass over [s; s'] (the
    input layer's statistics are those of both halves, one train call). With target networks: the
    critic-loss pass sees s alone and the target pass (eval mode) leaves the statistics alone."""
    args = small_args(sac_jax, bn_mode="bn", bn_momentum=0.9, target_network=target_network)
    s, s_next = np.array([1.0, -2.0, 3.0]), np.array([3.0, 2.0, -1.0])
    agent = sac_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_flatten_with_path(agent)[0]]
    assert any("target_params" in p for p in paths) == target_network
    agent, metrics = train_steps(
        sac_jax, args, agent, filled_buffer(sac_jax, args, obs=s, next_obs=s_next, terminal_every=5)
    )
    assert int(metrics.nonfinite_step) == -1
    stats = flat(agent.critic.batch_stats)
    prefix = "VmapCritic_0/Normalization_0/BatchRenorm_0"
    np.testing.assert_array_equal(stats[f"{prefix}/steps"], [1] * args.n_critics)
    halves = (s + s_next) / 2, ((s - s_next) / 2) ** 2  # mean and variance of [s; s'], column by column
    mean, var = halves if not target_network else (s, 0 * s)
    for i in range(args.n_critics):
        np.testing.assert_allclose(stats[f"{prefix}/mean"][i, :OBS_DIM], 0.1 * mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(stats[f"{prefix}/var"][i, :OBS_DIM], 0.9 + 0.1 * var, rtol=1e-5, atol=1e-6)
    # The actor is normalised too (the authors' -bn flag), its statistics moved by its one update.
    actor_steps = [v for k, v in flat(agent.actor.batch_stats).items() if k.endswith("steps")]
    assert actor_steps and all(int(v) == 1 for v in actor_steps)


def test_without_target_networks_the_td_target_comes_from_the_live_critic():
    """-TN without normalisation (the tanh arm of Figure 8): the loss is 0.5 sum_i mean (Q_i(s,a) - y)^2
    with y built from the live critic at (s', a'), under a stop-gradient."""
    args = small_args(sac_jax, target_network=False, critic_activation="tanh")
    agent = sac_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    agent = agent._replace(critic=agent.critic.replace(params=randomised(agent.critic.params, seed=10)))
    assert agent.critic.target_params is None
    batch = sac_jax.buffer_sample(
        filled_buffer(sac_jax, args, terminal_every=5), jax.random.PRNGKey(2), args.batch_size
    )
    key = jax.random.PRNGKey(3)
    loss_fn = lambda p: sac_jax.critic_loss(p, agent, batch, None, key, args)[0]  # target None: the joint pass
    loss, grads = jax.value_and_grad(loss_fn)(agent.critic.params)

    action_key = jax.random.split(key, 3)[0]
    mean, log_std = agent.actor.apply_fn(sac_jax.variables_of(agent.actor), batch.next_obs, train=False)
    next_actions, next_logp = sac_jax.sample_tanh_gaussian(mean, log_std, action_key)
    q_np = lambda o, a: np_critic(agent.critic.params, o, a, "tanh")
    y = batch.rewards + args.gamma * (1 - batch.terminations) * (q_np(batch.next_obs, next_actions).min(0) - next_logp)
    np.testing.assert_allclose(loss, 0.5 * ((q_np(batch.obs, batch.actions) - y) ** 2).mean(1).sum(), rtol=1e-4)
    # No gradient flows through y: the gradient is that of the loss against y frozen.
    y = jnp.asarray(y, jnp.float32)
    frozen = jax.grad(
        lambda p: (
            0.5 * ((agent.critic.apply_fn({"params": p}, batch.obs, batch.actions, train=True) - y) ** 2).mean(1).sum()
        )
    )(agent.critic.params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-5), grads, frozen)


# ---------------------------------------------------------------------------------------------
# The TD3 baseline's target schedules
# ---------------------------------------------------------------------------------------------


def snapshot(tree):
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def assert_polyak(new, old, live, tau):
    expected = jax.tree.map(lambda o, p: (1 - tau) * o + tau * np.asarray(p), old, live)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), new, expected)


@pytest.mark.parametrize("schedule", ["fujimoto", "authors"])
def test_td3_target_schedules_move_the_targets_when_they_should(schedule):
    """fujimoto: target actor and critics move after each delayed actor update (every 2nd critic update
    here). authors: no target actor; the target critics move after every critic update."""
    args = small_args(crossq_td3_jax, bn_mode="none", tau=0.25, policy_delay=2, target_schedule=schedule)
    agent = crossq_td3_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    assert (agent.targets.actor is None) == (schedule == "authors")
    buffer = filled_buffer(crossq_td3_jax, args, terminal_every=5)
    old = snapshot(agent.targets)
    steps = learning_steps(crossq_td3_jax, args, agent, buffer, 4)
    for call, (agent, metrics) in enumerate(steps, start=1):  # noqa: B007 (metrics: after the loop)
        if schedule == "authors":
            assert agent.targets.actor is None
            assert_polyak(agent.targets.critic, old.critic, agent.critic.params, 0.25)
        elif call % 2:
            assert trees_equal(old, agent.targets)
        else:
            assert_polyak(agent.targets.actor, old.actor, agent.actor.params, 0.25)
            assert_polyak(agent.targets.critic, old.critic, agent.critic.params, 0.25)
        old = snapshot(agent.targets)
    assert int(metrics.nonfinite_step) == -1


@pytest.mark.parametrize("schedule", ["fujimoto", "authors"])
def test_td3_next_action_comes_from_the_target_actor_or_the_live_one(schedule):
    args = small_args(crossq_td3_jax, bn_mode="none", tau=0.005, target_schedule=schedule)
    agent = crossq_td3_jax.create_agent(args, OBS_DIM, ACTION_DIM, jax.random.PRNGKey(0))
    batch = crossq_td3_jax.buffer_sample(
        filled_buffer(crossq_td3_jax, args, terminal_every=5), jax.random.PRNGKey(1), 8
    )
    loss = lambda agent: crossq_td3_jax.critic_loss(agent.critic.params, agent, batch, jax.random.PRNGKey(2), args)[0]
    moved = agent._replace(actor=agent.actor.replace(params=randomised(agent.actor.params, seed=11)))
    # Only the live actor changed: the authors' a' follows it, Fujimoto's target actor does not.
    assert (float(loss(agent)) != float(loss(moved))) == (schedule == "authors")


def test_td3_schedule_flags():
    assert crossq_td3_jax.parse_args(["td3"]).target_schedule == "fujimoto"
    assert crossq_td3_jax.parse_args(["td3", "--target-schedule", "authors"]).target_schedule == "authors"
    for flags, message in [
        (["td3", "--target-schedule", "lillicrap"], "--target-schedule must be one of fujimoto, authors"),
        (["--target-schedule", "authors"], "--target-schedule authors needs target networks"),
    ]:
        with pytest.raises(crossq_td3_jax.ConfigError, match=message):
            crossq_td3_jax.check_args(crossq_td3_jax.parse_args(flags))
    crossq_td3_jax.check_args(crossq_td3_jax.parse_args(["--target-schedule", "authors", "--tau", "0.005"]))
