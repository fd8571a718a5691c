"""Checkpoints: one safetensors file per checkpoint, and the official OpenAI weights.

A minildm checkpoint is a single `.safetensors` file written atomically (temporary file, fsync,
`os.replace`, fsync of the folder), so a crash during a save never leaves a half-written checkpoint
behind; every tensor's CRC-32 is stored and checked when it is read, so a corrupted file is an error,
not silently wrong weights, and non-finite weights are refused instead of written:

    tensors   model.<name>                    the network (guided-diffusion key names)
              ema.<name>                      its exponential moving average (optional)
              optimizer.state.<i>.<name>      AdamW moments and step counts (training checkpoints)
              <module>.<name>                 more networks of the run by name, e.g. discriminator.main.0.weight
              optimizer_<module>.state...     and their optimizers
    metadata  JSON strings in the safetensors header: format, minildm version, step, the resolved
              config (`minildm.config.to_dict`), optimizer param groups, GradScaler state,
              checksums (CRC-32 of every tensor's bytes)

No random-generator state is stored: the training loop draws everything random from (seed, step,
rank), so weights + EMA + optimizer + scaler + step are the whole state of a run (see `minildm.train`).

Why one file: the header is plain JSON that any safetensors reader shows, nothing is unpickled on
load (no code can run from a checkpoint), and weights and trainer state can never get out of step.
`load` reads only the tensors it needs (safetensors maps the file lazily); a checkpoint meant for
sharing is saved without the optimizer (`save(path, model, config, ema=ema)`), a third of the size.

    >>> from minildm import checkpoints
    >>> checkpoints.save("run.safetensors", model, config, ema=ema, step=1000)
    >>> model, config, ema, step, metadata = checkpoints.load("run.safetensors")

Official checkpoints (guided-diffusion, improved-diffusion) are pickled `.pt` state dicts, latent-diffusion's
first stages zipped Lightning checkpoints, its cin256-v2 model and Stable Diffusion v1-4 Lightning `.ckpt` files:
`load_official("adm-imagenet64")` downloads the preset's file (or finds it where you put it), checks its size and
SHA-256 (`fetch_official`, `verify_official`), reads it with `torch.load(weights_only=True)`, converts the keys
and loads them strictly (`latent.load_official` for the latent diffusion presets).
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import json
import os
import pickle
import secrets
import urllib.error
import urllib.parse
import urllib.request
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

import minildm
from minildm import config as config_lib
from minildm import presets

FORMAT = "minildm.checkpoint/1"
RESERVED = ("model", "ema", "optimizer")  # tensor prefixes of the main network; other modules take their own name

# Released files: guided-diffusion README (jul-2021) and improved-diffusion README (march-2021).
_GUIDED = "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/"
_IMPROVED = "https://openaipublic.blob.core.windows.net/diffusion/march-2021/"
OFFICIAL_URLS = {
    **{name: _GUIDED + name for name in (
        "64x64_diffusion.pt", "128x128_diffusion.pt", "256x256_diffusion.pt", "256x256_diffusion_uncond.pt",
        "512x512_diffusion.pt", "64_256_upsampler.pt", "128_512_upsampler.pt", "lsun_bedroom.pt", "lsun_cat.pt",
        "lsun_horse.pt", "lsun_horse_nodropout.pt", "64x64_classifier.pt", "128x128_classifier.pt",
        "256x256_classifier.pt", "512x512_classifier.pt")},
    **{name: _IMPROVED + name for name in (
        "cifar10_uncond_50M_500K.pt", "cifar10_uncond_vlb_50M_500K.pt", "imagenet64_uncond_100M_1500K.pt",
        "imagenet64_uncond_vlb_100M_1500K.pt", "imagenet64_cond_270M_250K.pt", "upsample_cond_500K.pt",
        "lsun_uncond_100M_1200K_bs128.pt", "lsun_uncond_100M_2400K_bs64.pt")},
    # latent-diffusion's first stages (README, scripts/download_first_stages.sh): a zip holding model.ckpt
    **{f"{name}.zip": f"https://ommer-lab.com/files/latent-diffusion/{name}.zip" for name in (
        "kl-f4", "kl-f8", "kl-f16", "kl-f32", "vq-f4", "vq-f4-noattn", "vq-f8", "vq-f8-n256", "vq-f16")},
    # whole latent diffusion models (Lightning .ckpt): latent-diffusion's cin256-v2 (README and
    # scripts/latent_imagenet_diffusion.ipynb, which saves it as models/ldm/cin256-v2/model.ckpt) and Stable
    # Diffusion v1-4 (CompVis README; a gated Hugging Face repository: accept its licence and log in first)
    "cin256-v2.ckpt": "https://ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt",
    "sd-v1-4.ckpt": "https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/resolve/main/sd-v1-4.ckpt",
}


class Published(NamedTuple):
    """Size in bytes and SHA-256 of a released file as its publisher states them (None: not stated)."""

    size: int | None
    sha256: str | None
    source: str


# Only two released files have published figures; every other file is checked against its Content-Length at
# download, a lower bound on its size from the parameter count, and the SHA-256 recorded when it was downloaded.
PUBLISHED = {
    "sd-v1-4.ckpt": Published(4_265_380_512, "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556",
                              "Git LFS pointer of sd-v1-4.ckpt, huggingface.co/CompVis/stable-diffusion-v-1-4-original "
                              "commit 6647636 (the file page shows the same SHA-256, 4.27 GB)"),
    "cin256-v2.ckpt": Published(1_827_378_153, None,
                                "wget log of the download in CompVis/latent-diffusion "
                                "scripts/latent_imagenet_diffusion.ipynb (Length: 1827378153); no checksum published"),
}


class CheckpointError(RuntimeError):
    """A checkpoint file that cannot be read, or whose weights do not fit the model."""


class NonFiniteWeightsError(CheckpointError):
    """Weights that hold NaN or infinite values: from a run that diverged; never written, never loaded."""


class Loaded(NamedTuple):
    """What `load` returns: the rebuilt network (eval mode), its config, the EMA copy (or None), step, metadata."""

    model: torch.nn.Module
    config: config_lib.Config
    ema: torch.nn.Module | None
    step: int
    metadata: dict


# ---------------------------------------------------------------------------------------------
# Saving


def save(path, model, config, *, ema=None, optimizer=None, scaler=None, step=0, extra=None, modules=None,
         optimizers=None) -> Path:
    """Write a checkpoint atomically; returns its path.

    model / ema: modules (a DDP or compiled wrapper is unwrapped). optimizer / scaler make it a
    training checkpoint that `load_training_state` resumes exactly.
    modules: more named networks of the run, e.g. {"discriminator": D} (tensors `<name>.<key>`; `load_module`
    reads one back); optimizers: their optimizers by the same names (`optimizer_<name>.state...`).
    extra: a JSON-serialisable dict stored in the metadata.
    Raises `CheckpointError` (and writes nothing) if a weight is NaN or infinite: a diverged run
    never replaces the last good checkpoint.
    """
    path = Path(path)
    tensors = {f"model.{k}": v for k, v in _unwrap(model).state_dict().items()}
    if ema is not None:
        tensors.update({f"ema.{k}": v for k, v in _unwrap(ema).state_dict().items()})
    modules, optimizers = modules or {}, optimizers or {}
    for name in (*modules, *optimizers):
        if name in RESERVED or not name.isidentifier():
            raise ValueError(f"a checkpoint cannot hold a module named {name!r}: use an identifier other than "
                             f"{', '.join(RESERVED)}")
    for name, module in modules.items():
        tensors.update({f"{name}.{k}": v for k, v in _unwrap(module).state_dict().items()})
    bad = _nonfinite(tensors)
    if bad:
        raise NonFiniteWeightsError(f"not writing {path}: {len(bad)} tensors hold NaN or infinite values (first: "
                                    f"{bad[0]}); the run diverged. The previous checkpoint, if any, is kept: resume "
                                    "from it with a lower train.lr, a train.grad_clip or more train.warmup_steps")
    metadata = {
        "format": FORMAT,
        "minildm_version": minildm.__version__,
        "torch_version": torch.__version__,
        "step": str(int(step)),
        "config": json.dumps(config_lib.to_dict(config)),
        "has_ema": json.dumps(ema is not None),
        "extra": json.dumps(extra or {}),
        "modules": json.dumps(sorted(modules)),
    }
    for key, opt in ([("optimizer", optimizer)] if optimizer is not None else []) + \
            [(f"optimizer_{name}", opt) for name, opt in optimizers.items()]:
        state = opt.state_dict()
        scalars = {}
        for index, param_state in state["state"].items():
            for name, value in param_state.items():
                if torch.is_tensor(value):
                    tensors[f"{key}.state.{index}.{name}"] = value
                else:
                    scalars.setdefault(str(index), {})[name] = value
        metadata[key] = json.dumps({"param_groups": state["param_groups"], "scalars": scalars})
    if scaler is not None:
        metadata["scaler"] = json.dumps(scaler.state_dict())
    # safetensors wants contiguous CPU tensors that share no memory (channels_last is not contiguous).
    tensors = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    metadata["checksums"] = json.dumps({k: _crc32(v) for k, v in tensors.items()})
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temporaries(path)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


@contextlib.contextmanager
def atomic_path(path, *, sync_folder: bool = True) -> Iterator[Path]:
    """A temporary file beside `path` for the block to write (by name); it becomes `path` when the block ends.

    The temporary file, `.<name>.tmp<pid>-<random>` (no other process or host picks the same name), is created
    empty with the permissions the umask gives any new file (0644 under umask 022). When the block ends without an
    error it is fsynced, renamed to `path` with `os.replace` (atomic on POSIX: a reader sees the old file or the
    new one, never half of one) and, with sync_folder, the folder is fsynced so the rename survives a power cut.
    On an error it is removed and `path` is left as it was. Used by `save`, the `.sha256` records, downloads,
    `evaluation.write_npz` and `prepare`.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}-{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))  # a name nobody else holds
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # whatever the writer did (safetensors writes 0600): as any new file
        with open(tmp, "rb") as file:  # on disk before the rename makes it the file
            os.fsync(file.fileno())
        os.replace(tmp, path)
        if sync_folder:
            _fsync_folder(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _nonfinite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors that hold a NaN or an infinity."""
    return [k for k, v in tensors.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]


def _crc32(tensor) -> int:
    """CRC-32 of a contiguous CPU tensor's bytes (any dtype, any shape), read in place."""
    return zlib.crc32(tensor.reshape(-1).view(torch.uint8).numpy()) if tensor.numel() else 0


def _remove_stale_temporaries(path: Path) -> None:
    """Delete `.<name>.tmp<pid>[-<random>]` files left by saves whose process was killed (pid no longer running)."""
    for tmp in path.parent.glob(f".{path.name}.tmp*"):
        pid = tmp.name.rsplit(".tmp", 1)[1].split("-")[0]
        if pid.isdigit() and int(pid) != os.getpid() and not _running(int(pid)):
            tmp.unlink(missing_ok=True)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------------
# Loading


def read_metadata(path) -> dict:
    """The checkpoint's header as Python data: format, versions, step (int), config (dict), has_ema, ..."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        with safe_open(str(path), framework="pt") as file:
            raw = file.metadata() or {}
            keys = list(file.keys())
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(
            f"{path} is not a readable checkpoint ({error}); the file is truncated or corrupted. "
            "Copy or download it again (minildm writes checkpoints atomically, so an interrupted save "
            "leaves the previous file intact)") from None
    if raw.get("format") != FORMAT:
        hint = " For official OpenAI .pt files use checkpoints.load_official." if path.suffix == ".pt" else ""
        raise CheckpointError(f"{path} is a safetensors file but not a minildm checkpoint (format "
                              f"{raw.get('format')!r}, expected {FORMAT!r}).{hint}")
    missing = [name for name in ("step", "config", "has_ema") if name not in raw]
    if missing:
        raise CheckpointError(f"{path}: the checkpoint's metadata has no {', '.join(missing)}; it was not written by "
                              "minildm.checkpoints.save or was edited. Copy or download it again")
    metadata = dict(raw)
    try:
        for name in raw:
            if name in ("config", "has_ema", "extra", "optimizer", "scaler", "checksums", "modules") \
                    or name.startswith("optimizer_"):
                metadata[name] = json.loads(raw[name])
        metadata["step"] = int(raw["step"])
    except ValueError as error:
        raise CheckpointError(f"{path}: the checkpoint's metadata is damaged ({type(error).__name__}: {error}); "
                              "copy or download the file again") from None
    metadata["keys"] = keys
    return metadata


def load(path, *, device="cpu", ema=True) -> Loaded:
    """Rebuild the network of a checkpoint with `minildm.build_model` and load its weights strictly.

    Returns `Loaded(model, config, ema, step, metadata)`; both modules are in eval mode on `device`.
    ema=False skips building the EMA copy. Raises `CheckpointError` naming every missing,
    unexpected or mis-shaped key if the weights do not fit the architecture of the stored config.
    """
    metadata = read_metadata(path)
    config = config_lib.from_dict(metadata["config"])
    tensors = _read_tensors(path, ("model.", "ema.") if ema else ("model.",), device, metadata.get("checksums"))
    model = minildm.build_model(config, device=device)
    load_weights(model, _strip(tensors, "model."), source=f"{path} (model)")
    model.eval()
    ema_model = None
    if ema and metadata["has_ema"]:
        ema_model = minildm.build_model(config, device=device)
        load_weights(ema_model, _strip(tensors, "ema."), source=f"{path} (ema)")
        ema_model.eval().requires_grad_(False)
    return Loaded(model, config, ema_model, metadata["step"], metadata)


def load_training_state(path, model, *, ema=None, optimizer=None, scaler=None, modules=None,
                        optimizers=None) -> dict:
    """Restore a training checkpoint into existing objects; returns {"step", "extra", "config"}.

    model / ema / optimizer / scaler, and the named `modules` / `optimizers` (as given to `save`), are
    modified in place (weights strictly checked; a module the file lacks is an error naming it).
    """
    metadata = read_metadata(path)
    modules, optimizers = modules or {}, optimizers or {}
    device = next(iter(_unwrap(model).state_dict().values())).device
    prefixes = ("model.", "ema.") + tuple(f"{name}." for name in modules)
    tensors = _read_tensors(path, prefixes, device, metadata.get("checksums"))
    # Optimizer state is read on the CPU: load_state_dict moves the moments to the parameters' device
    # and keeps AdamW's step counters on the CPU, exactly where a fresh optimizer has them.
    tensors.update(_read_tensors(path, ("optimizer",), "cpu", metadata.get("checksums")))
    load_weights(_unwrap(model), _strip(tensors, "model."), source=f"{path} (model)")
    if ema is not None:
        if not metadata["has_ema"]:
            raise CheckpointError(f"{path} has no EMA weights; it cannot resume a run that keeps an EMA")
        load_weights(_unwrap(ema), _strip(tensors, "ema."), source=f"{path} (ema)")
    for name, module in modules.items():
        _need_module(path, metadata, name)
        load_weights(_unwrap(module), _strip(tensors, f"{name}."), source=f"{path} ({name})")
    for key, opt in ([("optimizer", optimizer)] if optimizer is not None else []) + \
            [(f"optimizer_{name}", opt) for name, opt in optimizers.items()]:
        if key not in metadata:
            raise CheckpointError(f"{path} has no {key} state (it was saved for sharing, not for resuming); "
                                  "start a new run from its weights instead")
        _load_optimizer(opt, metadata[key], _strip(tensors, f"{key}.state."))
    if scaler is not None and metadata.get("scaler"):
        scaler.load_state_dict(metadata["scaler"])
    return {"step": metadata["step"], "extra": metadata["extra"], "config": metadata["config"]}


def load_module(path, name: str, module, *, device="cpu"):
    """Load the network stored as `name` (see `save(modules=...)`) into `module`, strictly; returns it, eval mode."""
    metadata = read_metadata(path)
    _need_module(path, metadata, name)
    tensors = _read_tensors(path, (f"{name}.",), device, metadata.get("checksums"))
    load_weights(_unwrap(module), _strip(tensors, f"{name}."), source=f"{path} ({name})")
    return module.to(device).eval()


def _need_module(path, metadata, name) -> None:
    stored = metadata.get("modules", [])
    if name not in stored:
        raise CheckpointError(f"{path} holds no module named {name!r}; it holds the model"
                              + (f" and {', '.join(stored)}" if stored else " only"))


def _load_optimizer(optimizer, saved: dict, tensors: dict) -> None:
    """optimizer.load_state_dict from the tensors and JSON that `save` wrote."""
    state = {}
    for key, value in tensors.items():
        index, name = key.split(".", 1)
        state.setdefault(int(index), {})[name] = value
    for index, scalars in saved["scalars"].items():
        state.setdefault(int(index), {}).update(scalars)
    groups = saved["param_groups"]
    for group, current in zip(groups, optimizer.param_groups):  # JSON turned tuples (betas) into lists
        group.update({k: tuple(v) for k, v in group.items() if isinstance(current.get(k), tuple)})
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def load_weights(model, state_dict, *, source="checkpoint") -> None:
    """`model.load_state_dict(state_dict, strict=True)` with one clear error listing every difference."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{k}: checkpoint {tuple(state_dict[k].shape)} vs model {tuple(expected[k].shape)}"
                  for k in sorted(set(expected) & set(state_dict)) if state_dict[k].shape != expected[k].shape]
    if missing or unexpected or mismatched:
        lines = [f"the weights in {source} do not fit this {type(model).__name__}:"]
        for title, items in (("missing keys", missing), ("unexpected keys", unexpected),
                             ("shape mismatches", mismatched)):
            if items:
                lines.append(f"  {title} ({len(items)}): " + ", ".join(items))
        lines.append("Build the model from the config the weights were trained with "
                     "(checkpoints.load does this from the stored config).")
        raise CheckpointError("\n".join(lines))
    broken = _nonfinite(state_dict)
    if broken:
        raise NonFiniteWeightsError(f"the weights in {source} hold NaN or infinite values ({len(broken)} tensors, "
                                    f"first: {broken[0]}): they come from a run that diverged. Use an earlier "
                                    "checkpoint")
    model.load_state_dict(state_dict, strict=True)


