"""Checkpoints: safetensors round trip, strict architecture check, corrupted files, official weights offline."""

import urllib.error
import urllib.request

import pytest
import torch
from safetensors.torch import save_file

import minildm
from minildm import checkpoints, presets
from minildm.config import override


def tiny_config(*overrides):
    return override(presets.get("toy-shapes"), ["unet.channel_mult=1,2", "unet.attention_resolutions=8",
                                                *overrides])


@pytest.fixture
def saved(tmp_path):
    """A checkpoint of a tiny UNet with an EMA copy and a stepped AdamW optimizer."""
    torch.manual_seed(0)
    config = tiny_config()
    model, ema = minildm.build_model(config), minildm.build_model(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 16, 16), torch.tensor([1, 2])).square().mean().backward()
    optimizer.step()
    path = checkpoints.save(tmp_path / "run" / "ckpt.safetensors", model, config, ema=ema, optimizer=optimizer,
                            step=7, extra={"note": "test"})
    return path, config, model, ema, optimizer


def test_round_trip_rebuilds_model_ema_config(saved):
    path, config, model, ema, _ = saved
    loaded = checkpoints.load(path)
    assert loaded.step == 7 and loaded.config == config
    assert loaded.metadata["minildm_version"] == minildm.__version__
    assert loaded.metadata["extra"] == {"note": "test"}
    for original, restored in ((model, loaded.model), (ema, loaded.ema)):
        for (name, x), (_, y) in zip(original.state_dict().items(), restored.state_dict().items()):
            assert torch.equal(x, y), name
    assert not loaded.model.training and not loaded.ema.training
    assert checkpoints.load(path, ema=False).ema is None
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left behind


def test_optimizer_state_round_trip(saved):
    path, config, model, ema, optimizer = saved
    fresh = minildm.build_model(config)
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = checkpoints.load_training_state(path, fresh, optimizer=fresh_optimizer)
    assert state["step"] == 7
    before, after = optimizer.state_dict(), fresh_optimizer.state_dict()
    assert before["param_groups"] == after["param_groups"]
    for index, param_state in before["state"].items():
        for name, value in param_state.items():
            assert torch.equal(value, after["state"][index][name]), (index, name)


def test_weights_that_do_not_fit_name_every_difference(saved, tmp_path):
    path, config, model, _, _ = saved
    # Stored config says 2 levels, the weights come from a 3-level model: missing, unexpected, mis-shaped.
    other = minildm.build_model(tiny_config("unet.channel_mult=1,2,2", "unet.num_classes=5"))
    bad = checkpoints.save(tmp_path / "bad.safetensors", other, config)
    with pytest.raises(checkpoints.CheckpointError) as error:
        checkpoints.load(bad)
    message = str(error.value)
    assert "do not fit this UNet" in message
    assert "unexpected keys" in message and "label_emb.weight" in message
    assert "shape mismatches" in message and "out.2.weight" not in message  # same shape: not listed
    small = minildm.build_model(tiny_config("unet.num_res_blocks=2"))
    with pytest.raises(checkpoints.CheckpointError, match=r"missing keys \(\d+\): .*input_blocks"):
        checkpoints.load_weights(small, checkpoints.load(path).model.state_dict(), source="test")


