"""What one training step needs: memory (parameters, gradients, AdamW, EMA, activations) and model FLOPs.

    >>> from minildm import memory, presets
    >>> memory.estimate(presets.get("ddpm-cifar10"), batch_size=128, precision="bf16")
    >>> memory.preset_columns("adm-imagenet64")        # the columns of `python -m minildm presets`

Nothing is allocated: the network is built and run (forward, loss, backward) on fake tensors
(`torch._subclasses.FakeTensorMode`: shapes, dtypes and strides without storage), so a paper preset of 860M
parameters costs a second of CPU time. Per process, with P parameters (fp32 master weights, as the loop keeps):

    parameters  4 P bytes
    gradients   4 P            (fp32: autocast computes in bf16/fp16 but the parameters and their grads stay fp32)
    optimizer   8 P            (AdamW's exp_avg and exp_avg_sq)
    ema         4 P            (the EMA copy `train.train` keeps beside the model)
    activations the tensors autograd saves for backward in one forward of the training loss at this batch:
                every tensor a `saved_tensors_hooks` pack hook sees, deduplicated by storage, parameters left
                out, sizes exact for the dtypes autocast picks (bf16 copies of weights and inputs included);
                with gradient checkpointing (`unet.use_checkpoint`) the inputs each checkpointed block keeps
                for its recomputation instead of the block's inside.
    total       the sum: an upper bound of what is held when backward starts (all activations are alive then,
                but `optimizer.zero_grad(set_to_none=True)` has freed the gradients: they grow as backward frees
                the activations). Not a peak: temporaries are left out.
    peak        the most bytes alive at once during two steps (forward, backward, AdamW, EMA update), tensor by
                tensor as each op creates and Python frees them: also the temporaries, the gradients growing
                while activations are freed, AdamW's moments. This is the figure to compare with a device.

FLOPs: `torch.utils.flop_counter.FlopCounterMode` over forward and backward (convolutions, matrix products,
attention; 2 FLOPs per multiply-add; element-wise ops, norms and the optimizer not counted), of the model without
checkpointing: the "model FLOPs" of MFU (Chowdhery et al. 2022, App. B), so recomputation does not raise it.

Left out (why a real peak is higher): the allocator's caching and fragmentation (PyTorch's CUDA caching
allocator, glibc malloc on the CPU), cuDNN / oneDNN workspaces and other buffers inside an op that no tensor
holds, the CUDA context (its size depends on the driver and GPU; not measured here), NCCL buffers and DDP's
gradient buckets (another 4 P bytes under DistributedDataParallel), the data batch in flight, and — for latent
diffusion — the frozen first stage and the conditioner, which this estimate does not build. Activations are those
of the CPU kernels (flash attention on CPU saves the same q, k, v, output and log-sum-exp as on CUDA; other kernels
may differ slightly).
`measure_peak` measures the real peak on the CPU; tests/test_memory.py checks `peak` against it (within 15% for
toy-shapes and ddpm-shapes at batches 4 to 64; 2-core CPU: within -3% .. +12%).
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import os
import subprocess
import sys
import warnings
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.flop_counter import FlopCounterMode

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = ("unet", "classifier", "mlp")  # what `estimate` builds (the autoencoder's step adds LPIPS and a GAN)


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes held by one process's training step at `batch_size` (per process), and its model FLOPs."""

    batch_size: int
    precision: str
    num_parameters: int
    parameters: int
    gradients: int
    optimizer: int
    ema: int
    activations: int
    peak: int  # the most bytes alive at once in two simulated steps (temporaries and gradients included)
    flops: int  # model FLOPs of one step (forward + backward) at batch_size

    @property
    def state(self) -> int:
        """Bytes that do not depend on the batch: parameters + gradients + AdamW moments + EMA (20 P)."""
        return self.parameters + self.gradients + self.optimizer + self.ema

    @property
    def total(self) -> int:
        """state + activations: an upper bound of the bytes held when backward starts (no gradients exist yet
        after zero_grad(set_to_none=True)); `peak` is the figure to compare with a device."""
        return self.state + self.activations

    @property
    def flops_per_image(self) -> float:
        return self.flops / self.batch_size

    def summary(self) -> str:
        """One line in GiB (2^30 bytes) and GFLOPs (10^9)."""
        gib = 2.0**30
        return (f"batch {self.batch_size} {self.precision}: {self.num_parameters:,} parameters; parameters "
                f"{self.parameters / gib:.2f} + gradients {self.gradients / gib:.2f} + AdamW {self.optimizer / gib:.2f}"
                f" + EMA {self.ema / gib:.2f} + activations {self.activations / gib:.2f} = {self.total / gib:.2f} "
                f"GiB (simulated peak {self.peak / gib:.2f} GiB); {self.flops / 1e9:,.1f} GFLOPs per step "
                f"({self.flops_per_image / 1e9:,.2f} per image)")