def _read_tensors(path, prefixes, device, checksums=None) -> dict:
    """The tensors whose names start with one of `prefixes`, each checked against its stored CRC-32."""
    try:
        with safe_open(str(path), framework="pt") as file:
            tensors = {k: file.get_tensor(k) for k in file.keys() if k.startswith(tuple(prefixes))}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise CheckpointError(f"{path}: cannot read tensors ({error}); the file is truncated or corrupted. "
                              "Copy or download it again.") from None
    if checksums is not None:
        damaged = [k for k, v in tensors.items() if checksums.get(k) != _crc32(v)]
        if damaged:
            raise CheckpointError(f"{path} is corrupted: {len(damaged)} tensors do not match their stored checksum "
                                  f"(first: {damaged[0]}). Copy or download it again, or resume from an earlier "
                                  "checkpoint")
    return {k: v.to(device) for k, v in tensors.items()}


def _strip(tensors, prefix) -> dict:
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _unwrap(module):
    """The plain module under torch.compile's `_orig_mod` and DistributedDataParallel's `module`."""
    module = getattr(module, "_orig_mod", module)
    return getattr(module, "module", module)


# ---------------------------------------------------------------------------------------------
# Official checkpoints: download, verification, reading


def official_dir() -> Path:
    """Where official checkpoints are kept: $MINILDM_CHECKPOINTS, else data/checkpoints/official of a
    source checkout, else ~/.cache/minildm/official."""
    if os.environ.get("MINILDM_CHECKPOINTS"):
        return Path(os.environ["MINILDM_CHECKPOINTS"])
    repo = Path(__file__).resolve().parents[1]
    if (repo / "pyproject.toml").is_file() and (repo / "data").is_dir():
        return repo / "data" / "checkpoints" / "official"
    return Path.home() / ".cache" / "minildm" / "official"


