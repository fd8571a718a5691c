"""Scale features of the training loop on the CPU: bf16 autocast, fp16's fallback, gradient checkpointing,
gradient accumulation (one process and two gloo processes), torch.compile."""

import contextlib
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.algorithms.ddp_comm_hooks import default_hooks
from torch.nn.parallel import DistributedDataParallel

import minildm
from minildm import checkpoints, presets, train
from minildm.config import ConfigError, override


def tiny(**extra):
    """toy-shapes shrunk to a 2-level UNet on 16x16 with attention at 8, no dropout (masks are drawn per
    micro-batch, so only a dropout-free net is bit-comparable across accumulation splits)."""
    items = {"unet.channel_mult": "1,2", "unet.attention_resolutions": "8", "unet.dropout": "0",
             "diffusion.num_timesteps": "50", "data.num_samples": "24", "train.batch_size": "8",
             "train.warmup_steps": "2", "train.lr": "1e-3", "train.ema_decay": "0.9", "train.log_every": "0",
             "train.sample_every": "0", "train.save_every": "0"}
    items.update(extra)
    return override(presets.get("toy-shapes"), [f"{k}={v}" for k, v in items.items()])


def run(config, steps=3, **kwargs):
    losses = []
    result = train.train(config, max_steps=steps, device="cpu", verbose=False, resume=False,
                         callback=lambda step, loss: losses.append(loss), **kwargs)
    return result, losses


def max_difference(a, b):
    return max((x - y).abs().max().item() for x, y in zip(a.parameters(), b.parameters()))


# ---------------------------------------------------------------------------------------------
# Mixed precision


def test_precision_settings_per_device():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert train._precision("bf16", cpu) == (torch.bfloat16, False)
    assert train._precision("fp32", cpu) == (None, False) == train._precision("auto", cpu)
    assert train._precision("fp16", cuda) == (torch.float16, True)  # the GradScaler: fp16 only
    assert train._precision("bf16", cuda) == (torch.bfloat16, False)
    with pytest.warns(UserWarning, match=r"needs CUDA; training in fp32 on cpu; bf16 autocast runs on the CPU"):
        assert train._precision("fp16", cpu) == (None, False)


def test_bf16_autocast_trains_on_the_cpu_close_to_fp32(tmp_path):
    (fp32, fp32_losses), (bf16, bf16_losses) = run(tiny()), run(tiny(**{"train.precision": "bf16"}))
    # autocast ran (bf16 rounding changes the numbers) and stayed close (a few 1e-3 relative on the loss)
    assert fp32_losses != bf16_losses
    torch.testing.assert_close(torch.tensor(bf16_losses), torch.tensor(fp32_losses), rtol=3e-2, atol=0)
    assert 0 < max_difference(fp32.model, bf16.model) < 1e-2
    assert all(p.dtype == torch.float32 for p in bf16.model.parameters())  # fp32 master weights


# ---------------------------------------------------------------------------------------------
# Gradient checkpointing


def _gradients(config, seed=0):
    torch.manual_seed(seed)
    model = minildm.build_model(config)
    diffusion = minildm.build_diffusion(config)
    u = config.unet
    g = torch.Generator().manual_seed(1)
    x0 = torch.rand(4, u.in_channels, u.image_size, u.image_size, generator=g) * 2 - 1
    kwargs = {"context": torch.randn(4, 5, u.context_dim, generator=g)} if u.context_dim else {}
    torch.manual_seed(2)  # dropout masks: the checkpointed recomputation must replay them
    loss = diffusion.training_losses(model, x0, torch.tensor([1, 10, 20, 40]), noise=torch.randn_like(x0),
                                     model_kwargs=kwargs)["loss"].mean()
    loss.backward()
    return model


@pytest.mark.parametrize("extra", [{"unet.dropout": "0.1"}, {"unet.context_dim": "16", "unet.dropout": "0.1"}],
                         ids=["attention-block", "spatial-transformer"])
def test_checkpointing_gives_the_plain_models_gradients_and_state_dict(extra):
    plain = _gradients(tiny(**extra))
    checkpointed = _gradients(tiny(**extra, **{"unet.use_checkpoint": "true"}))
    blocks = [m for m in checkpointed.modules() if getattr(m, "use_checkpoint", False)]
    assert len(blocks) >= 8  # every ResBlock and attention / transformer block
    assert plain.state_dict().keys() == checkpointed.state_dict().keys()
    for (name, p), q in zip(plain.named_parameters(), checkpointed.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-5, atol=1e-7, msg=name)
    # and a plain model loads a checkpointed model's weights strictly (official checkpoints load either way)
    plain.load_state_dict(checkpointed.state_dict(), strict=True)


# ---------------------------------------------------------------------------------------------
# Gradient accumulation


def test_accumulation_equals_one_big_batch():
    (big, big_losses), (accumulated, losses) = run(tiny()), run(tiny(**{"train.grad_accum": "4"}))
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(big_losses), rtol=1e-5, atol=0)
    error = max_difference(big.model, accumulated.model)
    assert error < 1e-5, error  # float rounding of the summed micro-batch gradients (1.4e-6 measured)
    assert max_difference(big.model, minildm.build_model(tiny())) > 1e-3  # it trained


