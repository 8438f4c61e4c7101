"""Envs that break gymnasium's contract, for the refusal tests: a script given `--env-id broken_envs:<id>` imports
this module (the tests put tests/ on the path), which registers them."""

import gymnasium as gym
import numpy as np


class MalformedStep(gym.Env):
    """Observes 3 numbers at reset, then 2 at every step: a shape its observation space does not allow."""

    observation_space = gym.spaces.Box(-1.0, 1.0, (3,), np.float32)
    action_space = gym.spaces.Box(-1.0, 1.0, (1,), np.float32)

    def reset(self, *, seed=None, options=None):
        super().reset(seed=seed)
        return np.zeros(3, np.float32), {}

    def step(self, action):
        return np.zeros(2, np.float32), 0.0, False, False, {}


gym.register("MalformedStep-v0", entry_point=MalformedStep)
