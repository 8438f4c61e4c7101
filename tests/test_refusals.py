"""Runs that cannot run are refused in one line, before anything is allocated or compiled.

Each script gets every input below on its command line and must exit with status 2, print exactly
one line on stderr and leave no new file or folder behind. To keep this cheap, one Python process
per script feeds it all the inputs in turn (conftest.run_main_with_each).
A run that diverges is refused differently: exit 1, with a line that blames the training, not the env.
"""

import io

import pytest
from conftest import SCRIPTS, module_of, run_main_with_each, run_script

# Inputs once seen to fail badly, then inputs found since, for every script: {id: command line}.
REFUSED = {
    # The table: an allocator traceback, an OOM kill, numpy's seed error, an inf learning rate.
    "buffer-of-1e9": ["--buffer-size", "1000000000"],
    "buffer-of-1e12": ["--buffer-size", "1000000000000"],
    "critic-width-1e8": ["--env-id", "Hopper-v4", "--critic-width", "100000000"],
    "seed-negative": ["--seed", "-1"],
    "learning-rate-inf-in-float32": ["--learning-rate", "1e300"],
    # numpy takes seeds up to 2**32 - 1.
    "seed-2**32": ["--seed", "4294967296"],
    # 0 in float32: Adam would never move the parameters.
    "learning-rate-0-in-float32": ["--learning-rate", "1e-50"],
    # 1 in float32: Adam's bias correction 1 - b1**t divides by zero.
    "adam-b1-1-in-float32": ["--adam-b1", "0.99999999999"],
    # The env step reaches the jitted update as an int32.
    "total-timesteps-over-int32": ["--total-timesteps", "3000000000"],
    # 3e9 critic updates: the update counters (int32) would wrap.
    "updates-over-int32": ["--utd", "1000", "--total-timesteps", "3000000"],
    # Compared with the int32 update counter inside the jitted update.
    "policy-delay-over-int32": ["--policy-delay", "3000000000"],
    # A billion critics.
    "n-critics-1e9": ["--n-critics", "1000000000"],
    # A width beyond int64: no shape can hold it.
    "critic-width-over-int64": ["--critic-width", "99999999999999999999999"],
    # The run's folder and model file are named after it: it would have failed at the end, writing the model.
    "exp-name-with-a-slash": ["--exp-name", "a/b", "--save-model"],
    "exp-name-dot-dot": ["--exp-name", ".."],
    "exp-name-too-long": ["--exp-name", "x" * 250],
    "critic-activation-unknown": ["--critic-activation", "swish"],
}
REFUSED_BY_SCRIPT = {
    "crossq_jax.py": {
        "bn-momentum-1-in-float32": ["--bn-momentum", "0.99999999999"],
        "bn-warmup-over-int32": ["--bn-warmup-steps", "3000000000"],
        # The critics evaluate all the Q-bias states in one pass.
        "q-bias-samples-1e11": ["--q-bias-freq", "1000", "--q-bias-samples", "100000000000"],
    },
    "crossq_td3_jax.py": {
        "bn-warmup-over-int32": ["--bn-warmup-steps", "3000000000"],
        "exploration-noise-inf-in-float32": ["--exploration-noise", "1e39"],
        "td3-tau-0-in-float32": ["td3", "--tau", "1e-50"],
        "q-bias-samples-1e11": ["--q-bias-freq", "1000", "--q-bias-samples", "100000000000"],
    },
    "sac_jax.py": {
        "tau-0-in-float32": ["--tau", "1e-50"],
        "dropout-1-in-float32": ["droq", "--dropout-rate", "0.99999999999"],
        # Own target statistics need target critics with normalisation layers.
        "target-bn-stats-without-bn": ["--target-bn-stats", "polyak"],
        "target-bn-stats-without-targets": ["--target-bn-stats", "polyak", "--bn-mode", "bn", "--no-target-network"],
    },
}
# Envs a script cannot drive: refused in one line that names the env, not a flag.
REFUSED_ENVS = {
    "env-discrete-actions": (["--env-id", "CartPole-v1"], "has a Discrete action space"),
    "env-unknown": (["--env-id", "NoSuchEnv-v0"], "cannot make env 'NoSuchEnv-v0'"),
    "env-unknown-module": (["--env-id", "nosuchmodule:Foo-v0"], "cannot make env 'nosuchmodule:Foo-v0'"),
    "env-malformed-step": (["--env-id", "broken_envs:MalformedStep-v0"], "does not reset and step as its spaces say"),
    # A module flag without crossq_utils.py beside the script: see test_scripts.py's copied-alone test
}
CASES = [(script, name) for script in SCRIPTS for name in [*REFUSED, *REFUSED_BY_SCRIPT[script]]]