def estimate(config, batch_size: int, precision: str = "fp32", *, ema: bool = True) -> MemoryEstimate:
    """Memory and model FLOPs of one training step of `config`'s network at `batch_size` examples per process.

    precision: "fp32", or "bf16" / "fp16" autocast of the network as `train.train` applies it (the loss in
    fp32). ema=False: a run without the EMA copy. Runs on fake tensors: nothing of the model's size is allocated.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision={precision!r}; use one of {', '.join(PRECISIONS)} (train.precision 'auto' is "
                         "bf16 on CUDA, fp32 on CPU)")
    if config.model not in MODELS:
        raise ValueError(f"estimate covers the networks of model={' / '.join(MODELS)}, not {config.model!r} (the "
                         "autoencoder's step also runs LPIPS and a discriminator); use a denoiser or classifier preset")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size={batch_size!r} must be a positive integer (examples per process)")
    dtype = PRECISIONS[precision]
    model, loss = _example_step(config, batch_size, dtype, _fake())
    activations, num_parameters = _activation_bytes(model, loss), sum(p.numel() for p in model.parameters())
    flops = _model_flops(model, loss)
    peak = _simulated_peak(config, batch_size, dtype, ema)
    weights = 4 * num_parameters
    return MemoryEstimate(batch_size, precision, num_parameters, parameters=weights, gradients=weights,
                          optimizer=2 * weights, ema=weights if ema else 0, activations=activations, peak=peak,
                          flops=flops)


def step_flops(config, batch_size: int, precision: str = "fp32") -> int:
    """Model FLOPs of one training step (forward + backward, no recomputation) at `batch_size`; fake tensors."""
    return _model_flops(*_example_step(config, batch_size, PRECISIONS[precision], _fake()))


def columns(device_gib: float = 80.0) -> tuple[str, ...]:
    """The keys of `preset_columns(name, device_gib=device_gib)`, in order: the batch column names the GiB."""
    return ("state GiB", "act MiB/img", f"batch/{device_gib:g}GiB", "GFLOP/img")


COLUMNS = columns()  # those of `python -m minildm presets --memory` (an 80 GiB A100 / H100)


def preset_columns(name: str, precision: str = "bf16", device_gib: float = 80.0) -> dict[str, str]:
    """The memory / compute columns of preset `name` for `python -m minildm presets`, as strings, keyed by
    `columns(device_gib)`:

    state GiB:     parameters + gradients + AdamW + EMA (20 bytes per parameter), per GPU
    act MiB/img:   activations saved for backward per image at `precision` (bf16 autocast: the GPU setting)
    batch/<G>GiB:  the largest per-GPU batch whose state + activations fit `device_gib` (80: an A100 / H100),
                   before the allocator's and CUDA's own overheads (see the module docstring)
    GFLOP/img:     model FLOPs of one training step (forward + backward, no recomputation) per image
    Presets whose network `estimate` does not cover (the autoencoders) get "-" in every column.
    """
    from minildm import presets

    config = presets.get(name)
    keys = columns(device_gib)
    if config.model not in MODELS:
        return dict.fromkeys(keys, "-")
    # One fake network (a second or so), two forward passes: activations grow linearly with the batch.
    dtype = PRECISIONS[precision]
    model, loss_one = _example_step(config, 1, dtype, _fake())
    one = _activation_bytes(model, loss_one)
    per_image = _activation_bytes(model, _example_step(config, 2, dtype, model=model)[1]) - one
    flops = _model_flops(model, loss_one)
    state = 20 * sum(p.numel() for p in model.parameters())
    fits = int((device_gib * 2**30 - state - (one - per_image)) // per_image) if per_image > 0 else 0
    values = (f"{state / 2**30:.2f}", f"{per_image / 2**20:,.1f}", f"{max(fits, 0):,}", f"{flops / 1e9:,.1f}")
    return dict(zip(keys, values))


# ---------------------------------------------------------------------------------------------
# The step on fake tensors


def _fake():
    """A FakeTensorMode that lets real tensors (the data) meet fake ones (the network)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    return FakeTensorMode(allow_non_fake_inputs=True)


