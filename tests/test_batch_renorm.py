"""Batch Renormalization (Ioffe 2017, as the CrossQ authors' code uses it) in both CrossQ scripts, against an
independent numpy re-derivation."""

import importlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest


@pytest.fixture(params=["crossq_jax", "crossq_td3_jax"])
def brn(request):
    """The BatchRenorm layer of each CrossQ script (each file carries its own copy)."""
    return importlib.import_module(request.param).BatchRenorm


class NumpyBRN:
    """The layer as the BatchRenorm docstring states it, written out in float64 numpy, one batch at a time."""

    def __init__(self, features, momentum=0.99, eps=1e-3, r_max=3.0, d_max=5.0, warmup=100_000):
        self.mu_r, self.var_r, self.steps = np.zeros(features), np.ones(features), 0
        self.m, self.eps, self.r_max, self.d_max, self.warmup = momentum, eps, r_max, d_max, warmup

    def train(self, x, gamma, beta):
        mu_b = x.mean(0)
        var_b = np.maximum((x**2).mean(0) - mu_b**2, 0.0)
        sig_b, sig_r = np.sqrt(var_b + self.eps), np.sqrt(self.var_r + self.eps)
        r = np.clip(sig_b / sig_r, 1 / self.r_max, self.r_max)
        d = np.clip((mu_b - self.mu_r) / sig_r, -self.d_max, self.d_max)
        if self.steps >= self.warmup:
            mean, var = mu_b - d * np.sqrt(var_b) / r, var_b / r**2
        else:
            mean, var = mu_b, var_b
        y = gamma * (x - mean) / np.sqrt(var + self.eps) + beta
        self.mu_r = self.m * self.mu_r + (1 - self.m) * mu_b
        self.var_r = self.m * self.var_r + (1 - self.m) * var_b
        self.steps += 1
        return y

    def eval(self, x, gamma, beta):
        return gamma * (x - self.mu_r) / np.sqrt(self.var_r + self.eps) + beta


def brn_batches(rng, n_batches=8, n=64, features=5):
    """Batches whose distribution shifts halfway, so that r and d leave 1 and 0 and hit their clips."""
    for i in range(n_batches):
        loc, scale = (0.0, 1.0) if i < n_batches // 2 else (4.0, 6.0)
        yield rng.normal(loc, scale, size=(n, features)) * rng.uniform(0.5, 2.0, size=features)


@pytest.mark.parametrize("mode", ["brn", "bn"])
def test_batch_renorm_matches_numpy_across_the_warmup_switch(brn, mode):
    rng = np.random.default_rng(0)
    features, warmup = 5, 3
    limits = {"brn": {"r_max": 3.0, "d_max": 5.0}, "bn": {"r_max": 1.0, "d_max": 0.0}}[mode]
    layer = brn(momentum=0.9, warmup_steps=warmup, **limits)
    reference = NumpyBRN(features, momentum=0.9, warmup=warmup, **limits)
    variables = layer.init(jax.random.PRNGKey(0), jnp.zeros((4, features)), use_running_average=False)
    assert int(variables["batch_stats"]["steps"]) == 0  # init updates nothing
    np.testing.assert_array_equal(variables["batch_stats"]["mean"], 0.0)
    np.testing.assert_array_equal(variables["batch_stats"]["var"], 1.0)
    gamma, beta = rng.uniform(0.5, 2.0, features), rng.normal(size=features)
    params = {"scale": jnp.asarray(gamma, jnp.float32), "bias": jnp.asarray(beta, jnp.float32)}
    stats = variables["batch_stats"]
    renormalised_differs = False
    for x in brn_batches(rng, features=features):
        y, updates = layer.apply(
            {"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32), False, mutable=["batch_stats"]
        )
        plain_bn = (x - x.mean(0)) / np.sqrt(x.var(0) + 1e-3) * gamma + beta
        expected = reference.train(x, gamma, beta)
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-4)
        stats = updates["batch_stats"]
        np.testing.assert_allclose(stats["mean"], reference.mu_r, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(stats["var"], reference.var_r, rtol=1e-5, atol=1e-5)
        assert int(stats["steps"]) == reference.steps
        y_eval = layer.apply({"params": params, "batch_stats": stats}, jnp.asarray(x, jnp.float32), True)
        np.testing.assert_allclose(y_eval, reference.eval(x, gamma, beta), rtol=1e-4, atol=1e-4)
        renormalised_differs |= not np.allclose(expected, plain_bn, atol=1e-2)
    # After the switch, BRN must differ from BN on the shifted batches; plain BN never does.
    assert renormalised_differs == (mode == "brn")


def test_batch_renorm_eval_mode_changes_nothing(brn):
    layer = brn()
    x = jnp.asarray(np.random.default_rng(1).normal(2.0, 3.0, size=(16, 3)), jnp.float32)
    variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)
    _, updates = layer.apply(variables, x, use_running_average=True, mutable=["batch_stats"])
    jax.tree.map(np.testing.assert_array_equal, updates["batch_stats"], variables["batch_stats"])


