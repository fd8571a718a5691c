"""The toy MLP denoiser: call contract, shapes, errors, and that it can learn."""

import pytest
import torch

import minildm
from minildm import presets
from minildm.config import MLPConfig
from minildm.mlp import MLPDenoiser


def test_toy_preset_builds_with_the_call_contract():
    model = minildm.build_model(presets.get("toy-2d"))
    x_t = torch.randn(5, 2)
    assert model(x_t, torch.arange(5)).shape == (5, 2)
    assert model(x_t, torch.tensor(7), y=None, context=None).shape == (5, 2)  # scalar t broadcasts


def test_output_depends_on_t_and_every_parameter_gets_a_gradient():
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(hidden=32, num_layers=2, time_dim=16))
    x_t = torch.randn(4, 2)
    assert not torch.allclose(model(x_t, torch.zeros(4, dtype=torch.long)), model(x_t, torch.full((4,), 100)))
    model(x_t, torch.arange(4)).square().sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())


def test_learns_to_predict_noise_on_a_fixed_batch():
    # A few hundred Adam steps must cut the eps-prediction loss on one batch well below its start.
    torch.manual_seed(0)
    model = MLPDenoiser(MLPConfig(hidden=64, num_layers=2, time_dim=16))
    x0 = torch.randn(64, 2) * 0.1 + torch.tensor([1.0, -1.0])
    noise, t = torch.randn(64, 2), torch.randint(0, 50, (64,))
    alpha_bar = torch.cumprod(1 - torch.linspace(1e-4, 0.2, 50), 0)[t][:, None]
    x_t = alpha_bar.sqrt() * x0 + (1 - alpha_bar).sqrt() * noise
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(100):
        loss = (model(x_t, t) - noise).square().mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.2 * losses[0]


@pytest.mark.parametrize("x_t, t, kwargs, message", [
    (torch.randn(3, 3), torch.arange(3), {}, "mlp.data_dim=2"),
    (torch.randn(3, 2), torch.arange(4), {}, "scalar or \\[3\\]"),
    (torch.randn(3, 2), torch.arange(3), {"y": torch.zeros(3, dtype=torch.long)}, "unconditional"),
    (torch.randn(3, 2), torch.arange(3), {"context": torch.randn(3, 1, 4)}, "unconditional"),
])
def test_bad_inputs_raise_clear_errors(x_t, t, kwargs, message):
    model = MLPDenoiser(MLPConfig(hidden=8, num_layers=1, time_dim=8))
    with pytest.raises(ValueError, match=message):
        model(x_t, t, **kwargs)


def test_meta_build_counts_parameters():
    model = minildm.build_model(presets.get("toy-2d"), device="meta")
    config = presets.get("toy-2d").mlp
    h, d, e = config.hidden, config.data_dim, config.time_dim
    expected = (e * h + h + h * h + h) + (d * h + h) + config.num_layers * 2 * (h * h + h) + (h * d + d)
    assert sum(p.numel() for p in model.parameters()) == expected