def _example_step(config, batch_size: int, autocast_dtype, fake=None, model=None):
    """(network, loss closure) of one training step as `train.train` runs it, with the network built under the
    FakeTensorMode `fake` (None: a real network), or `model` reused. The data stay real tensors (the process
    indexes its numpy schedule with t); an op between them and fake weights gives fake tensors."""
    import minildm

    if model is None:
        with fake or contextlib.nullcontext():
            model = minildm.build_model(config).train()
    diffusion = minildm.build_diffusion(config)
    net = getattr(config, config.model)
    if config.model == "mlp":
        shape = (batch_size, net.data_dim)
    else:
        shape = (batch_size, net.in_channels, net.image_size, net.image_size)
    x0, noise = torch.zeros(shape), torch.zeros(shape)
    t = torch.zeros(batch_size, dtype=torch.int64)
    y = torch.zeros(batch_size, dtype=torch.int64)
    kwargs = {}
    if config.model == "unet":
        if net.num_classes:
            kwargs["y"] = y
        if net.super_res:
            low = net.image_size // 4
            kwargs["low_res"] = torch.zeros(batch_size, net.in_channels, low, low)
        if net.context_dim:
            kwargs["context"] = torch.zeros(batch_size, config.latent.cond_length, net.context_dim)

    def network(x, *args, **extra):  # as train.train: autocast around the network, the loss in fp32
        with torch.autocast("cpu", dtype=autocast_dtype) if autocast_dtype else contextlib.nullcontext():
            return model(x, *args, **extra).float()

    def loss():
        if config.model == "classifier":  # train.noisy_classifier_objective
            return F.cross_entropy(network(diffusion.q_sample(x0, t, noise), t), y)
        return diffusion.training_losses(network, x0, t, noise=noise, model_kwargs=kwargs, with_vb=False)["loss"].mean()

    return model, loss


