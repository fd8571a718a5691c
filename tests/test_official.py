"""Official checkpoints end to end, without the real files: tiny models written in the released layouts (a
guided-diffusion `.pt` for an ADM UNet and its classifier, a Lightning `.ckpt` for a class-conditional LDM and a
CLIP-conditioned one), registered as presets with released files, then downloaded from a fake server or found on
disk, checked (size, SHA-256), loaded strictly and sampled through the package's samplers and the command line.
Offline, each step (diffusion checkpoint, classifier, tokenizer) fails with a message that says what to do."""

import hashlib
import os
import stat
import sys
import types
import urllib.error
import urllib.request
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

import minildm
from minildm import checkpoints, conditioning, latent, presets, train
from minildm import config as config_lib
from minildm.__main__ import _parser, _sample_latent, main
from minildm.autoencoder import build as build_autoencoder
from minildm.config import AutoencoderConfig, Config, override

SERVER = "https://example.invalid/released/"


# ---------------------------------------------------------------------------------------------
# Tiny presets with released files (registered for one test by monkeypatch)


def register(monkeypatch, name, config, checkpoint, params=None):
    """Add preset `name` whose released file `checkpoint` is served at SERVER + checkpoint."""
    config_lib.validate(config)
    monkeypatch.setitem(presets._REGISTRY, name, presets.Preset(name=name, config=config, summary="test",
                                                                 params=params, checkpoint=checkpoint))
    monkeypatch.setitem(checkpoints.OFFICIAL_URLS, checkpoint, SERVER + checkpoint)


def count(model):
    return sum(p.numel() for p in model.parameters())


def adm_config(channels=16):
    return override(presets.get("adm-imagenet64"), [
        "unet.image_size=8", f"unet.channels={channels}", "unet.channel_mult=1,2", "unet.num_res_blocks=1",
        "unet.attention_resolutions=4", "unet.num_head_channels=8", "unet.norm_groups=8", "data.image_size=8"])


def classifier_config():
    return override(presets.get("adm-classifier64"), [
        "classifier.image_size=8", "classifier.channels=16", "classifier.channel_mult=1,2",
        "classifier.num_res_blocks=1", "classifier.attention_resolutions=4", "classifier.num_head_channels=8",
        "classifier.norm_groups=8", "data.image_size=8"])


