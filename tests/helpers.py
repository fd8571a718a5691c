"""Small helpers shared by the process and sampler tests (tests/ is on sys.path under pytest)."""

import torch

from minildm import schedules
from minildm.diffusion import GaussianDiffusion


def make(name="linear", num_timesteps=1000, **kwargs):
    """A `GaussianDiffusion` with the named schedule."""
    return GaussianDiffusion(schedules.beta_schedule(name, num_timesteps), **kwargs)


def oracle_eps_model(diff, x0):
    """A 'network' that knows the data batch x0 and returns the exact eps of x_t: every pred_x0 is x0.

    Written from the closed form x_t = sqrt(a) x0 + sqrt(1 - a) eps, not with the package's conversions,
    so the tests that use it check those conversions too.
    """
    def model(x_t, t, **kwargs):
        bar = torch.from_numpy(diff.alpha_bar[t.numpy()]).to(x_t.dtype).view(-1, *([1] * (x_t.ndim - 1)))
        return (x_t - bar.sqrt() * x0) / (1 - bar).sqrt()
    return model