def _activation_bytes(model, loss) -> int:
    """Bytes autograd keeps for backward in one call of `loss` (fake tensors: nothing allocated)."""
    saved = {}  # storage id -> (bytes, a tensor on it: keeps the storage, so its id is not reused)

    def keep(tensor):
        storage = tensor.untyped_storage()
        saved[storage._cdata] = (storage.nbytes(), tensor)

    def pack(tensor):
        keep(tensor)
        return tensor

    def keep_inputs(module, args):  # a checkpointed block holds its inputs for the recomputation
        if getattr(module, "use_checkpoint", False) and torch.is_grad_enabled():
            for arg in args:
                if torch.is_tensor(arg):
                    keep(arg)

    hooks = [m.register_forward_pre_hook(keep_inputs) for m in model.modules() if hasattr(m, "use_checkpoint")]
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss()
    for hook in hooks:
        hook.remove()
    parameters = {p.untyped_storage()._cdata for p in model.parameters()}
    return sum(size for key, (size, _) in saved.items() if key not in parameters)


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensors alive, counted op by op: each new storage an op returns is added, and subtracted when
    Python frees it (a finalizer); `peak` is the highest sum seen. Works on fake tensors (no memory used)."""

    def __init__(self, start: int = 0):
        super().__init__()
        self.live, self.peak, self.seen = start, start, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_flatten(out)[0]:
            if isinstance(tensor, torch.Tensor):
                self._add(tensor.untyped_storage())
        return out

    def _add(self, storage) -> None:
        key = storage._cdata
        if key in self.seen:
            return
        self.seen.add(key)
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key, storage.nbytes())

    def _free(self, key, size) -> None:
        self.seen.discard(key)
        self.live -= size


def _simulated_peak(config, batch_size: int, autocast_dtype, ema: bool) -> int:
    """The highest bytes alive in two training steps (forward, backward, AdamW step, EMA update) on fake tensors:
    what the measured peak would be without allocator overheads. The model (and EMA copy) are alive throughout."""
    fake = _fake()
    model, loss = _example_step(config, batch_size, autocast_dtype, fake)
    with fake, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # deepcopy reads data pointers, which fake tensors warn about
        ema_copy = copy.deepcopy(model).requires_grad_(False) if ema else None
    weights = 4 * sum(p.numel() for p in model.parameters())
    with _LiveBytes(start=weights * (2 if ema else 1)) as tracker:
        _steps(model, ema_copy, loss, 2)  # the second step is the first with AdamW's moments alive
    return tracker.peak


def _steps(model, ema, loss, steps: int) -> None:
    """`steps` training steps as `train.train` runs them: loss().backward(), AdamW step, zero_grad(set_to_none),
    EMA update (ema None: none). The one loop of the estimate (fake tensors) and of `measure_peak` (real ones)."""
    from minildm import train

    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    for _ in range(steps):
        loss().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if ema is not None:
            with torch.no_grad():
                train.update_ema(ema, model, 0.999)


def _model_flops(model, loss) -> int:
    """FLOPs of forward + backward of one call of `loss`, with the gradient checkpointing of `model`'s blocks
    switched off for the count: the "model FLOPs" of MFU leave the recomputation out."""
    blocks = [module for module in model.modules() if getattr(module, "use_checkpoint", False)]
    for block in blocks:
        block.use_checkpoint = False
    try:
        with FlopCounterMode(display=False) as counter:
            loss().backward()
    finally:
        for block in blocks:
            block.use_checkpoint = True
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# Measured peak on the CPU


def measure_peak(config, batch_size: int, precision: str = "fp32", steps: int = 2, timeout: float = 300) -> dict:
    """The real peak memory of `steps` training steps on the CPU, measured in a fresh subprocess.

    Returns {"peak": bytes, "baseline": bytes}: peak = the process's highest resident set (VmHWM) during the steps
    minus its resident set after imports and the batch (the baseline, before the model is built); the steps build
    the model, its EMA copy and AdamW exactly as `train.train` does and run forward, backward and the optimizer
    step (the second step is the first with AdamW's moments allocated). glibc's mmap threshold is fixed at 64 KiB,
    so large blocks go back to the system when freed and the resident set follows the live tensors.
    """
    payload = json.dumps({"config": __import__("minildm.config", fromlist=["to_dict"]).to_dict(config),
                          "batch_size": batch_size, "precision": precision, "steps": steps})
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1", "MINILDM_PROGRESS": "0"}
    run = subprocess.run([sys.executable, "-m", "minildm.memory", payload], env=env, capture_output=True, text=True,
                         timeout=timeout)
    if run.returncode != 0:
        raise RuntimeError(f"the measuring process failed:\n{run.stderr[-3000:]}")
    return json.loads(run.stdout.strip().splitlines()[-1])


def _resident(key: str = "VmRSS") -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {key}: measure_peak needs Linux")


def _measure(payload: dict) -> dict:
    """The subprocess of `measure_peak`: a throwaway step, the baseline, then `steps` real training steps."""
    from minildm import config as config_lib

    torch.set_num_threads(1)
    config = config_lib.from_dict(payload["config"])
    autocast_dtype = PRECISIONS[payload["precision"]]
    torch.manual_seed(0)
    # One step of a throwaway copy first, freed before the baseline: the one-time costs (imports on an optimizer's
    # first use, ~80 MB here; oneDNN's kernels compiled for each convolution shape) are not the step's memory.
    _train_steps(config, payload["batch_size"], autocast_dtype, 1)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)  # give its freed small blocks back too: the baseline holds none
    with open("/proc/self/clear_refs", "w") as clear:  # 5: reset the peak resident set to the current one
        clear.write("5")
    baseline = _resident()
    _train_steps(config, payload["batch_size"], autocast_dtype, payload["steps"])
    return {"peak": _resident("VmHWM") - baseline, "baseline": baseline}


def _train_steps(config, batch_size: int, autocast_dtype, steps: int) -> None:
    """Build the network, its EMA copy and AdamW, and run `steps` steps (forward, backward, AdamW, EMA update)."""
    model, loss = _example_step(config, batch_size, autocast_dtype)
    _steps(model, copy.deepcopy(model).requires_grad_(False), loss, steps)


if __name__ == "__main__":
    print(json.dumps(_measure(json.loads(sys.argv[1]))))