def randomized(model):
    """The model with its zero-initialised output layers drawn at random, so that its output depends on its input."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.any():
                parameter.normal_(std=0.3)
    return model.eval()


@pytest.fixture
def adm(monkeypatch, tmp_path):
    """An ADM UNet and its classifier saved as guided-diffusion .pt files in the official folder."""
    monkeypatch.setenv("MINILDM_CHECKPOINTS", str(tmp_path / "official"))
    models = {}
    for name, config in (("test-adm64", adm_config()), ("test-classifier64", classifier_config())):
        models[name] = randomized(minildm.build_model(config))
        register(monkeypatch, name, config, f"{name}.pt", params=count(models[name]))
    (tmp_path / "official").mkdir()
    for name, model in models.items():
        torch.save(model.state_dict(), tmp_path / "official" / f"{name}.pt")  # what guided-diffusion releases
    return models


def vq_autoencoder_config():
    return AutoencoderConfig(kind="vq", image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1,
                             z_channels=2, embed_dim=2, n_embed=16, norm_groups=4)


def ldm_config(base):
    """Preset `base` shrunk to 16x16 images, 8x8x2 latents of the first stage "test-first-stage", context width 8."""
    return override(presets.get(base), [
        "unet.image_size=8", "unet.in_channels=2", "unet.out_channels=2", "unet.channels=16", "unet.channel_mult=1,2",
        "unet.num_res_blocks=1", "unet.attention_resolutions=4", "unet.num_heads=2", "unet.num_head_channels=-1",
        "unet.context_dim=8", "unet.norm_groups=8", "data.image_size=16", "latent.first_stage=test-first-stage",
        "diffusion.num_timesteps=100"])


def lightning_ckpt(path, state_dict):
    """torch.save a Lightning checkpoint as LDM's training wrote it: the state_dict beside a pickled callback of a
    module this machine does not have (pytorch_lightning's ModelCheckpoint) and numpy scalars."""
    module = types.ModuleType("pytorch_lightning_stand_in")

    class ModelCheckpoint:
        def __init__(self):
            self.best_model_score = np.float32(0.25)

    ModelCheckpoint.__module__, ModelCheckpoint.__qualname__ = module.__name__, "ModelCheckpoint"
    module.ModelCheckpoint = ModelCheckpoint
    sys.modules[module.__name__] = module
    try:
        torch.save({"state_dict": state_dict, "global_step": np.int64(178_000), "epoch": 7,
                    "callbacks": {ModelCheckpoint: {"best_model_score": np.float32(0.25)}},
                    "checkpoint_callback": ModelCheckpoint()}, path)
    finally:
        del sys.modules[module.__name__]


def official_layout(ldm):
    """The state_dict of an LDM Lightning checkpoint for `ldm`: its parts under LDM's prefixes, the first stage's
    training-only loss weights, the schedule buffers; no scale_factor (cin256-v2 and SD v1 do not store it)."""
    state = {k: v for k, v in ldm.state_dict().items() if k != "scale_factor"}
    state["first_stage_model.loss.logvar"] = torch.zeros(())
    state["betas"] = torch.linspace(1e-4, 0.02, 100)
    state["alphas_cumprod"] = torch.cumprod(1 - state["betas"], 0)
    return state


def register_first_stage(monkeypatch, ae):
    monkeypatch.setitem(presets._REGISTRY, "test-first-stage", presets.Preset(
        name="test-first-stage", config=ae, summary="test", params=count(build_autoencoder(ae.autoencoder))))


@pytest.fixture
def cin(monkeypatch, tmp_path):
    """A class-conditional LDM like cin256-v2 (VQ first stage, ClassEmbedder 1001 x 8) in a Lightning .ckpt."""
    monkeypatch.setenv("MINILDM_CHECKPOINTS", str(tmp_path / "official"))
    ae = Config(model="autoencoder", autoencoder=vq_autoencoder_config())
    register_first_stage(monkeypatch, ae)
    config = ldm_config("ldm-cin256-v2")
    torch.manual_seed(0)
    source = latent.build(config)
    randomized(source)
    params = count(source.unet)
    register(monkeypatch, "test-cin", config, "test-cin.ckpt", params=params)
    (tmp_path / "official").mkdir()
    lightning_ckpt(tmp_path / "official" / "test-cin.ckpt", official_layout(source))
    return source


class FakeResponse:
    """What urlopen returns: a context manager with headers and read(n); `length` overrides Content-Length."""

    def __init__(self, body: bytes, length=None):
        self.body, self.offset = body, 0
        self.headers = {"Content-Length": str(len(body) if length is None else length)}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def read(self, n=-1):
        chunk = self.body[self.offset:] if n < 0 else self.body[self.offset:self.offset + n]
        self.offset += len(chunk)
        return chunk


def serve(monkeypatch, files, *, length=None):
    """Answer urlopen from `files` {url: bytes}; returns the list of requests seen."""
    requests = []

    def urlopen(request, timeout=None):
        requests.append(request)
        url = request.full_url if isinstance(request, urllib.request.Request) else request
        if url not in files:
            raise urllib.error.URLError("network is unreachable")
        return FakeResponse(files[url], length)

    monkeypatch.setattr(urllib.request, "urlopen", urlopen)
    return requests


def offline(monkeypatch):
    serve(monkeypatch, {})


def pixels(path):
    return np.asarray(Image.open(path))


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Download and verification


def test_a_download_is_checked_and_its_sha256_recorded_then_verified_on_load(adm, tmp_path, monkeypatch):
    folder = tmp_path / "official"
    released = (folder / "test-adm64.pt").read_bytes()
    (folder / "test-adm64.pt").unlink()
    requests = serve(monkeypatch, {SERVER + "test-adm64.pt": released})
    path = checkpoints.fetch_official("test-adm64")
    assert path == folder / "test-adm64.pt" and path.read_bytes() == released and len(requests) == 1
    assert (folder / "test-adm64.pt.sha256").read_text() == f"{hashlib.sha256(released).hexdigest()}  test-adm64.pt\n"
    assert "Authorization" not in requests[0].headers and "Authorization" not in requests[0].unredirected_hdrs
    model, _ = checkpoints.load_official("test-adm64")
    for key, value in adm["test-adm64"].state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key
    # One byte changed after the download: the recorded SHA-256 no longer matches.
    damaged = bytearray(released)
    damaged[len(damaged) // 2] ^= 0xFF
    path.write_bytes(bytes(damaged))
    with pytest.raises(checkpoints.CheckpointError, match="not the file that was downloaded.*delete both files and "
                                                          "download it again"):
        checkpoints.load_official("test-adm64")


def test_a_download_is_hashed_once_and_its_record_is_written_atomically_and_readable(adm, tmp_path, monkeypatch):
    folder = tmp_path / "official"
    released = (folder / "test-adm64.pt").read_bytes()
    (folder / "test-adm64.pt").unlink()
    serve(monkeypatch, {SERVER + "test-adm64.pt": released})
    verify, verified = checkpoints.verify_official, []
    monkeypatch.setattr(checkpoints, "verify_official", lambda *args: verified.append(args) or "")
    umask = os.umask(0o022)
    try:
        checkpoints.load_official("test-adm64")
    finally:
        os.umask(umask)
    assert verified == []  # hashed as it arrived: not read a second time before loading
    for name in ("test-adm64.pt", "test-adm64.pt.sha256"):  # not mkstemp's 0600: colleagues can read them
        assert stat.S_IMODE((folder / name).stat().st_mode) == 0o644, name
    checkpoints.load_official("test-adm64")
    assert len(verified) == 1  # a file that was already there is checked against its record
    monkeypatch.setattr(checkpoints, "verify_official", verify)
    # A record cut off halfway (the disk full, the process killed) is never left: a good file stays loadable.
    adm_again = folder / "test-adm64.pt"
    adm_again.unlink()
    (folder / "test-adm64.pt.sha256").unlink()
    write_text = Path.write_text

    def cut_off(self, text, *args, **kwargs):
        write_text(self, text[:10])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Path, "write_text", cut_off)
    with pytest.raises(OSError, match="No space left"):
        checkpoints.fetch_official("test-adm64")
    monkeypatch.setattr(Path, "write_text", write_text)
    assert not (folder / "test-adm64.pt.sha256").exists() and not list(folder.glob(".*.tmp*"))
    assert checkpoints.verify_official(adm_again, "test-adm64") == hashlib.sha256(released).hexdigest()


class FakeGroup:
    """torch.distributed as two ranks see it, called one after the other in this process: rank 0's broadcast
    leaves its object for rank 1's."""

    def __init__(self, monkeypatch):
        self.rank, self.sent = 0, None
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        monkeypatch.setattr(dist, "broadcast_object_list", self.broadcast)

    def broadcast(self, objects, src=0):
        assert src == 0
        if self.rank == 0:
            self.sent = list(objects)
        else:
            objects[:] = self.sent


def test_under_torchrun_rank_0_alone_downloads_and_the_others_load_its_file(adm, tmp_path, monkeypatch):
    folder = tmp_path / "official"
    released = (folder / "test-adm64.pt").read_bytes()
    (folder / "test-adm64.pt").unlink()
    requests = serve(monkeypatch, {SERVER + "test-adm64.pt": released})
    group = FakeGroup(monkeypatch)
    models = [checkpoints.load_official("test-adm64")[0]]
    group.rank = 1
    verified = []
    monkeypatch.setattr(checkpoints, "verify_official", lambda *args: verified.append(args) or "")
    models.append(checkpoints.load_official("test-adm64")[0])
    assert len(requests) == 1 and verified == []  # one download; rank 1 neither downloads nor hashes
    for key, value in models[0].state_dict().items():
        assert torch.equal(models[1].state_dict()[key], value), key
    # rank 0 offline: every rank raises, the others naming rank 0 (none waits forever for the file)
    (folder / "test-adm64.pt").unlink()
    offline(monkeypatch)
    group.rank = 0
    with pytest.raises(ConnectionError, match="could not download"):
        checkpoints.fetch_verified("test-adm64")
    group.rank = 1
    with pytest.raises(ConnectionError, match="rank 0 could not fetch test-adm64.pt: could not download"):
        checkpoints.fetch_verified("test-adm64")
    # a node that does not see rank 0's folder: say to share it
    group.sent = [{"path": str(tmp_path / "elsewhere" / "test-adm64.pt")}]
    with pytest.raises(checkpoints.CheckpointError, match="rank 1 cannot see .*file system that every node shares"):
        checkpoints.fetch_verified("test-adm64")


def test_a_download_that_stops_early_or_is_too_small_leaves_no_file(adm, tmp_path, monkeypatch):
    folder = tmp_path / "official"
    released = (folder / "test-adm64.pt").read_bytes()
    (folder / "test-adm64.pt").unlink()
    serve(monkeypatch, {SERVER + "test-adm64.pt": released[:1000]}, length=len(released))
    with pytest.raises(checkpoints.CheckpointError, match=f"stopped early: 1,000 of {len(released):,} bytes.*again"):
        checkpoints.fetch_official("test-adm64")
    assert sorted(p.name for p in folder.iterdir()) == [".gitignore", "test-classifier64.pt"]
    serve(monkeypatch, {SERVER + "test-adm64.pt": released[:1000]})  # the server itself sends a short file
    minimum = 4 * count(adm["test-adm64"])
    with pytest.raises(checkpoints.CheckpointError, match=f"1,000 bytes, fewer than the {minimum:,}.*float32.*"
                                                          "Nothing was kept: run the command again"):
        checkpoints.fetch_official("test-adm64")
    assert checkpoints.minimum_size("test-adm64.pt") == minimum
    assert sorted(p.name for p in folder.iterdir()) == [".gitignore", "test-classifier64.pt"]


def test_published_size_and_sha256_are_checked(adm, tmp_path, monkeypatch):
    path = tmp_path / "official" / "test-adm64.pt"
    size, digest = path.stat().st_size, sha256(path)
    monkeypatch.setitem(checkpoints.PUBLISHED, "test-adm64.pt", checkpoints.Published(size, digest, "test page"))
    assert checkpoints.verify_official(path, "test-adm64") == digest
    wrong = checkpoints.Published(size, "0" * 64, "test page")
    monkeypatch.setitem(checkpoints.PUBLISHED, "test-adm64.pt", wrong)
    with pytest.raises(checkpoints.CheckpointError, match=f"not the released test-adm64.pt: its SHA-256 is {digest}, "
                                                          "the publisher's is 0{64} \\(test page\\)"):
        checkpoints.load_official("test-adm64")
    monkeypatch.setitem(checkpoints.PUBLISHED, "test-adm64.pt", checkpoints.Published(size + 1, None, "test page"))
    with pytest.raises(checkpoints.CheckpointError, match=f"has {size:,} bytes but the released test-adm64.pt has "
                                                          f"{size + 1:,} \\(test page\\).*download it again"):
        checkpoints.load_official("test-adm64")


def test_the_released_figures_are_the_publishers():
    sd = checkpoints.PUBLISHED["sd-v1-4.ckpt"]
    assert (sd.size, sd.sha256) == (4_265_380_512, "fe4efff1e174c627256e44ec2991ba279b3816e364b49f9be2abc0b3ff3f8556")
    assert checkpoints.PUBLISHED["cin256-v2.ckpt"].size == 1_827_378_153
    # the published sizes are consistent with the float32 lower bound (UNet + first stage)
    assert checkpoints.minimum_size("sd-v1-4.ckpt") == 4 * (859_520_964 + 83_653_863) < sd.size
    assert checkpoints.minimum_size("cin256-v2.ckpt") == 4 * (400_920_579 + 55_322_782) < 1_827_378_153
    assert checkpoints.minimum_size("64x64_classifier.pt") == 4 * 65_438_568
    assert checkpoints.minimum_size("kl-f8.zip") is None  # compressed
    assert checkpoints.official_url("sd-v1") == ("https://huggingface.co/CompVis/stable-diffusion-v-1-4-original/"
                                                 "resolve/main/sd-v1-4.ckpt")
    assert checkpoints.official_url("ldm-cin256-v2") == ("https://ommer-lab.com/files/latent-diffusion/nitro/cin/"
                                                         "model.ckpt")


def test_truncated_files_and_files_of_another_model_are_clear_errors(adm, tmp_path):
    folder = tmp_path / "official"
    path = folder / "test-adm64.pt"
    released = path.read_bytes()
    path.write_bytes(released[:len(released) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="fewer than the .* truncated or another file. Delete "):
        checkpoints.load_official("test-adm64")
    # the classifier's file under the UNet's name: smaller than the UNet's weights
    path.write_bytes((folder / "test-classifier64.pt").read_bytes())
    with pytest.raises(checkpoints.CheckpointError, match="truncated or another file"):
        checkpoints.load_official("test-adm64")
    # a wider UNet's file: big enough, but its weights do not fit
    torch.save(minildm.build_model(adm_config(channels=24)).state_dict(), path)
    with pytest.raises(checkpoints.CheckpointError, match="(?s)shape mismatches.*does not hold the released weights "
                                                          "of preset 'test-adm64' \\(is it another model's file"):
        checkpoints.load_official("test-adm64")


def test_a_gated_hugging_face_file_says_to_accept_the_licence_and_set_hf_token(tmp_path, monkeypatch):
    seen = []

    def unauthorized(request, timeout=None):
        seen.append(request)
        raise urllib.error.HTTPError(request.full_url, 401, "Unauthorized", {}, None)

    monkeypatch.setattr(urllib.request, "urlopen", unauthorized)
    monkeypatch.setenv("HF_TOKEN", "hf_test")
    with pytest.raises(ConnectionError, match="gated: accept its licence at https://huggingface.co/CompVis/"
                                              "stable-diffusion-v-1-4-original .*HF_TOKEN.*by hand") as error:
        checkpoints.fetch_official("sd-v1", directory=tmp_path)
    assert str(tmp_path / "sd-v1-4.ckpt") in str(error.value)
    # the token goes to huggingface.co only, and not on to the storage a download redirects to
    assert seen[0].unredirected_hdrs == {"Authorization": "Bearer hf_test"}


# ---------------------------------------------------------------------------------------------
# ADM with its classifier, by preset name


def test_adm_with_its_classifier_samples_from_the_command_line(adm, tmp_path, capsys):
    out = tmp_path / "grid.png"
    command = ["sample", "test-adm64", "--classifier", "test-classifier64", "--classifier-scale", "1", "--class",
               "207", "--num", "2", "--steps", "2", "--device", "cpu", "--out", str(out)]
    assert main(command) == 0
    guided = Image.open(out)
    guided.load()
    assert guided.size == (22, 12)  # 2 images of 8x8 with 2 pixels of padding
    assert main([*command[:5], "0", *command[6:]]) == 0  # --classifier-scale 0: no guidance
    assert not np.array_equal(pixels(out), np.asarray(guided))
    for name in ("test-adm64.pt", "test-classifier64.pt"):  # both files were checked and their SHA-256 recorded
        path = tmp_path / "official" / name
        assert (path.parent / f"{name}.sha256").read_text().split()[0] == sha256(path)


def test_offline_each_download_says_what_to_do(adm, tmp_path, monkeypatch, capsys):
    offline(monkeypatch)
    (tmp_path / "official" / "test-classifier64.pt").unlink()
    out = str(tmp_path / "grid.png")
    assert main(["sample", "test-adm64", "--classifier", "test-classifier64", "--class", "207", "--num", "1",
                 "--steps", "1", "--device", "cpu", "--out", out]) == 2
    message = capsys.readouterr().err
    assert f"could not download the official checkpoint test-classifier64.pt from {SERVER}test-classifier64.pt" \
        in message and "by hand" in message and str(tmp_path / "official" / "test-classifier64.pt") in message
    (tmp_path / "official" / "test-adm64.pt").unlink()
    assert main(["sample", "test-adm64", "--num", "1", "--steps", "1", "--device", "cpu", "--out", out]) == 2
    assert f"{SERVER}test-adm64.pt" in capsys.readouterr().err
    register(monkeypatch, "test-cin", presets.get("ldm-cin256-v2"), "test-cin.ckpt")
    with pytest.raises(ConnectionError, match=f"{SERVER}test-cin.ckpt .*by hand"):
        latent.load_official("test-cin")


# ---------------------------------------------------------------------------------------------
# Latent diffusion (cin256-v2, Stable Diffusion v1) by preset name


def test_a_class_conditional_ldm_loads_every_part_strictly_and_samples_as_the_original(cin, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every key of the file has its part: nothing to warn about
        ldm = latent.load_official("test-cin")
    for key, value in cin.state_dict().items():
        assert torch.equal(ldm.state_dict()[key], value), key
    assert (tmp_path / "official" / "test-cin.ckpt.sha256").is_file()
    diffusion = minildm.build_diffusion(ldm.config)
    labels = torch.full((2,), 207)
    expected = latent.sample(cin, diffusion, labels, steps=2, guidance_scale=3, seed=0)
    torch.testing.assert_close(latent.sample(ldm, diffusion, labels, steps=2, guidance_scale=3, seed=0), expected)
    # the command line, through _sample_latent (python -m minildm sample test-cin --class 207 --guidance-scale 3)
    out = tmp_path / "grid.png"
    args = _parser().parse_args(["sample", "test-cin", "--class", "207", "--guidance-scale", "3", "--steps", "2",
                                 "--num", "2", "--device", "cpu", "--out", str(out)])
    assert _sample_latent(args) == 0
    train.save_grid(expected, tmp_path / "expected.png")
    assert np.array_equal(pixels(out), pixels(tmp_path / "expected.png"))
    args.label = 1000  # the null class is not a class to ask for
    with pytest.raises(ValueError, match="--class 1000: this model has classes 0 .. 999"):
        _sample_latent(args)
    # a latent preset is not a pixel model or a classifier
    assert main(["sample", "test-adm", "--classifier", "test-cin", "--device", "cpu"]) == 2


def test_ldm_files_that_are_damaged_or_another_models_are_clear_errors(cin, tmp_path, monkeypatch):
    path = tmp_path / "official" / "test-cin.ckpt"
    state = official_layout(cin)
    state["model_ema.decay"] = torch.tensor(0.9999)
    state["mystery.weight"] = torch.zeros(1)
    lightning_ckpt(path, state)
    with pytest.warns(UserWarning, match="1 keys fit no part of test-cin and were not loaded: mystery.weight"):
        latent.load_official("test-cin", path=path)
    released = path.read_bytes()
    path.write_bytes(released[:len(released) // 2])
    with pytest.raises(checkpoints.CheckpointError, match="fewer than the .*truncated or another file"):
        latent.load_official("test-cin")
    with pytest.raises(checkpoints.CheckpointError, match="not a readable PyTorch checkpoint.*download it again"):
        latent.load_official("test-cin", path=path)
    # a file without the conditioner would leave it at random: refused
    lightning_ckpt(path, {k: v for k, v in official_layout(cin).items() if not k.startswith("cond_stage_model.")})
    with pytest.raises(checkpoints.CheckpointError, match="holds no conditioner weights .*download it again"):
        latent.load_official("test-cin", path=path)
    # another LDM (a wider UNet) under this file's name
    config = override(cin.config, ["unet.channels=24"])
    torch.manual_seed(1)
    lightning_ckpt(path, official_layout(latent.build(config)))
    with pytest.raises(checkpoints.CheckpointError, match="(?s)model.diffusion_model.*shape mismatches.*does not "
                                                          "hold the released weights of preset 'test-cin'"):
        latent.load_official("test-cin")


class TinyCLIPTokenizer:
    """Stands in for CLIP's BPE tokenizer (transformers.CLIPTokenizer's call): one id per word, BOS 1, EOS/pad 0."""

    def __call__(self, prompts, truncation, max_length, padding, return_tensors):
        rows = [[1, *(2 + sum(map(ord, word)) % 60 for word in prompt.split())][:max_length - 1] for prompt in prompts]
        return {"input_ids": torch.tensor([row + [0] * (max_length - len(row)) for row in rows])}


TINY_CLIP = {"vocab_size": 64, "hidden_size": 8, "intermediate_size": 16, "num_hidden_layers": 1,
             "num_attention_heads": 2, "max_position_embeddings": 77, "bos_token_id": 1, "eos_token_id": 0,
             "pad_token_id": 0}


@pytest.fixture
def sd(monkeypatch, tmp_path):
    """A CLIP-conditioned LDM like Stable Diffusion v1 (KL first stage, a tiny CLIP text model) in a Lightning .ckpt
    whose CLIP keys use transformers 4's layout (text_model.*, position_ids), as SD's released file."""
    pytest.importorskip("transformers")
    monkeypatch.setenv("MINILDM_CHECKPOINTS", str(tmp_path / "official"))
    monkeypatch.setattr(conditioning, "VIT_L14_TEXT", TINY_CLIP)
    ae = Config(model="autoencoder", autoencoder=AutoencoderConfig(
        kind="kl", image_size=16, channels=8, channel_mult=(1, 2), num_res_blocks=1, z_channels=2, embed_dim=2,
        norm_groups=4))
    register_first_stage(monkeypatch, ae)
    config = ldm_config("sd-v1")
    torch.manual_seed(0)
    source = randomized(latent.build(config, pretrained=False))
    register(monkeypatch, "test-sd", config, "test-sd.ckpt", params=count(source.unet))
    state = official_layout(source)
    clip = "cond_stage_model.transformer."
    for key in [k for k in state if k.startswith(clip) and not k.startswith(clip + "text_model.")]:
        state[clip + "text_model." + key[len(clip):]] = state.pop(key)
    state[clip + "text_model.embeddings.position_ids"] = torch.arange(77)[None]
    (tmp_path / "official").mkdir()
    lightning_ckpt(tmp_path / "official" / "test-sd.ckpt", state)
    source.cond_stage_model._tokenizer = TinyCLIPTokenizer()
    return source


def test_a_clip_conditioned_ldm_samples_a_prompt_from_the_command_line(sd, tmp_path, monkeypatch):
    fetched = []

    def from_hub(self, kind):
        fetched.append((self.version, kind.__name__))
        return TinyCLIPTokenizer()

    monkeypatch.setattr(conditioning.FrozenCLIPEmbedder, "_from_hub", from_hub)
    ldm = latent.load_official("test-sd")
    # only the tokenizer: the weights are in the file
    assert fetched == [("openai/clip-vit-large-patch14", "CLIPTokenizer")]
    for key, value in sd.state_dict().items():
        assert torch.equal(ldm.state_dict()[key], value), key
    assert ldm.scale_factor.item() == pytest.approx(0.18215)  # SD v1's, from the preset (the file stores none)
    out = tmp_path / "grid.png"
    args = _parser().parse_args(["sample", "test-sd", "--prompt", "a red circle", "--guidance-scale", "7.5",
                                 "--sampler", "plms", "--steps", "3", "--num", "2", "--device", "cpu",
                                 "--out", str(out)])
    assert _sample_latent(args) == 0
    expected = latent.sample(sd, minildm.build_diffusion(sd.config), ["a red circle"] * 2, sampler="plms", steps=3,
                             guidance_scale=7.5, seed=0)
    train.save_grid(expected, tmp_path / "expected.png")
    assert np.array_equal(pixels(out), pixels(tmp_path / "expected.png"))
    args.prompt = None
    with pytest.raises(ValueError, match="give --prompt"):
        _sample_latent(args)


def test_offline_the_clip_tokenizer_says_how_to_fetch_it(sd, tmp_path, monkeypatch, capsys):
    transformers = pytest.importorskip("transformers")

    def offline_hub(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' to load the files")

    monkeypatch.setattr(transformers.CLIPTokenizer, "from_pretrained", offline_hub)
    with pytest.raises(conditioning.PretrainedWeightsUnavailable, match="CLIPTokenizer of 'openai/clip-vit-large-"
                                                                        "patch14' is not in the Hugging Face cache"):
        latent.load_official("test-sd")
    args = _parser().parse_args(["sample", "test-sd", "--prompt", "a cat", "--device", "cpu",
                                 "--out", str(tmp_path / "grid.png")])
    with pytest.raises(ConnectionError, match="huggingface-cli download openai/clip-vit-large-patch14"):
        _sample_latent(args)
    assert not (tmp_path / "grid.png").exists()