@pytest.fixture(scope="module")
def refusals(tmp_path_factory):
    """`refusals(script)`: {input id: its exit status, stderr and new files}, one process per script."""
    results = {}

    def of(script: str) -> dict:
        if script not in results:
            inputs = {
                **REFUSED,
                **REFUSED_BY_SCRIPT[script],
                **{name: argv for name, (argv, _) in REFUSED_ENVS.items()},
            }
            results[script] = run_main_with_each(script, inputs, cwd=tmp_path_factory.mktemp("refusals"))
        return results[script]

    return of


@pytest.mark.parametrize("script,name", CASES, ids=[f"{script[:-3]}-{name}" for script, name in CASES])
def test_a_run_that_cannot_run_is_refused_in_one_line_and_leaves_nothing(refusals, script, name):
    result = refusals(script)[name]
    lines = result["stderr"].splitlines()
    assert result["status"] == 2, result["stderr"]
    assert len(lines) == 1 and lines[0].startswith("error: --"), result["stderr"]  # it names the flag
    assert result["new"] == []


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize("name", REFUSED_ENVS)
def test_an_env_that_cannot_be_driven_is_refused_in_one_line_and_leaves_nothing(refusals, script, name):
    result = refusals(script)[name]
    assert result["status"] == 2, result["stderr"]
    (line,) = result["stderr"].splitlines()
    assert line.startswith("error: ") and REFUSED_ENVS[name][1] in line, line
    assert result["new"] == []


# Values check_args refuses, with the words of its message: every script, then each script's own flags.
BAD_VALUES = [
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
    (["--adam-b1", "1"], "--adam-b1 must lie in [0, 1)"),
    (["--utd", "0"], "--utd must be positive"),
    (["--policy-delay", "0"], "--policy-delay must be positive"),
    (["--critic-activation", "swish"], "--critic-activation must be one of relu, tanh, elu, glu"),
    (["--critic-activation", "glu", "--critic-width", "255"], "--critic-activation glu halves"),
]
BAD_VALUES_BY_SCRIPT = {
    "crossq_jax.py": [],
    "crossq_td3_jax.py": [
        (["--policy-noise", "-0.1"], "--policy-noise must not be negative"),
        (["--noise-clip", "-0.5"], "--noise-clip must not be negative"),
        (["--exploration-noise", "-0.1"], "--exploration-noise must not be negative"),
        (["--tau", "0"], "--tau must lie in (0, 1]"),
        (["td3", "--tau", "1.5"], "--tau must lie in (0, 1]"),
    ],
    "sac_jax.py": [
        (["redq", "--target-subset-size", "11"], "--target-subset-size must lie between 1 and --n-critics (10)"),
        (["--target-subset-size", "0"], "--target-subset-size must lie between 1 and --n-critics (2)"),
        (["--n-critics", "1"], "--target-subset-size must lie between 1 and --n-critics (1)"),
        (["--tau", "0"], "--tau must lie in (0, 1]"),
        (["--tau", "1.5"], "--tau must lie in (0, 1]"),
        (["droq", "--dropout-rate", "1.0"], "--dropout-rate must lie in [0, 1)"),
        (["droq", "--dropout-rate", "-0.1"], "--dropout-rate must lie in [0, 1)"),
        (["redq", "--utd", "0"], "--utd must be positive"),
    ],
}
BAD_VALUE_CASES = [(script, *case) for script in SCRIPTS for case in BAD_VALUES + BAD_VALUES_BY_SCRIPT[script]]


@pytest.mark.parametrize(
    "script,argv,message", BAD_VALUE_CASES, ids=[f"{s[:-3]}-{' '.join(a)}" for s, a, _ in BAD_VALUE_CASES]
)
def test_a_bad_value_is_refused_with_a_message_that_names_its_flag(script, argv, message):
    module = module_of(script)
    with pytest.raises(module.ConfigError) as error:
        module.check_args(module.parse_args(argv))
    assert message in str(error.value)


