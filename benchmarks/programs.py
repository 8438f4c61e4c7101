"""The programs XLA runs for one env step of each training script, and how many kernels each holds.

    python benchmarks/programs.py                        # every script and preset at critic width 256
    python benchmarks/programs.py --widths 16 2048 --scripts crossq
    python benchmarks/programs.py --compare ../before    # the same programs as another checkout (a worktree)?

A learning env step runs two jitted calls: `store` (the transition into the replay buffer) and `train_step` (the
step's updates, then the next action), compiled once per `lead` (the step's critic updates before the first one the
actor follows) that the script's schedule holds; `explore` draws the first action after the random warm-up. Each is
compiled for this machine's default backend (run it on a GPU for the GPU's programs) and its optimised HLO counted
outside fused computations: fusions, unfused dots, custom calls (cuBLAS on a GPU), copies, conditionals and loops, and
"kernels", every instruction that does work (parameters, constants, tuples and bitcasts do none). On a CPU, JAX draws
random numbers with rolled loops that a GPU build does not have: there `while` counts those too.

With --compare, each program is lowered to StableHLO here and in the other checkout on the same Args instead,
and compared: a refactoring that should not change speed must leave them the same (exit 1 if any differs).
"""

import argparse
import itertools
import math
import re
import sys
from collections import Counter
from pathlib import Path

import jax
import numpy as np
from throughput import REPO, VARIANTS, lead_of, load_script, noise_of  # this folder's benchmark

COUNTED = ("kernels", "fusion", "dot", "custom-call", "copy", "conditional", "while")
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "opt-barrier", "after-all"}
# One instruction of HLO text: `%name = <shape> opcode(operands), attributes` (the shape may hold spaces).
INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%[\w.\-]+ = .*? ([a-z][a-z0-9\-]*)\(")


def step_programs(module, argv: list[str]) -> dict[str, "jax.stages.Traced"]:
    """The script's per-step programs for the Args of `argv`, traced on zero inputs of the env's shapes: the store,
    the first action, and the train step of each `lead` (critic-only updates before the actor's) in one cycle of its
    schedule."""
    args = module.parse_args(argv)
    env = module.make_env(args.env_id, args.seed)()
    obs_dim, action_dim = env.observation_space.shape[0], env.action_space.shape[0]
    env.close()
    agent = module.create_agent(args, obs_dim, action_dim, jax.random.PRNGKey(args.seed))
    buffer = module.ReplayBuffer.create(args.buffer_size, obs_dim, action_dim)
    keys = {"update": jax.random.PRNGKey(1), "explore": jax.random.PRNGKey(2)}
    obs, step_data = np.zeros((1, obs_dim), np.float32), np.zeros(3 * obs_dim + action_dim + 2, np.float32)
    noise = noise_of(args)
    programs = {
        "store": jax.jit(module.store_step, donate_argnums=0).trace(buffer, step_data),
        "explore": module.explore.trace(agent.actor, obs, keys["explore"], *noise),
    }
    train_step = module.make_train_step(args, action_dim)
    cycle = args.policy_delay // math.gcd(args.policy_delay, args.utd)  # env steps until the pattern repeats
    steps = range(args.learning_starts + 1, args.learning_starts + cycle + 1)
    for lead in dict.fromkeys(lead_of(args, step) for step in steps):
        inputs = (agent, module.Metrics.initial(), buffer, keys, obs)
        programs[f"train_step: lead {lead}"] = train_step.trace(*inputs, lead)
    return programs


def count_ops(hlo: str) -> Counter:
    """COUNTED in an optimised HLO module's text, fused computations left out (a fusion is one kernel)."""
    counts, fused = Counter(), False
    for line in hlo.splitlines():
        if line.startswith(("%", "ENTRY")) and line.rstrip().endswith("{"):  # a computation begins
            fused = line.startswith("%fused")
        elif not fused and (match := INSTRUCTION.match(line)):
            opcode = match.group(1)
            counts[opcode] += 1
            counts["kernels"] += opcode not in FREE
    return Counter({name: counts[name] for name in COUNTED})


def program_counts(module, argv: list[str]) -> dict[str, Counter]:
    return {name: count_ops(traced.lower().compile().as_text()) for name, traced in step_programs(module, argv).items()}


def compare(options) -> None:
    """--compare: "same" or "different" per program, here against the other checkout; exit 1 if any differs."""
    if not all((options.compare / script).is_file() for script, *_ in VARIANTS.values()):
        sys.exit(f"--compare {options.compare}: not a checkout of this repository (no training scripts there)")
    differs = False
    for width, name in itertools.product(options.widths, options.scripts):
        script, words = VARIANTS[name][:2]
        argv = [*words, "--env-id", options.env_id, "--critic-width", str(width), "--buffer-size", "100000"]
        ours, theirs = (step_programs(load_script(script, repo), argv) for repo in (REPO, options.compare))
        text = lambda programs, name: programs[name].lower().as_text() if name in programs else None
        verdicts = {name: "same" if text(ours, name) == text(theirs, name) else "different" for name in ours | theirs}
        differs |= set(verdicts.values()) != {"same"}
        print(f"{' '.join([script, *words])} at width {width}: " + ", ".join(f"{p} {v}" for p, v in verdicts.items()))
    sys.exit(1 if differs else 0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[256], help="critic widths (default 256)")
    parser.add_argument("--scripts", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--env-id", default="Hopper-v4")
    parser.add_argument("--compare", type=Path, help="another checkout: compare its per-step programs with ours")
    options = parser.parse_args()
    if options.compare:
        compare(options)
    devices = ", ".join(sorted({f"{d.platform}:{d.device_kind}" for d in jax.devices()}))
    print(f"jax {jax.__version__} ({devices}); {options.env_id}, batch 256, the presets' defaults otherwise\n")
    print("| script | critic width | program | " + " | ".join(COUNTED) + " |")
    print("|---|---|---|" + "---|" * len(COUNTED))
    for width, name in itertools.product(options.widths, options.scripts):
        script, words = VARIANTS[name][:2]
        argv = [*words, "--env-id", options.env_id, "--critic-width", str(width), "--buffer-size", "100000"]
        for program, counts in program_counts(load_script(script), argv).items():
            label = " ".join([script, *words])
            print(
                f"| {label} | {width} | {program} | " + " | ".join(str(counts[c]) for c in COUNTED) + " |", flush=True
            )


if __name__ == "__main__":
    main()