def official_url(name: str) -> str:
    """Download URL of a preset's official checkpoint (`name` is a preset or a released file name)."""
    filename = _official_filename(name)
    return OFFICIAL_URLS[filename]


def fetch_official(name: str, *, directory=None) -> Path:
    """Path of the official checkpoint of preset `name` (or of a released file name), downloading it on first use.

    A download is checked as it arrives: the bytes received against the server's Content-Length, the size and
    SHA-256 the publisher states (`PUBLISHED`: sd-v1-4.ckpt both, cin256-v2.ckpt the size, no other file any),
    and the size against `minimum_size`. Its SHA-256 is then written beside it (`<file>.sha256`, in the format
    of `sha256sum`), and `verify_official` checks the file against it on every later load. A file that is
    already there is returned as it is (put one there by hand to skip the download).
    Offline, raises `ConnectionError` naming the URL and where to put the file by hand; a download that fails
    a check raises `CheckpointError`; neither leaves a file behind.
    """
    return _fetch(name, directory)[0]


def fetch_verified(name: str, *, directory=None) -> Path:
    """`fetch_official` then `verify_official`: the path of a checked official file, ready to load.

    A file downloaded now was hashed as it arrived, so it is not read a second time. Under torch.distributed
    (torchrun), rank 0 alone downloads and checks while the others wait (one download, not one per process), and
    they get its path, or its error; every process must call this. The file must then be visible to every
    process: keep official checkpoints on a file system that all nodes share.
    """
    import torch.distributed as dist

    filename = _official_filename(name)  # an unknown name fails on every rank, before any collective
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return _fetch_and_verify(name, directory)
    outcome, error = [None], None
    if dist.get_rank() == 0:
        try:
            outcome[0] = {"path": str(_fetch_and_verify(name, directory))}
        except Exception as failure:  # noqa: BLE001 (any error: the others wait for an answer, send it too)
            error, outcome[0] = failure, {"error": type(failure).__name__, "message": str(failure)}
    dist.broadcast_object_list(outcome, src=0)
    if error is not None:
        raise error
    if "error" in outcome[0]:
        kind = {"ConnectionError": ConnectionError, "CheckpointError": CheckpointError}.get(outcome[0]["error"],
                                                                                         RuntimeError)
        raise kind(f"rank 0 could not fetch {filename}: {outcome[0]['message']}")
    path = Path(outcome[0]["path"])
    if not path.is_file():
        raise CheckpointError(f"rank {dist.get_rank()} cannot see {path}, which rank 0 downloaded and checked: keep "
                              "official checkpoints on a file system that every node shares (set MINILDM_CHECKPOINTS "
                              "to a folder on it), or copy the file to the same path on every node")
    return path