def test_truncated_and_corrupted_files_raise_a_clear_error(saved, tmp_path):
    path = saved[0]
    data = path.read_bytes()
    for name, content in (("truncated", data[: len(data) // 2]), ("header", data[:40]),
                          ("garbage", b"\x00not a checkpoint at all" * 10), ("empty", b"")):
        broken = tmp_path / f"{name}.safetensors"
        broken.write_bytes(content)
        with pytest.raises(checkpoints.CheckpointError, match="truncated or corrupted"):
            checkpoints.load(broken)
    with pytest.raises(FileNotFoundError, match="no checkpoint at"):
        checkpoints.load(tmp_path / "missing.safetensors")
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(checkpoints.CheckpointError, match="not a minildm checkpoint"):
        checkpoints.load(foreign)


def test_a_failed_save_leaves_the_previous_checkpoint_intact(saved, monkeypatch):
    path, config, model, _, _ = saved
    before = path.read_bytes()

    def crash(tensors, filename, metadata=None):
        with open(filename, "wb") as file:
            file.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(checkpoints, "save_file", crash)
    with pytest.raises(OSError, match="disk full"):
        checkpoints.save(path, model, config, step=8)
    assert path.read_bytes() == before
    assert [p.name for p in path.parent.iterdir()] == [path.name]


def test_every_official_preset_has_a_documented_url():
    with_checkpoint = [name for name in presets.names() if presets.info(name).checkpoint]
    assert len(with_checkpoint) >= 12
    for name in with_checkpoint:
        url = checkpoints.official_url(name)
        assert url.startswith(("https://openaipublic.blob.core.windows.net/diffusion/",  # OpenAI
                               "https://ommer-lab.com/files/latent-diffusion/",  # latent-diffusion's model zoo
                               "https://huggingface.co/CompVis/"))  # Stable Diffusion v1-4
        if name != "ldm-cin256-v2":  # released as nitro/cin/model.ckpt, kept as cin256-v2.ckpt
            assert url.endswith("/" + presets.info(name).checkpoint)
    assert checkpoints.official_url("ldm-cin256-v2").endswith("/nitro/cin/model.ckpt")
    assert checkpoints.official_url("adm-imagenet64").endswith("/jul-2021/64x64_diffusion.pt")
    assert checkpoints.official_url("iddpm-cifar10").endswith("/march-2021/cifar10_uncond_50M_500K.pt")
    with pytest.raises(KeyError, match="has no official checkpoint; presets with one: iddpm-cifar10"):
        checkpoints.official_url("ddpm-cifar10")
    with pytest.raises(KeyError, match="unknown preset"):
        checkpoints.official_url("nope")


def test_offline_download_names_the_url_and_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("network is unreachable")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(ConnectionError) as error:
        checkpoints.fetch_official("adm-imagenet64", directory=tmp_path)
    message = str(error.value)
    assert "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/64x64_diffusion.pt" in message
    assert str(tmp_path / "64x64_diffusion.pt") in message and "by hand" in message
    assert [p.name for p in tmp_path.iterdir()] == [".gitignore"]  # no partial file; downloads are git-ignored
    # A file put there by hand is used without any network access.
    (tmp_path / "64x64_diffusion.pt").write_bytes(b"x")
    assert checkpoints.fetch_official("adm-imagenet64", directory=tmp_path) == tmp_path / "64x64_diffusion.pt"


def test_official_state_dict_loads_strictly_and_reports_differences(tmp_path):
    # An official file is a plain pickled state dict under guided-diffusion's names.
    config = tiny_config("unet.num_classes=10", "unet.learn_sigma=true", "unet.use_scale_shift_norm=true",
                         "diffusion.model_var_type=learned_range", "diffusion.loss_type=hybrid")
    original = minildm.build_model(config)
    torch.save(original.state_dict(), tmp_path / "official.pt")
    model = checkpoints.load_official_file(tmp_path / "official.pt", config)
    for x, y in zip(original.state_dict().values(), model.state_dict().values()):
        assert torch.equal(x, y)
    state = original.state_dict()
    state.pop("label_emb.weight")
    torch.save(state, tmp_path / "partial.pt")
    with pytest.raises(checkpoints.CheckpointError, match=r"missing keys \(1\): label_emb.weight"):
        checkpoints.load_official_file(tmp_path / "partial.pt", config)
    (tmp_path / "cut.pt").write_bytes((tmp_path / "official.pt").read_bytes()[:1000])
    with pytest.raises(checkpoints.CheckpointError, match="download it again"):
        checkpoints.load_official_file(tmp_path / "cut.pt", config)


def test_named_modules_and_their_optimizers_round_trip_strictly(tmp_path):
    """A checkpoint holds more networks than the model (a GAN's discriminator, later an LDM's parts) by name."""
    torch.manual_seed(0)
    config = tiny_config()
    model = minildm.build_model(config)
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    critic_optimizer = torch.optim.AdamW(critic.parameters(), lr=1e-3)
    critic(torch.randn(2, 3, 8, 8)).square().mean().backward()
    critic_optimizer.step()
    path = checkpoints.save(tmp_path / "ckpt.safetensors", model, config, modules={"critic": critic},
                            optimizers={"critic": critic_optimizer})
    assert checkpoints.read_metadata(path)["modules"] == ["critic"]
    fresh = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4))
    fresh_optimizer = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    checkpoints.load_training_state(path, minildm.build_model(config), modules={"critic": fresh},
                                    optimizers={"critic": fresh_optimizer})
    for (name, a), b in zip(critic.state_dict().items(), fresh.state_dict().values()):
        assert torch.equal(a, b), name  # weights and BatchNorm statistics
    assert torch.equal(fresh_optimizer.state_dict()["state"][0]["exp_avg"],
                       critic_optimizer.state_dict()["state"][0]["exp_avg"])
    assert not checkpoints.load_module(path, "critic", fresh).training
    # strict: a module of another shape names every difference; an absent name lists what is there
    with pytest.raises(checkpoints.CheckpointError, match=r"1\.weight: checkpoint \(4,\) vs model \(5,\)"):
        checkpoints.load_module(path, "critic", torch.nn.Sequential(torch.nn.Conv2d(3, 5, 3), torch.nn.BatchNorm2d(5)))
    with pytest.raises(checkpoints.CheckpointError, match="no module named 'discriminator'; it holds the model and"):
        checkpoints.load_module(path, "discriminator", fresh)
    with pytest.raises(ValueError, match="cannot hold a module named 'ema'"):
        checkpoints.save(tmp_path / "bad.safetensors", model, config, modules={"ema": critic})