def test_batch_renorm_gradient_treats_r_and_d_as_constants(brn):
    """d/dx of the layer equals the numpy finite difference with r and d frozen at their values."""
    rng = np.random.default_rng(2)
    layer = brn(warmup_steps=0)  # renormalising from the first call
    stats = {"mean": jnp.asarray([1.5, -2.0]), "var": jnp.asarray([0.2, 4.0]), "steps": jnp.asarray(5)}
    params = {"scale": jnp.asarray([1.3, 0.7]), "bias": jnp.asarray([0.1, -0.2])}
    x = rng.normal(size=(8, 2))
    weights = rng.normal(size=(8, 2))

    def f(x):
        y, _ = layer.apply({"params": params, "batch_stats": stats}, x, False, mutable=["batch_stats"])
        return (y * weights).sum()

    grad = np.asarray(jax.grad(f)(jnp.asarray(x, jnp.float32)))

    mu_r, var_r = np.asarray(stats["mean"], np.float64), np.asarray(stats["var"], np.float64)
    mu_b0, var_b0 = x.mean(0), x.var(0)
    sig_r = np.sqrt(var_r + 1e-3)
    r = np.clip(np.sqrt(var_b0 + 1e-3) / sig_r, 1 / 3, 3)  # frozen
    d = np.clip((mu_b0 - mu_r) / sig_r, -5, 5)  # frozen

    def f_frozen(x):
        mu_b, var_b = x.mean(0), x.var(0)
        mean, var = mu_b - d * np.sqrt(var_b) / r, var_b / r**2
        y = np.asarray(params["scale"]) * (x - mean) / np.sqrt(var + 1e-3) + np.asarray(params["bias"])
        return (y * weights).sum()

    numeric = np.zeros_like(x)
    for idx in np.ndindex(*x.shape):
        step = np.zeros_like(x)
        step[idx] = 1e-6
        numeric[idx] = (f_frozen(x + step) - f_frozen(x - step)) / 2e-6
    np.testing.assert_allclose(grad, numeric, rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("warmup_steps", [0, 100])
def test_a_constant_feature_keeps_the_gradient_finite(brn, warmup_steps):
    """A feature constant over the batch has batch variance 0, where d sqrt(var_B) / d var_B is infinite:
    the gradient with respect to the layer's input must stay finite, in the warm-up and after the switch."""
    layer = brn(warmup_steps=warmup_steps)
    x = jnp.concatenate([jnp.zeros((8, 1)), jnp.arange(8.0)[:, None]], axis=1)
    variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)
    stats = {**variables["batch_stats"], "mean": jnp.asarray([0.5, 0.0]), "steps": jnp.asarray(1)}
    weights = jnp.arange(16.0).reshape(8, 2)

    def f(params, x):
        y, _ = layer.apply({"params": params, "batch_stats": stats}, x, False, mutable=["batch_stats"])
        return (y * weights).sum()

    grads = jax.grad(f, argnums=(0, 1))(variables["params"], x)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)), grads
    assert float(jnp.abs(grads[1][:, 1]).sum()) > 0  # the varying feature still gets a gradient