def _fetch_and_verify(name: str, directory) -> Path:
    path, digest = _fetch(name, directory)
    if digest is None:  # not downloaded now: check it against its record
        verify_official(path, name)
    return path


def _fetch(name: str, directory) -> tuple[Path, str | None]:
    """(path, SHA-256 hex if it was downloaded now, else None): see `fetch_official`."""
    filename = _official_filename(name)
    url = OFFICIAL_URLS[filename]
    directory = Path(directory) if directory is not None else official_dir()
    path = directory / filename
    if path.is_file():
        return path, None
    directory.mkdir(parents=True, exist_ok=True)
    ignore = directory / ".gitignore"  # downloaded weights (hundreds of MB) must never be committed
    if not ignore.exists():
        ignore.write_text("*\n")
    try:
        with atomic_path(path) as tmp:
            digest, received, expected = _download(url, tmp, filename)
            if expected is not None and received != expected:
                raise CheckpointError(f"the download of {filename} from {url} stopped early: {received:,} of "
                                      f"{expected:,} bytes (its Content-Length). Run the command again to download it")
            where, advice = f"the file downloaded from {url}", "Nothing was kept: run the command again"
            _check_size(filename, received, where=where, advice=advice)
            _check_published_sha256(filename, digest, where=where, advice=advice)
    except (urllib.error.URLError, OSError, TimeoutError, http.client.HTTPException) as error:
        hint = ""
        if isinstance(error, urllib.error.HTTPError) and error.code in (401, 403) and "huggingface.co" in url:
            hint = (f" The repository is gated: accept its licence at {url.split('/resolve/')[0]} while logged in, "
                    "then set HF_TOKEN to a Hugging Face access token and run again.")
        raise ConnectionError(
            f"could not download the official checkpoint {filename} from {url} ({error}).{hint} "
            f"Download it by hand and put it at {path} (or set MINILDM_CHECKPOINTS to the folder that "
            "holds it)") from None
    _record_sha256(path, digest)
    return path, digest