def test_batch_that_does_not_divide_is_a_clear_error():
    with pytest.raises(ConfigError, match=r"train.grad_accum=3 must divide train.batch_size=8.*change either"):
        tiny(**{"train.grad_accum": "3"})
    with pytest.raises(ConfigError, match=r"train.grad_accum=0 must be an integer >= 1"):
        tiny(**{"train.grad_accum": "0"})
    with pytest.raises(ConfigError, match=r"not divisible by train.grad_accum=2 x 2 process\(es\) = 4.*multiple of it"):
        train.micro_batch_size(6, 2, 2)
    assert train.micro_batch_size(32, 4, 2) == 4


def test_two_gloo_processes_with_accumulation_match_one_process(tmp_path):
    # DDP with no_sync on all but the last micro-batch: 2 processes x 2 micro-batches of 8 = one batch of 32.
    # (Equal weights would also come from an all-reduce per micro-batch: the next test counts the all-reduces.)
    overrides = ["mlp.hidden=64", "data.num_samples=256", "train.batch_size=32", "train.warmup_steps=2",
                 "train.lr=1e-3", "train.ema_decay=0.5", "train.save_every=100", "train.log_every=0"]
    env = {**os.environ, "MINILDM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minildm", "train", "toy-2d", *overrides, "train.grad_accum=2", "--max-steps", "3",
               "--device", "cpu", "--out", str(tmp_path / "two"), "--quiet"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    one = train.train(override(presets.get("toy-2d"), overrides), max_steps=3, out_dir=tmp_path / "one",
                      device="cpu", verbose=False)
    two = checkpoints.load(tmp_path / "two" / train.CHECKPOINT)
    assert two.metadata["extra"]["world_size"] == 2
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)


ACCUMULATING = ["mlp.hidden=64", "data.num_samples=128", "train.batch_size=32", "train.grad_accum=2",
                "train.warmup_steps=1", "train.log_every=0", "train.save_every=0", "train.sample_every=0"]


def _all_reduces_per_step(rank, folder):
    """One of 2 gloo processes (torch.multiprocessing.spawn): train.train with grad_accum=2 through a DDP whose
    comm hook records the gradient bucket of every all-reduce; rank 0 writes the indices, step by step, to
    folder/all_reduces.json: once as trained, once with no_sync made a no-op (the control: a missing no_sync)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", MINILDM_PROGRESS="0")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", store=dist.FileStore(os.path.join(folder, "store"), 2), rank=rank, world_size=2)
    buckets, results = [], {}

    def counting_hook(state, bucket):
        buckets.append(bucket.index())
        return default_hooks.allreduce_hook(state, bucket)

    class CountingDDP(DistributedDataParallel):
        def __init__(self, module, **kwargs):
            super().__init__(module, **kwargs)
            self.register_comm_hook(None, counting_hook)

    class SyncingDDP(CountingDDP):  # all-reduces on every micro-batch
        def no_sync(self):
            return contextlib.nullcontext()

    def after_step(step, loss):  # train.train calls it on rank 0 after each optimizer step
        results[name].append(buckets[:])
        buckets.clear()

    config = override(presets.get("toy-2d"), ACCUMULATING)
    try:
        for name, ddp in (("no_sync", CountingDDP), ("without no_sync", SyncingDDP)):
            train.DistributedDataParallel, results[name] = ddp, []  # the spawned process's own train module
            train.train(config, max_steps=3, device="cpu", verbose=False, resume=False, out_dir=folder,
                        callback=after_step)
    finally:
        dist.destroy_process_group()
    if rank == 0:
        with open(os.path.join(folder, "all_reduces.json"), "w") as file:
            json.dump(results, file)


def test_accumulation_under_ddp_all_reduces_once_per_optimizer_step(tmp_path):
    # 2 processes x 2 micro-batches: DDP's no_sync on the first micro-batch leaves one all-reduce of each gradient
    # bucket per optimizer step (the MLP's 32k parameters fill one bucket, index 0), not one per micro-batch.
    mp.spawn(_all_reduces_per_step, args=(str(tmp_path),), nprocs=2)
    counts = json.loads((tmp_path / "all_reduces.json").read_text())
    assert counts["no_sync"] == [[0], [0], [0]]
    assert counts["without no_sync"] == [[0, 0], [0, 0], [0, 0]]  # the control: the hook sees a missing no_sync


# ---------------------------------------------------------------------------------------------
# torch.compile


def test_compiled_steps_match_eager():
    # Inductor compiles forward and backward with the machine's C++ compiler. The MLP denoiser of toy-2d keeps
    # this to ~20 s on 2 CPU cores (the 2-level UNet of `tiny` took 90 s: Inductor's compile time, not the step).
    config = override(presets.get("toy-2d"), ["mlp.hidden=64", "data.num_samples=64", "train.batch_size=16",
                                              "train.warmup_steps=1", "train.lr=1e-3", "train.log_every=0",
                                              "train.save_every=0"])
    eager, eager_losses = run(config, steps=3)
    compiled, compiled_losses = run(override(config, ["train.compile=true"]), steps=3)
    torch.testing.assert_close(torch.tensor(compiled_losses), torch.tensor(eager_losses), rtol=1e-4, atol=0)
    assert max_difference(eager.model, compiled.model) < 1e-5
    assert eager_losses[0] != eager_losses[-1]  # the steps trained
