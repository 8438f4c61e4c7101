"""Are the per-step programs of the training scripts the same at another commit? A refactoring that should not
change speed (the layout, say) must leave every jitted function a step runs the same XLA program.

    git worktree add ../before <commit>
    python benchmarks/compare_programs.py ../before

For each script and preset, at critic width 256: the update (`make_train_step`), the store (`buffer_add`, as the
loop jits it) and the action (`explore`), lowered to StableHLO on the same Args and inputs, here and in the other
checkout; prints "same" or "different" per program and exits 1 if any differs."""

import argparse
import sys
from pathlib import Path

import jax
import numpy as np
from throughput import load_script, noise_of, train_step_of  # this folder's benchmark

SYSTEMS = [("crossq_jax.py", []), ("crossq_td3_jax.py", []), ("crossq_td3_jax.py", ["td3"])]
SYSTEMS += [("sac_jax.py", []), ("sac_jax.py", ["redq"]), ("sac_jax.py", ["droq"])]


def programs(module, argv: list[str]) -> dict[str, str]:
    """The StableHLO text of the script's update, store and action for the Args of `argv`."""
    args = module.parse_args(argv)
    env = module.make_env(args.env_id, args.seed)()
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    agent = module.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(args.seed))
    buffer = module.ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
    obs, action, f32 = np.zeros(obs_dim, np.float32), np.zeros(action_dim, np.float32), np.float32
    transition = module.Transition(obs, action, f32(0.0), obs, f32(0.0))
    train_step, noise, key = train_step_of(module, args, action_dim), noise_of(module, args), jax.random.PRNGKey(0)
    return {
        "update": train_step.lower(agent, buffer, module.Metrics.initial(), key, args.learning_starts + 1).as_text(),
        "store": jax.jit(module.buffer_add, donate_argnums=0).lower(buffer, transition).as_text(),
        "action": module.explore.lower(agent.actor, obs[None], key, *noise).as_text(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("baseline", type=Path, help="the other checkout (a git worktree at another commit)")
    options = parser.parse_args()
    if not all((options.baseline / script).is_file() for script, _ in SYSTEMS):
        parser.error(f"{options.baseline}: not a checkout of this repository (no training scripts there)")
    differs = False
    for script, words in SYSTEMS:
        argv = [*words, "--critic-width", "256", "--buffer-size", "100000"]
        ours = programs(load_script(script), argv)
        theirs = programs(load_script(script, options.baseline), argv)
        verdicts = {name: "same" if ours[name] == theirs[name] else "different" for name in ours}
        differs |= "different" in verdicts.values()
        print(f"{' '.join([script, *words])}: " + ", ".join(f"{name} {v}" for name, v in verdicts.items()), flush=True)
    sys.exit(1 if differs else 0)


if __name__ == "__main__":
    main()