def _download(url: str, target: Path, filename: str) -> tuple[str, int, int | None]:
    """Stream `url` into `target`, hashing as it arrives; returns (SHA-256 hex, bytes received, Content-Length)."""
    from minildm.progress import progress

    request = urllib.request.Request(url, headers={"User-Agent": f"minildm/{minildm.__version__}"})
    if urllib.parse.urlparse(url).hostname == "huggingface.co" and os.environ.get("HF_TOKEN"):
        # gated repositories want the user's token; it is not sent on to the storage the download redirects to
        request.add_unredirected_header("Authorization", f"Bearer {os.environ['HF_TOKEN']}")
    digest, received = hashlib.sha256(), 0
    with urllib.request.urlopen(request, timeout=60) as response, open(target, "wb") as out:
        total = int(response.headers.get("Content-Length") or 0) or None
        with progress(total=total, unit="B", unit_scale=True, desc=filename) as bar:
            while chunk := response.read(1 << 20):
                out.write(chunk)
                digest.update(chunk)
                received += len(chunk)
                bar.update(len(chunk))
    return digest.hexdigest(), received, total


def verify_official(path, name: str | None = None) -> str:
    """Check an official file before it is loaded; returns its SHA-256 (hex).

    name: its preset or released file name (default: the file's name). Checked: the size (the published one,
    else `minimum_size`), then the SHA-256 (the published one, and the one recorded at download in
    `<file>.sha256`). A file put there by hand without a record gets one now, so later loads are checked
    against it. Raises `CheckpointError` saying to delete the file and download it again. Hashing reads the
    whole file (a few seconds for Stable Diffusion's 4.3 GB).
    """
    path = Path(path)
    filename = _official_filename(name) if name is not None else path.name
    advice = f"Delete {path} and download it again"
    _check_size(filename, path.stat().st_size, where=str(path), advice=advice)
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        while chunk := file.read(1 << 24):
            digest.update(chunk)
    digest = digest.hexdigest()
    _check_published_sha256(filename, digest, where=str(path), advice=advice)
    sidecar = _sidecar(path)
    if not sidecar.is_file():
        _record_sha256(path, digest)
        return digest
    recorded = (sidecar.read_text().split() or [""])[0].lower()
    if recorded != digest:
        raise CheckpointError(f"{path} is not the file that was downloaded: its SHA-256 is {digest}, {sidecar.name} "
                              f"recorded {recorded or 'nothing'}. It is corrupted or was replaced: delete both files "
                              "and download it again")
    return digest


