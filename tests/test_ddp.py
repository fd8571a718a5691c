"""Multi-process training: `torchrun -m minildm train` on 2 CPU processes (gloo) equals 1 process.

The global batch is fixed (train.batch_size=32): one process trains on all 32 samples per step,
two processes on 16 each with DistributedDataParallel averaging the gradients. Same data, t and
noise per sample, so the weights agree up to float rounding of the gradient all-reduce.
"""

import os
import subprocess
import sys

import torch

from minildm import checkpoints, presets, train
from minildm.config import override


OVERRIDES = ["mlp.hidden=64", "data.num_samples=256", "train.batch_size=32", "train.warmup_steps=2",
             "train.lr=1e-3", "train.ema_decay=0.5", "train.save_every=100", "train.log_every=1"]
STEPS = 5


def test_two_gloo_processes_match_one_process_with_the_same_global_batch(tmp_path):
    env = {**os.environ, "MINILDM_PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "minildm", "train", "toy-2d", *OVERRIDES, "--max-steps", str(STEPS), "--device", "cpu",
               "--out", str(tmp_path / "two"), "--quiet"]
    run = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]

    config = override(presets.get("toy-2d"), OVERRIDES)
    one = train.train(config, max_steps=STEPS, out_dir=tmp_path / "one", device="cpu", verbose=False)
    two = checkpoints.load(tmp_path / "two" / train.CHECKPOINT)
    assert two.step == STEPS and two.metadata["extra"]["world_size"] == 2
    initial = train.train(config, max_steps=0, out_dir=tmp_path / "init", device="cpu", verbose=False).model
    for name, value in one.model.state_dict().items():
        torch.testing.assert_close(two.model.state_dict()[name], value, rtol=1e-4, atol=1e-5, msg=name)
        torch.testing.assert_close(two.ema.state_dict()[name], one.ema.state_dict()[name], rtol=1e-4, atol=1e-5)
    # The runs trained (lr 1e-3 for 5 steps moves weights by ~1e-3, far above the tolerance).
    moved = max((a - b).abs().max().item() for a, b in zip(one.model.parameters(), initial.parameters()))
    assert moved > 1e-3
    # Only rank 0 wrote: one log line per step, not two.
    assert len((tmp_path / "two" / "log.jsonl").read_text().splitlines()) == STEPS
