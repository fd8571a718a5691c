"""memory.estimate: exact parts (parameters, AdamW, EMA), activations equal to a real run's saved tensors, the
simulated peak within 15% of the measured peak on the CPU, model FLOPs, and the preset table's columns."""

import pytest
import torch

import minildm
from minildm import memory, presets
from minildm.config import override


def _shapes(name="toy-shapes", *extra):
    return override(presets.get(name), list(extra))


def _real_saved_bytes(config, batch_size, dtype):
    """Bytes of the distinct storages autograd saves in one real training loss on the CPU (parameters left out)."""
    torch.manual_seed(0)
    model, loss = memory._example_step(config, batch_size, dtype)
    saved = {}

    def pack(tensor):
        saved[tensor.untyped_storage()._cdata] = (tensor.untyped_storage().nbytes(), tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss()
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(size for key, (size, _) in saved.items() if key not in parameters)


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_parts_are_exact_and_activations_equal_a_real_run(precision):
    config = _shapes("ddpm-shapes")  # dropout 0.1, attention at 16 and 8
    estimate = memory.estimate(config, 4, precision)
    params = sum(p.numel() for p in minildm.build_model(config, device="meta").parameters())
    assert estimate.num_parameters == params
    assert (estimate.parameters, estimate.gradients, estimate.optimizer, estimate.ema) == (4 * params, 4 * params,
                                                                                          8 * params, 4 * params)
    assert estimate.activations == _real_saved_bytes(config, 4, memory.PRECISIONS[precision])
    assert estimate.total == 20 * params + estimate.activations
    assert estimate.total * 0.95 < estimate.peak < estimate.total * 1.1


def test_bf16_saves_fewer_activation_bytes_and_ema_false_drops_the_copy():
    config = _shapes()
    fp32, bf16 = memory.estimate(config, 8, "fp32"), memory.estimate(config, 8, "bf16", ema=False)
    assert bf16.activations < 0.9 * fp32.activations
    assert bf16.ema == 0 and bf16.total == bf16.parameters * 4 + bf16.activations


@pytest.mark.parametrize("name, batch_size", [("toy-shapes", 4), ("toy-shapes", 16), ("ddpm-shapes", 4),
                                              ("ddpm-shapes", 16)])
def test_simulated_peak_is_within_15_percent_of_the_measured_peak(name, batch_size):
    # The acceptance test. Measured in a fresh process: VmHWM minus the resident set before the model.
    config = _shapes(name)
    estimate = memory.estimate(config, batch_size)
    measured = memory.measure_peak(config, batch_size)["peak"]
    assert abs(estimate.peak / measured - 1) < 0.15, (estimate.summary(), measured)


def test_flops_are_linear_in_the_batch_and_match_the_known_ddpm_cifar10_count():
    config = _shapes()
    assert memory.estimate(config, 4).flops == 2 * memory.estimate(config, 2).flops
    # DDPM's CIFAR10 UNet: ~6.06 G multiply-adds per forward; forward + backward = 3 forwards, 2 FLOPs each.
    columns = memory.preset_columns("ddpm-cifar10")
    assert 36.0 < float(columns["GFLOP/img"]) < 36.6
    assert columns["state GiB"] == f"{20 * 35_746_307 / 2**30:.2f}"


def test_gradient_checkpointing_keeps_fewer_activations_and_the_same_model_flops():
    plain = memory.estimate(_shapes("ddpm-shapes"), 8)
    checkpointed = memory.estimate(_shapes("ddpm-shapes", "unet.use_checkpoint=true"), 8)
    assert checkpointed.activations < 0.5 * plain.activations
    assert checkpointed.flops == plain.flops  # model FLOPs: the recomputation is not counted
    assert memory.step_flops(_shapes("ddpm-shapes", "unet.use_checkpoint=true"), 8) == plain.flops


def test_preset_columns_cover_denoisers_and_classifiers_and_skip_autoencoders():
    columns = memory.preset_columns("shapes-classifier")
    assert tuple(columns) == memory.COLUMNS == ("state GiB", "act MiB/img", "batch/80GiB", "GFLOP/img")
    assert float(columns["act MiB/img"]) > 0 and int(columns["batch/80GiB"].replace(",", "")) > 1000
    assert memory.preset_columns("ae-kl-f4-shapes") == dict.fromkeys(memory.COLUMNS, "-")
    # Another device: the batch column is named after its memory, and half the memory fits about half the batch.
    half = memory.preset_columns("shapes-classifier", device_gib=40)
    assert tuple(half) == memory.columns(40) == ("state GiB", "act MiB/img", "batch/40GiB", "GFLOP/img")
    ratio = int(columns["batch/80GiB"].replace(",", "")) / int(half["batch/40GiB"].replace(",", ""))
    assert 1.99 < ratio < 2.01 and half["GFLOP/img"] == columns["GFLOP/img"]
    assert tuple(memory.preset_columns("ae-kl-f4-shapes", device_gib=40)) == memory.columns(40)


def test_bad_arguments_say_what_to_use():
    with pytest.raises(ValueError, match="use one of fp32, bf16, fp16"):
        memory.estimate(_shapes(), 2, "half")
    with pytest.raises(ValueError, match="use a denoiser or classifier preset"):
        memory.estimate(presets.get("ae-kl-f4-shapes"), 2)
    with pytest.raises(ValueError, match="must be a positive integer"):
        memory.estimate(_shapes(), 0)