def minimum_size(filename: str) -> int | None:
    """A lower bound on the size in bytes of released file `filename`: 4 bytes (float32) per parameter of the
    networks a preset builds from it (the UNet or classifier; for latent diffusion also its first stage), from
    the presets' exact counts (tested against the manifests of tests/reference). All the released files listed
    here hold float32 weights (guided- and improved-diffusion save their fp32 master weights; sd-v1-4.ckpt is
    4,265,380,512 bytes for 1.07 B parameters). None for zip archives (compressed) and for files no preset uses."""
    if filename.endswith(".zip"):
        return None
    counts = []
    for name in presets.names():
        preset = presets.info(name)
        if preset.checkpoint != filename or preset.params is None:
            continue
        first_stage = preset.config.latent.first_stage
        if first_stage in presets.names():
            counts.append(preset.params + (presets.info(first_stage).params or 0))
        else:
            counts.append(preset.params)
    return 4 * min(counts) if counts else None


def _check_size(filename: str, size: int, *, where: str, advice: str) -> None:
    """The size of `where` against the published size of `filename`, else against `minimum_size`."""
    published = PUBLISHED.get(filename)
    if published is not None and published.size is not None and size != published.size:
        raise CheckpointError(f"{where} has {size:,} bytes but the released {filename} has {published.size:,} "
                              f"({published.source}): it is truncated or another file. {advice}")
    minimum = minimum_size(filename)
    if minimum is not None and size < minimum:
        raise CheckpointError(f"{where} has {size:,} bytes, fewer than the {minimum:,} that the float32 weights of "
                              f"{filename} take (4 bytes per parameter): it is truncated or another file. {advice}")


