"""Size and write time of a crossq_jax.py checkpoint with a full replay buffer.

    python benchmarks/checkpoint.py                      # Humanoid-v4 sizes, 1M transitions, critic 2048
    python benchmarks/checkpoint.py --capacity 100000    # smaller, quicker

Builds the agent at the paper's widths and a buffer filled with random transitions of the env's
shapes, writes the checkpoint exactly as a run does (crossq_utils.write_checkpoint), reads it back
and prints the file size and the seconds each took.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import crossq_jax as cq
import crossq_utils


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--env-id", default="Humanoid-v4")
    parser.add_argument("--capacity", type=int, default=1_000_000)
    parser.add_argument("--critic-width", type=int, default=2048)
    parser.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    options = parser.parse_args()

    env = cq.gym_make(options.env_id)
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    args = cq.Args(env_id=options.env_id, critic_width=options.critic_width, buffer_size=options.capacity)
    agent = cq.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(0))
    rng = np.random.default_rng(0)
    n = options.capacity
    buffer = cq.ReplayBuffer(
        obs=jnp.asarray(rng.standard_normal((n, obs_dim), np.float32)),
        actions=jnp.asarray(rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)),
        rewards=jnp.asarray(rng.standard_normal(n, np.float32)),
        next_obs=jnp.asarray(rng.standard_normal((n, obs_dim), np.float32)),
        terminations=jnp.zeros(n, jnp.float32),
        position=jnp.zeros((), jnp.int32),
        size=jnp.asarray(n, jnp.int32),
    )
    state = {
        "agent": agent,
        "buffer": crossq_utils.filled_part(buffer),
        "metrics": cq.Metrics.initial(),
        "keys": {"update": jax.random.PRNGKey(1), "explore": jax.random.PRNGKey(2)},
        "obs": np.zeros(obs_dim, np.float32),
        "episode_actions": np.zeros((500, action_dim), np.float32),
    }
    host_state = {"script": "crossq_jax", "run_name": "benchmark", "args": vars(args), "global_step": n}
    with tempfile.TemporaryDirectory(dir=options.dir) as folder:
        path = os.path.join(folder, crossq_utils.CHECKPOINT_FILE)
        start = time.perf_counter()
        crossq_utils.write_checkpoint(cq, path, state, host_state)
        write_seconds = time.perf_counter() - start
        size = os.path.getsize(path)
        start = time.perf_counter()
        with np.load(path) as data:  # what read_checkpoint reads (it checks the host state too, which this lacks)
            arrays = {name: data[name] for name in data.files if name != "__host_state__"}
        crossq_utils.restore(cq, state, arrays)
        read_seconds = time.perf_counter() - start
    print(f"machine: {cpu_model()}, {os.cpu_count()} cores, jax {jax.__version__} ({jax.default_backend()})")
    print(f"{options.env_id}: obs {obs_dim}, actions {action_dim}, {n:,} transitions, critic width {args.critic_width}")
    print(f"checkpoint size: {size / 1e9:.2f} GB ({size / 2**30:.2f} GiB)")
    print(f"write (atomic, fsync'd): {write_seconds:.1f} s   read and restore: {read_seconds:.1f} s")


if __name__ == "__main__":
    main()