@pytest.mark.parametrize("script", SCRIPTS)
def test_memory_refusals_name_the_flag_and_the_figures(refusals, script):
    results = refusals(script)
    for name, flag in [("buffer-of-1e9", "--buffer-size"), ("critic-width-1e8", "--critic-width")]:
        (line,) = results[name]["stderr"].splitlines()
        assert line.startswith(f"error: {flag} ") and " needs ~" in line and "GiB" in line, line
        assert "this machine has RAM available:" in line, line


@pytest.mark.parametrize("script", SCRIPTS)
def test_a_policy_that_diverges_is_blamed_not_the_env(script, tmp_path):
    """A learning rate of 1e38 is finite in float32, and the first updates turn the actor's
    parameters into inf/NaN: the next exploration action is NaN, which used to be reported as
    the env returning a NaN observation."""
    flags = [*["--env-id", "Pendulum-v1", "--learning-rate", "1e38", "--total-timesteps", "300"]]
    flags += [*["--learning-starts", "32", "--batch-size", "32", "--critic-width", "32", "--actor-width", "32"]]
    flags += [*["--eval-freq", "0", "--eval-episodes", "1", "--log-freq", "1000"]]
    result = run_script(script, *flags, cwd=tmp_path, timeout=600)
    lines = result.stderr.splitlines()
    assert result.returncode == 1, result.stderr
    assert len(lines) == 1 and lines[0].startswith("error: training diverged"), result.stderr
    assert "returned a NaN" not in lines[0]  # not the env's fault
    step = int(lines[0].split("at env step ")[1].split()[0].rstrip(";:,)"))
    assert 32 < step < 300


VARIANTS = {
    "crossq_jax.py": [{"n_critics": 5}, {"actor_bn": False, "bn_mode": "bn"}, {"bn_mode": "none"}],
    # The TD3 baseline: target networks, no normalisation.
    "crossq_td3_jax.py": [{"n_critics": 5}, {"tau": 0.005, "bn_mode": "none"}, {"critic_activation": "glu"}],
    # REDQ's ensemble; DroQ's critics; BRN without target networks; glu (half the features).
    "sac_jax.py": [
        {"n_critics": 10},
        {"layer_norm": True, "dropout_rate": 0.01},
        {"bn_mode": "brn", "target_network": False},
        {"critic_activation": "glu", "bn_mode": "bn", "actor_bn": False},
        {"critic_activation": "layernormed_relu"},
    ],
}


def nbytes(tree) -> int:
    import jax

    return sum(jax.numpy.asarray(x).nbytes for x in jax.tree.leaves(tree))  # a Python int leaf: an int32 on the device


@pytest.mark.parametrize("script", SCRIPTS)
def test_the_memory_a_run_is_checked_against_is_what_it_allocates(script, monkeypatch):
    """The refusal compares the bytes of the arrays `ReplayBuffer.create` and `create_agent` really allocate (tiny
    sizes, each variant of the networks) with the memory available: it lets a run through with just enough."""
    import importlib

    import jax

    module = importlib.import_module(script[:-3])
    real_open = open

    def meminfo(available: int):  # /proc/meminfo, as the check reads it, with `available` bytes
        lines = f"MemTotal: {2 * available // 1024} kB\nMemAvailable: {available // 1024} kB\n"
        return lambda path, *a, **k: io.StringIO(lines) if path == "/proc/meminfo" else real_open(path, *a, **k)

    for variant in VARIANTS[script]:
        args = module.Args(actor_width=24, critic_width=40, batch_size=64, buffer_size=1000, **variant)
        needed = nbytes(module.ReplayBuffer.create(args.buffer_size, 3, 1))
        needed += nbytes(module.create_agent(args, 3, 1, jax.random.PRNGKey(0)))
        needed = -(-needed // 1024) * 1024  # meminfo counts kB
        monkeypatch.setattr(module, "open", meminfo(needed), raising=False)
        module.check_memory(args, 3, 1)  # just enough
        monkeypatch.setattr(module, "open", meminfo(needed - 1024), raising=False)
        with pytest.raises(module.ConfigError, match=r" needs ~0\.0 GiB .*; this machine has RAM available: 0\.0"):
            module.check_memory(args, 3, 1)