def _check_published_sha256(filename: str, digest: str, *, where: str, advice: str) -> None:
    published = PUBLISHED.get(filename)
    if published is not None and published.sha256 is not None and digest != published.sha256:
        raise CheckpointError(f"{where} is not the released {filename}: its SHA-256 is {digest}, the publisher's is "
                              f"{published.sha256} ({published.source}). {advice}")


def _sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


def _record_sha256(path: Path, digest: str) -> None:
    """Write `<file>.sha256` (sha256sum's format) atomically: a record cut off halfway would reject a good file."""
    with atomic_path(_sidecar(path)) as tmp:
        tmp.write_text(f"{digest}  {path.name}\n")


def load_official(name: str, *, path=None, device="cpu", directory=None):
    """Build preset `name` and load its official weights strictly; returns (model, config), eval mode.

    The file is found or downloaded and checked first (`fetch_verified`: under torchrun by rank 0 alone). path:
    your own copy of the released file (loaded as it is: strict loading still checks every key and shape). A latent
    diffusion preset (ldm-cin256-v2, sd-v1) returns its whole `minildm.latent.LatentDiffusion`.
    """
    config = presets.get(name)
    if config.latent.first_stage:
        from minildm import latent

        return latent.load_official(name, path=path, device=device, directory=directory), config
    if path is None:
        path = fetch_verified(name, directory=directory)
    try:
        return load_official_file(path, config, device=device), config
    except CheckpointError as error:
        raise CheckpointError(f"{error}\n{path} does not hold the released weights of preset {name!r} (is it another "
                              "model's file?): delete it and download it again") from None


def load_official_file(path, config, *, device="cpu"):
    """Load an official file into `build_model(config)`, strictly: a guided-/improved-diffusion `.pt` state
    dict, or a latent-diffusion first stage (the `.zip` of the model zoo, or the `model.ckpt` inside it, a
    Lightning checkpoint whose "state_dict" also holds the training-only `loss.*` weights, which are dropped)."""
    state_dict = read_official_state_dict(path, device=device)
    from minildm import autoencoder, unet

    model = minildm.build_model(config, device=device)
    convert = autoencoder.convert_official_state_dict if config.model == "autoencoder" \
        else unet.convert_official_state_dict
    load_weights(model, convert(state_dict), source=str(path))
    return model.eval()


class _Inert:
    """Stands in for a pickled object that is not a weight (Lightning's ModelCheckpoint callback, numpy scalars
    of the training loop's state): built from nothing, it runs no code of the file's."""

    def __init__(self, *args, **kwargs):
        pass

    def __setstate__(self, state):
        pass