@pytest.mark.parametrize("activation", [nn.tanh, nn.gelu])
def test_a_saturated_unit_before_the_layer_keeps_the_dense_gradient_finite(brn, activation):
    """Dense -> activation -> BRN with one unit saturated on the whole batch (pre-activation -100): its
    output is constant. Unlike ReLU (whose gradient is a select, masking a NaN), tanh and gelu multiply
    the incoming gradient by their zero slope there, and 0 * inf would make the Dense layer's gradient NaN."""

    class DenseActBRN(nn.Module):
        @nn.compact
        def __call__(self, x):
            return brn(use_running_average=False, warmup_steps=0)(activation(nn.Dense(2)(x)))

    model = DenseActBRN()
    x = jnp.asarray(np.random.default_rng(3).normal(size=(16, 3)), jnp.float32)
    variables = model.init(jax.random.PRNGKey(0), x)
    params = variables["params"]
    params["Dense_0"]["bias"] = jnp.asarray([-100.0, 0.0])  # unit 0 saturates for every row

    def loss(params):
        y, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, mutable=["batch_stats"])
        return (y * jnp.arange(1.0, 33.0).reshape(16, 2)).sum()

    grads = jax.grad(loss)(params)
    assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads)), grads
    assert float(jnp.abs(grads["Dense_0"]["kernel"][:, 1]).sum()) > 0  # the live unit still learns


@pytest.mark.parametrize("script", ["crossq_jax", "crossq_td3_jax", "sac_jax"])
def test_bn_mode_is_flaxs_batchnorm(script):
    """`--bn-mode bn` against flax.linen.BatchNorm (what the authors' plain-BN runs use), train calls and eval,
    with a feature of variance 1e-4: BRN's epsilon of 1e-3 would shrink it to a third instead of normalising it."""
    module = importlib.import_module(script)
    ours = module.Normalization("bn", momentum=0.9)
    flax_bn = nn.BatchNorm(momentum=0.9)
    rng = np.random.default_rng(0)
    scale = np.array([1.0, 3.0, 1e-2], np.float32)  # the last feature's variance: 1e-4
    x0 = jnp.asarray(rng.normal(size=(64, 3)) * scale, jnp.float32)
    ours_vars = ours.init(jax.random.PRNGKey(0), x0, train=False)
    flax_vars = flax_bn.init(jax.random.PRNGKey(0), x0, use_running_average=True)
    ours_stats, flax_stats = ours_vars["batch_stats"], flax_vars["batch_stats"]
    for _ in range(3):
        x = jnp.asarray(rng.normal(loc=0.5, size=(64, 3)) * scale, jnp.float32)
        y, updates = ours.apply({**ours_vars, "batch_stats": ours_stats}, x, train=True, mutable=["batch_stats"])
        expected, flax_updates = flax_bn.apply(
            {**flax_vars, "batch_stats": flax_stats}, x, use_running_average=False, mutable=["batch_stats"]
        )
        np.testing.assert_allclose(y, expected, rtol=1e-4, atol=1e-5)
        ours_stats, flax_stats = updates["batch_stats"], flax_updates["batch_stats"]
        layer = ours_stats["BatchRenorm_0"]
        np.testing.assert_allclose(layer["mean"], flax_stats["mean"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(layer["var"], flax_stats["var"], rtol=1e-5, atol=1e-7)
        assert np.std(np.asarray(y)[:, 2]) > 0.9  # normalised (BRN's epsilon would give about 0.3)
    x = jnp.asarray(rng.normal(size=(8, 3)) * scale, jnp.float32)
    np.testing.assert_allclose(
        ours.apply({**ours_vars, "batch_stats": ours_stats}, x, train=False),
        flax_bn.apply({**flax_vars, "batch_stats": flax_stats}, x, use_running_average=True),
        rtol=1e-4,
        atol=1e-5,
    )
