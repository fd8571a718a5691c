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


def fixed_output(output):
    """A "model" that returns the same stored output whatever it is given (the reference fixtures' outputs)."""
    return lambda x_t, t, **kwargs: output


def ldm_model(x, t, context=None):
    """The latent-diffusion fixture's apply_model(x, t, c) (tests/reference/numerics/ldm_schedules.json)."""
    return torch.tanh(0.8 * x + 0.25 * context.mean(dim=(1, 2))[:, None, None, None]
                      + t.float()[:, None, None, None] / 1000)


def decode_parity_weights(folder, meta) -> dict:
    """The state_dict of a parity fixture: its int8 codes q times 2^-e per tensor (tests/reference/README.md)."""
    from safetensors.torch import load_file

    exponents = meta["weight_exponents"]
    codes = load_file(folder / meta["weights_file"])
    return {k: q.to(torch.float32) * 2.0 ** (-exponents[k]) if k in exponents else q for k, q in codes.items()}