def read_official_state_dict(path, *, device="cpu") -> dict:
    """The state_dict {name: tensor} of an official file: a guided-/improved-diffusion `.pt`, a latent-diffusion
    model-zoo `.zip` (the model.ckpt inside) or a Lightning `.ckpt` (its "state_dict").

    Read with `torch.load(weights_only=True)`, so no code in the file runs. Lightning checkpoints also pickle
    their callbacks (pytorch_lightning's ModelCheckpoint, numpy scalars), which the weights-only reader refuses:
    those names are read as inert placeholders (`_Inert`), never imported, and everything outside "state_dict"
    is dropped. Raises `CheckpointError` for a truncated or unreadable file.
    """
    path = Path(path)
    try:
        if path.suffix == ".zip":
            path = _extract_ckpt(path)
        try:
            loaded = torch.load(path, map_location=device, weights_only=True)
        except pickle.UnpicklingError:
            placeholders = [(_Inert, name) for name in torch.serialization.get_unsafe_globals_in_checkpoint(path)]
            with torch.serialization.safe_globals(placeholders):
                loaded = torch.load(path, map_location=device, weights_only=True)
    except CheckpointError:
        raise
    except Exception as error:  # truncated zip, wrong file
        raise CheckpointError(f"{path} is not a readable PyTorch checkpoint ({type(error).__name__}: {error}); "
                              "it may be truncated: delete it and download it again") from None
    state_dict = loaded.get("state_dict", loaded) if isinstance(loaded, dict) else loaded
    if not isinstance(state_dict, dict):
        raise CheckpointError(f"{path} holds a {type(state_dict).__name__}, not a state_dict of tensors; is it an "
                              "official checkpoint? Delete it and download it again")
    others = [key for key, value in state_dict.items() if not torch.is_tensor(value)]
    if others:
        raise CheckpointError(f"{path}: {len(others)} entries of its state_dict are not tensors (first: {others[0]}); "
                              "it is not an official checkpoint. Delete it and download it again")
    return state_dict


# A latent-diffusion / Stable Diffusion checkpoint ('state_dict' of a Lightning .ckpt) holds the whole
# LatentDiffusion module; its parts by prefix:
LDM_PARTS = {"model.diffusion_model.": "unet", "model_ema.": "unet_ema", "first_stage_model.": "first_stage",
             "cond_stage_model.": "cond_stage"}
LDM_SCHEDULE_BUFFERS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                        "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                        "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                        "posterior_mean_coef1", "posterior_mean_coef2")


def split_ldm_state_dict(state_dict: dict, unet_keys=None) -> dict:
    """Route every key of a LatentDiffusion state_dict to its part; returns a dict of parts and `unused`.

    Parts: "unet", "first_stage", "cond_stage" (keys without their prefix), "unet_ema" (LDM's LitEma names each
    UNet parameter with its dots removed, "model_ema.diffusion_modelinput_blocks00weight"; given `unet_keys`, the
    names of the UNet's state_dict, they are mapped back to them, and `decay` / `num_updates` go to "ema_state"),
    "schedule" (the float32 buffers LDM recomputes from its config), "scale_factor" (a float, when stored).
    "unused" lists every key that fits none of these: a caller names them instead of dropping them silently.
    """
    parts = {name: {} for name in (*LDM_PARTS.values(), "schedule", "ema_state")}
    unused = []
    ema_names = {"diffusion_model" + key.replace(".", ""): key for key in unet_keys} if unet_keys else {}
    for key, value in state_dict.items():
        prefix = next((p for p in LDM_PARTS if key.startswith(p)), None)
        if prefix == "model_ema.":
            name = key[len(prefix):]
            if name in ("decay", "num_updates"):
                parts["ema_state"][name] = value
            elif unet_keys is None or name in ema_names:
                parts["unet_ema"][ema_names.get(name, name)] = value
            else:
                unused.append(key)
        elif prefix is not None:
            parts[LDM_PARTS[prefix]][key[len(prefix):]] = value
        elif key in LDM_SCHEDULE_BUFFERS:
            parts["schedule"][key] = value
        elif key == "scale_factor":
            parts["scale_factor"] = float(value) if torch.is_tensor(value) and value.numel() == 1 else value
        else:
            unused.append(key)
    parts["unused"] = sorted(unused)
    return parts


def _extract_ckpt(path: Path) -> Path:
    """The `.ckpt` inside a model-zoo zip, extracted beside it once (`<zip name>.ckpt`)."""
    import zipfile

    target = path.with_suffix(".ckpt")
    if target.is_file():
        return target
    with zipfile.ZipFile(path) as archive:
        members = [m for m in archive.namelist() if m.endswith(".ckpt")]
        if not members:
            raise CheckpointError(f"{path} holds no .ckpt file (it has {archive.namelist()[:5]}); is it a "
                                  "latent-diffusion model-zoo archive?")
        with atomic_path(target) as tmp, archive.open(members[0]) as source, open(tmp, "wb") as out:
            while chunk := source.read(1 << 20):
                out.write(chunk)
    return target


def _official_filename(name: str) -> str:
    if name in OFFICIAL_URLS:
        return name
    filename = presets.info(name).checkpoint  # KeyError listing the presets for unknown names
    if not filename:
        with_checkpoint = [n for n in presets.names() if presets.info(n).checkpoint]
        raise KeyError(f"preset {name!r} has no official checkpoint; presets with one: {', '.join(with_checkpoint)}")
    return filename
