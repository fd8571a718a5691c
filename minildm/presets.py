"""The single table of named presets, from seconds-on-CPU toys to the papers' exact models.

    >>> from minildm import presets
    >>> presets.names()                     # every preset
    >>> config = presets.get("ddpm-cifar10")  # a fresh `Config`, safe to modify
    >>> presets.info("ddpm-cifar10").params   # exact parameter count of the original network

Each entry cites its source (paper table or official README flags), the exact parameter count
that the original code builds (tests check it against the checkpoint manifests in tests/reference),
the training recipe (in the config's `train` and `diffusion` sections) and the result the paper
reported with it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

from minildm import config as config_lib
from minildm.config import (AutoencoderConfig, AutoencoderLossConfig, ClassifierConfig, Config, DataConfig,
                            DiffusionConfig, MLPConfig, SampleConfig, TrainConfig, UNetConfig)


@dataclass(frozen=True)
class Preset:
    """A named config plus what it reproduces: source, exact parameter count, reported result."""

    name: str
    config: Config
    summary: str
    source: str = ""
    params: int | None = None  # parameters of the original network (None for course toys)
    result: str = ""
    checkpoint: str = ""  # file name of the official checkpoint, if one was released


_REGISTRY: dict[str, Preset] = {}


def register(preset: Preset) -> Preset:
    """Add a preset to the table (names are unique)."""
    if preset.name in _REGISTRY:
        raise ValueError(f"preset {preset.name!r} is already registered")
    config_lib.validate(preset.config)
    _REGISTRY[preset.name] = preset
    return preset


def names() -> list[str]:
    """All preset names, in registration order (toys first, then papers)."""
    return list(_REGISTRY)


def info(name: str) -> Preset:
    """The whole `Preset` record of `name` (its config is shared: use `get` to modify one)."""
    if name not in _REGISTRY:
        raise KeyError(f"unknown preset {name!r}; available presets: {', '.join(names())}")
    return _REGISTRY[name]


def get(name: str) -> Config:
    """A fresh copy of the config of preset `name`."""
    return copy.deepcopy(info(name).config)


# ---------------------------------------------------------------------------------------------
# Course toys: run on a laptop CPU in seconds to minutes.

register(Preset(
    name="toy-2d",
    summary="2-D toy distribution, MLP denoiser, 200 linear steps: trains in seconds on a CPU (chapters 01-02)",
    config=Config(
        model="mlp",
        mlp=MLPConfig(),
        diffusion=DiffusionConfig(num_timesteps=200, beta_schedule="linear", model_var_type="fixed_small"),
        data=DataConfig(dataset="toy2d", toy="moons", random_flip=False),
        train=TrainConfig(batch_size=256, lr=1e-3, warmup_steps=100, max_steps=3000, ema_decay=0.99,
                          log_every=100, sample_every=0, save_every=1000, out_dir="runs/toy-2d"),
        sample=SampleConfig(num_samples=2000, batch_size=2000, clip_denoised=False),
    ),
))

# The image toys are 32 channels wide. With GroupNorm's 32 groups every group would be a single channel,
# so the output norm would erase each image's per-channel mean and the network could not predict the
# mean colour of eps: samples keep coloured backgrounds. 8 groups of 4 channels keep that information
# (the paper models, >= 128 channels, have groups of >= 4 channels too).
register(Preset(
    name="toy-shapes",
    summary="16x16 procedural shapes, tiny UNet (ch 32): the small image toy of chapters 01-03",
    config=Config(
        unet=UNetConfig(image_size=16, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                        attention_resolutions=(8,), dropout=0.0, num_head_channels=32, norm_groups=8),
        diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="linear", model_var_type="fixed_large",
                                  snr_gamma=5.0),
        data=DataConfig(dataset="shapes", image_size=16),
        train=TrainConfig(batch_size=16, lr=1e-3, warmup_steps=100, max_steps=2000, ema_decay=0.999,
                          sample_every=500, save_every=500, out_dir="runs/toy-shapes"),
        sample=SampleConfig(num_samples=16, batch_size=16),
    ),
))

# The shipped CPU checkpoints. Recipe from the levers experiment (data/results/levers_*.json): batch 16,
# lr 1e-3, EMA 0.999 with warm-up, Min-SNR-5 loss weighting, one thread per run (two runs side by side
# use both cores), the learning rate constant to step 6,000 and then a cosine to 0 (the late-training lever).
# 9,600 steps is what two side-by-side runs reach in under an hour on an idle 2-core CPU (3 steps/s each).
_SHAPES_UNET = UNetConfig(image_size=32, channels=32, channel_mult=(1, 2, 2), num_res_blocks=1,
                          attention_resolutions=(8,), dropout=0.0, num_head_channels=32, norm_groups=8)
_SHAPES_DIFFUSION = DiffusionConfig(num_timesteps=1000, beta_schedule="linear", model_var_type="fixed_large",
                                    snr_gamma=5.0)
_SHAPES_TRAIN = TrainConfig(batch_size=16, lr=1e-3, warmup_steps=200, max_steps=9600, lr_schedule="cosine",
                            lr_decay_steps=3600, ema_decay=0.999,
                            sample_every=500, save_every=250, log_every=50, out_dir="runs/ddpm-shapes")

register(Preset(
    name="ddpm-shapes",
    summary="32x32 procedural shapes, small DDPM UNet (ch 32, mult 1,2,2, attention 8x8): the shipped CPU checkpoint",
    config=Config(
        unet=copy.deepcopy(_SHAPES_UNET),
        diffusion=copy.deepcopy(_SHAPES_DIFFUSION),
        data=DataConfig(dataset="shapes", image_size=32),
        train=copy.deepcopy(_SHAPES_TRAIN),
        sample=SampleConfig(num_samples=64, batch_size=64),
    ),
))

register(Preset(
    name="ddpm-shapes-cond",
    summary="ddpm-shapes conditioned on the kind of shape (5 classes + a null class, 10% label dropout): "
            "the shipped class-conditional CPU checkpoint, for classifier-free guidance",
    config=Config(
        unet=copy.deepcopy(_SHAPES_UNET),
        diffusion=copy.deepcopy(_SHAPES_DIFFUSION),
        data=DataConfig(dataset="shapes", image_size=32),
        train=copy.deepcopy(_SHAPES_TRAIN),
        sample=SampleConfig(num_samples=64, batch_size=64),
    ),
))
_COND = _REGISTRY["ddpm-shapes-cond"].config
_COND.unet.num_classes, _COND.unet.null_class = 5, True
_COND.train.cond_dropout, _COND.train.out_dir = 0.1, "runs/ddpm-shapes-cond"

# The same, conditioned on kind x colour (35 classes, `data.label=kind_color`): classifier-free guidance with a
# condition that fixes both the kind and the colour of a shape (chapter 04). Trained as its twins: 9,600 steps,
# the last 3,600 a cosine decay.
register(Preset(
    name="ddpm-shapes-cond-kind-color",
    summary="ddpm-shapes conditioned on kind x colour (35 classes + a null class, 10% label dropout): "
            "classifier-free guidance towards a kind and a colour (chapter 04)",
    config=copy.deepcopy(_COND),
))
_KIND_COLOR_COND = _REGISTRY["ddpm-shapes-cond-kind-color"].config
_KIND_COLOR_COND.unet.num_classes, _KIND_COLOR_COND.data.label = 35, "kind_color"
_KIND_COLOR_COND.train.out_dir = "runs/ddpm-shapes-cond-kind-color"

# The noise-aware classifier that guides ddpm-shapes (chapter 04): ADM's classifier in miniature, on the same
# process, so it learns p(kind | x_t, t) at every noise level the sampler visits.
register(Preset(
    name="shapes-classifier",
    summary="noise-aware classifier of the 5 shape kinds on 32x32 x_t (ddpm-shapes' process): ch 32, mult 1,2,2, "
            "attention 8x8, attention pool; guides ddpm-shapes (chapter 04)",
    config=Config(
        model="classifier",
        classifier=ClassifierConfig(image_size=32, out_channels=5, channels=32, channel_mult=(1, 2, 2),
                                    num_res_blocks=1, attention_resolutions=(8,), dropout=0.0, num_head_channels=32,
                                    norm_groups=8, use_scale_shift_norm=True, resblock_updown=True,
                                    pool="attention"),
        diffusion=copy.deepcopy(_SHAPES_DIFFUSION),
        data=DataConfig(dataset="shapes", image_size=32),
        train=TrainConfig(batch_size=32, lr=1e-3, weight_decay=0.05, warmup_steps=100, max_steps=2500,
                          lr_schedule="cosine", lr_decay_steps=1000, ema_decay=0.999, sample_every=0,
                          save_every=250, log_every=50, out_dir="runs/shapes-classifier"),
    ),
))

# The same classifier for the 35 classes kind x colour (class = kind * 7 + colour, `data.ShapesDataset(label=
# "kind_color")`): guidance towards a kind *and* a colour, as ADM's ImageNet classes are fine-grained (chapter 04).
register(Preset(
    name="shapes-classifier-kind-color",
    summary="noise-aware classifier of the 35 kind x colour classes on 32x32 x_t (ddpm-shapes' process): "
            "shapes-classifier with 35 outputs; guides ddpm-shapes to a kind and a colour (chapter 04)",
    config=copy.deepcopy(_REGISTRY["shapes-classifier"].config),
))
_KIND_COLOR = _REGISTRY["shapes-classifier-kind-color"].config
_KIND_COLOR.classifier.out_channels, _KIND_COLOR.data.label = 35, "kind_color"
# 2,500 steps named the colour at every t <= 300 but the kind of only 89% of clean shapes: seven times the classes
# take longer; 6,000 steps, the last 2,000 a cosine decay.
_KIND_COLOR.train.max_steps, _KIND_COLOR.train.lr_decay_steps = 6000, 2000
_KIND_COLOR.train.out_dir = "runs/shapes-classifier-kind-color"

# LDM's first stage in small (chapter 05, used by chapter 06): 32x32 shapes <-> 8x8x3 latents (f = 4, 16x fewer
# numbers). LDM's architecture and loss at width 32, one res block per level; the perceptual term is the
# offline substitute (distances of shapes-classifier features, not LPIPS); a two-layer PatchGAN (LDM's vq-f8
# depth: 6x6 patches of a 32x32 image) is configured from halfway but off (disc_factor 0, below; `disc_factor=1`
# turns it on). Adam betas (0.5, 0.9) as LDM, a higher lr for the small net.


def _shapes_autoencoder(kind, summary, loss, **autoencoder):
    name = f"ae-{kind}-f4-shapes"
    return register(Preset(
        name=name,
        summary=summary,
        config=Config(
            model="autoencoder",
            autoencoder=AutoencoderConfig(kind=kind, image_size=32, channels=32, channel_mult=(1, 2, 2),
                                          num_res_blocks=1, attention_resolutions=(), z_channels=3, embed_dim=3,
                                          norm_groups=8, **autoencoder),
            autoencoder_loss=AutoencoderLossConfig(perceptual="classifier_features", disc_start=1200,
                                                   disc_num_layers=2, **loss),
            data=DataConfig(dataset="shapes", image_size=32, random_flip=False, num_samples=20_000),
            train=TrainConfig(batch_size=16, lr=1e-3, adam_betas=(0.5, 0.9), warmup_steps=100, max_steps=2400,
                              lr_schedule="cosine", lr_decay_steps=800, grad_clip=0.0, ema_decay=0.0,
                              sample_every=0, save_every=500, log_every=50, out_dir=f"runs/{name}"),
        ),
    ))


# Both leave the GAN term out (disc_factor 0). Half-way through so short a run it made reconstructions worse: the
# KL model's logged reconstruction term (L1 + perceptual, per pixel) rose from 0.06-0.12 to 0.24 within 100 steps
# (its nll is a sum over pixels, so the adaptive weight reached LDM's clamp, 0.5 x 1e4, against a fresh
# discriminator), a VQ model trained with it reached 26.4 dB (32.4 without), and at 1,500 steps it costs the KL
# model 1.8 dB (experiments.autoencoders losses). LDM starts it at step 50,001 (KL).
_shapes_autoencoder("kl", "KL autoencoder for 32x32 shapes, f=4 (8x8x3 latent): ch 32, mult 1,2,2, L1 + "
                    "classifier-feature perceptual + KL 1e-6, no GAN term (chapters 05-06)",
                    dict(kl_weight=1e-6, disc_weight=0.5, disc_factor=0.0))
_shapes_autoencoder("vq", "VQ autoencoder for 32x32 shapes, f=4 (8x8x3 latent, 256 codes): ch 32, mult 1,2,2, L1 + "
                    "classifier-feature perceptual + codebook loss, no GAN term (chapters 05-06)",
                    dict(codebook_weight=1.0, disc_weight=0.75, disc_factor=0.0), n_embed=256)

# ---------------------------------------------------------------------------------------------
# DDPM, Ho et al. 2020 (hojonathanho/diffusion): Adam (= AdamW with weight decay 0),
# warmup 5000, grad clip 1, EMA 0.9999, random flips, T=1000 linear betas 1e-4..0.02.

_DDPM_DIFFUSION = DiffusionConfig(num_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)

register(Preset(
    name="ddpm-cifar10",
    summary="DDPM CIFAR10 UNet (unet2d16b2): ch 128, mult 1,2,2,2, 2 res blocks, attention 16x16, dropout 0.1",
    source="Ho et al. 2020, App. B; scripts/run_cifar.py",
    params=35_746_307,
    result="FID 3.17, IS 9.46, NLL <= 3.75 bits/dim (Tab. 1, L_simple)",
    config=Config(
        unet=UNetConfig(image_size=32, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
                        attention_resolutions=(16,), dropout=0.1),
        diffusion=copy.deepcopy(_DDPM_DIFFUSION),
        data=DataConfig(dataset="cifar10", image_size=32, random_flip=True),
        train=TrainConfig(batch_size=128, lr=2e-4, warmup_steps=5000, max_steps=800_000, grad_clip=1.0,
                          ema_decay=0.9999, out_dir="runs/ddpm-cifar10"),
        sample=SampleConfig(num_samples=64, batch_size=64),
    ),
))


def _ddpm256(name, dataset, steps, result, data, flip=True):
    # The 256x256 models use the older GaussianDiffusion (diffusion_utils.py): posterior variance.
    return register(Preset(
        name=name,
        summary=f"DDPM {dataset} 256x256 UNet (unet2d16b2c112244): ch 128, mult 1,1,2,2,4,4, attention 16x16",
        source=f"Ho et al. 2020, App. B; scripts/run_{'celebahq' if 'celeba' in dataset else 'lsun'}.py",
        params=113_673_219,
        result=result,
        config=Config(
            unet=UNetConfig(image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                            attention_resolutions=(16,), dropout=0.0),
            diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                                      model_var_type="fixed_small"),
            data=DataConfig(**data, image_size=256, random_flip=flip),
            train=TrainConfig(batch_size=64, lr=2e-5, warmup_steps=5000, max_steps=steps, ema_decay=0.9999,
                              out_dir=f"runs/{name}"),
            sample=SampleConfig(num_samples=16, batch_size=16),
        ),
    ))


_ddpm256("ddpm-celebahq256", "CelebA-HQ", 500_000, "samples only (no FID reported)", dict(dataset="celebahq"))
_ddpm256("ddpm-lsun-church256", "LSUN Church", 1_200_000, "FID 7.89",
         dict(dataset="lsun", category="church_outdoor"))
_ddpm256("ddpm-lsun-bedroom256", "LSUN Bedroom", 2_400_000, "FID 6.36 (114M model)",
         dict(dataset="lsun", category="bedroom"), flip=False)
_ddpm256("ddpm-lsun-cat256", "LSUN Cat", 1_800_000, "FID 19.75", dict(dataset="lsun", category="cat"))

# ---------------------------------------------------------------------------------------------
# Improved DDPM, Nichol & Dhariwal 2021 (improved-diffusion README flags): cosine schedule,
# T=4000, learned range variance, L_hybrid (vb rescaled by T/1000), lr 1e-4, EMA 0.9999.

_IDDPM_UNET = dict(num_res_blocks=3, attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True,
                   learn_sigma=True, time_scale=1000 / 4000)  # rescale_timesteps=True: the net sees t * 1000 / T
_IDDPM_DIFFUSION = dict(num_timesteps=4000, beta_schedule="cosine", model_var_type="learned_range",
                        loss_type="hybrid")

register(Preset(
    name="iddpm-cifar10",
    summary="iDDPM CIFAR-10: ch 128, 3 res blocks, attention 16,8 with 4 heads, AdaGN, learned sigma, dropout 0.3",
    source="Nichol & Dhariwal 2021; improved-diffusion README (cifar10_uncond_50M_500K.pt)",
    params=52_546_438,
    result="NLL 2.94 bits/dim with L_vlb [secondary summary, not checked against the paper text]",
    checkpoint="cifar10_uncond_50M_500K.pt",
    config=Config(
        unet=UNetConfig(image_size=32, channels=128, channel_mult=(1, 2, 2, 2), dropout=0.3, **_IDDPM_UNET),
        diffusion=DiffusionConfig(**_IDDPM_DIFFUSION),
        data=DataConfig(dataset="cifar10", image_size=32),
        train=TrainConfig(batch_size=128, lr=1e-4, warmup_steps=0, max_steps=500_000, ema_decay=0.9999,
                          out_dir="runs/iddpm-cifar10"),
    ),
))

register(Preset(
    name="iddpm-imagenet64",
    summary="iDDPM ImageNet 64 unconditional: ch 128, mult 1,2,3,4, 3 res blocks, learned sigma",
    source="Nichol & Dhariwal 2021; improved-diffusion README (imagenet64_uncond_100M_1500K.pt)",
    params=121_063_942,
    result="NLL 3.53 bits/dim with L_vlb [secondary summary, not checked against the paper text]",
    checkpoint="imagenet64_uncond_100M_1500K.pt",
    config=Config(
        unet=UNetConfig(image_size=64, channels=128, channel_mult=(1, 2, 3, 4), dropout=0.0, **_IDDPM_UNET),
        diffusion=DiffusionConfig(**_IDDPM_DIFFUSION),
        # the downsampled ImageNet 64x64 of image-net.org ("Train (64x64)"), not ILSVRC centre crops
        data=DataConfig(dataset="imagefolder", path="data/imagenet64_downsampled", image_size=64, random_flip=False),
        train=TrainConfig(batch_size=128, lr=1e-4, warmup_steps=0, max_steps=1_500_000, ema_decay=0.9999,
                          out_dir="runs/iddpm-imagenet64"),
    ),
))

register(Preset(
    name="iddpm-imagenet64-cond",
    summary="iDDPM ImageNet 64 class-conditional: ch 192, 3 res blocks, learned sigma, 1000 classes",
    source="Nichol & Dhariwal 2021; improved-diffusion README (imagenet64_cond_270M_250K.pt)",
    params=273_049_350,
    result="released checkpoint; no headline number in PAPER_FACTS",
    checkpoint="imagenet64_cond_270M_250K.pt",
    config=Config(
        # README flags --rescale_learned_sigmas False --rescale_timesteps False: the net sees t itself, and the
        # loss is mse + vb, i.e. hybrid_lambda * T = 1 with T = 4000.
        unet=UNetConfig(image_size=64, channels=192, channel_mult=(1, 2, 3, 4), dropout=0.0, num_classes=1000,
                        **{**_IDDPM_UNET, "time_scale": 1.0}),
        diffusion=DiffusionConfig(**_IDDPM_DIFFUSION, hybrid_lambda=1 / 4000),
        data=DataConfig(dataset="imagenet", image_size=64, random_flip=False),
        train=TrainConfig(batch_size=2048, lr=3e-4, warmup_steps=0, max_steps=250_000, ema_decay=0.9999,
                          out_dir="runs/iddpm-imagenet64-cond"),
    ),
))

register(Preset(
    name="iddpm-lsun-bedroom256",
    summary="iDDPM LSUN Bedroom 256: DDPM's 256 UNet with learned sigma (ch 128, 1 head, attention 16, no AdaGN)",
    source="Nichol & Dhariwal 2021; improved-diffusion README (lsun_uncond_100M_1200K_bs128.pt)",
    params=113_676_678,
    result="released checkpoint; no headline number in PAPER_FACTS",
    checkpoint="lsun_uncond_100M_1200K_bs128.pt",
    config=Config(
        unet=UNetConfig(image_size=256, channels=128, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_resolutions=(16,), num_heads=1, dropout=0.0, learn_sigma=True),
        diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="linear", model_var_type="learned_range",
                                  loss_type="hybrid"),
        data=DataConfig(dataset="lsun", category="bedroom", image_size=256, random_flip=False),
        train=TrainConfig(batch_size=128, lr=1e-4, warmup_steps=0, max_steps=1_200_000, ema_decay=0.9999,
                          out_dir="runs/iddpm-lsun-bedroom256"),
    ),
))

register(Preset(
    name="iddpm-upsampler-64-256",
    summary="iDDPM 64->256 class-conditional upsampler: ch 192, 2 res blocks, attention 16,8 with 4 heads, AdaGN",
    source="Nichol & Dhariwal 2021; improved-diffusion README (upsample_cond_500K.pt)",
    params=279_792_390,
    result="released checkpoint; no headline number in PAPER_FACTS",
    checkpoint="upsample_cond_500K.pt",
    config=Config(
        unet=UNetConfig(image_size=256, channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                        attention_resolutions=(16, 8), num_heads=4, use_scale_shift_norm=True, learn_sigma=True,
                        dropout=0.0, num_classes=1000, super_res=True, time_scale=1000 / 4000),
        diffusion=DiffusionConfig(num_timesteps=4000, beta_schedule="linear", model_var_type="learned_range",
                                  loss_type="hybrid"),
        data=DataConfig(dataset="imagenet", image_size=256),
        train=TrainConfig(batch_size=256, lr=3e-4, warmup_steps=0, max_steps=500_000, ema_decay=0.9999,
                          out_dir="runs/iddpm-upsampler-64-256"),
    ),
))

# ---------------------------------------------------------------------------------------------
# ADM, Dhariwal & Nichol 2021 (guided-diffusion README flags, paper Tab. 11 and 13):
# attention at 32,16,8, BigGAN up/down, AdaGN, learned sigma, L_hybrid, EMA 0.9999.

_ADM_UNET = dict(num_res_blocks=2, attention_resolutions=(32, 16, 8), resblock_updown=True,
                 use_scale_shift_norm=True, learn_sigma=True)
_ADM_DIFFUSION = dict(num_timesteps=1000, beta_schedule="linear", model_var_type="learned_range", loss_type="hybrid")


def _adm(name, summary, params, result, checkpoint, unet, train, diffusion=None, data=None):
    return register(Preset(
        name=name, summary=summary, params=params, result=result, checkpoint=checkpoint,
        source="Dhariwal & Nichol 2021, Tab. 11/13; guided-diffusion README flags",
        config=Config(
            unet=UNetConfig(**{**_ADM_UNET, **unet}),
            diffusion=DiffusionConfig(**{**_ADM_DIFFUSION, **(diffusion or {})}),
            data=data or DataConfig(dataset="imagenet", image_size=unet["image_size"], random_flip=True),
            train=TrainConfig(warmup_steps=0, ema_decay=0.9999, out_dir=f"runs/{name}", **train),
            sample=SampleConfig(timestep_respacing="250", num_samples=16, batch_size=16),
        ),
    ))


_adm("adm-imagenet64", "ADM ImageNet 64 conditional: ch 192, 3 res blocks, 64 ch/head, new attention order, cosine",
     295_904_454, "FID 2.07 (ADM, dropout; Tab. 5)", "64x64_diffusion.pt",
     dict(image_size=64, channels=192, channel_mult=(1, 2, 3, 4), num_res_blocks=3, num_head_channels=64,
          use_new_attention_order=True, dropout=0.1, num_classes=1000),
     dict(batch_size=2048, lr=3e-4, max_steps=540_000), diffusion=dict(beta_schedule="cosine"))
_adm("adm-imagenet128", "ADM ImageNet 128 conditional: ch 256, mult 1,1,2,3,4, 4 heads",
     421_529_606, "FID 5.91 (ADM), 2.97 with classifier guidance (ADM-G; Tab. 5)", "128x128_diffusion.pt",
     dict(image_size=128, channels=256, channel_mult=(1, 1, 2, 3, 4), num_heads=4, dropout=0.0, num_classes=1000),
     dict(batch_size=256, lr=1e-4, max_steps=4_360_000))
_adm("adm-imagenet256", "ADM ImageNet 256 conditional: ch 256, mult 1,1,2,2,4,4, 64 ch/head",
     553_838_086, "FID 10.94 (ADM), 4.59 with classifier guidance (ADM-G; Tab. 5)", "256x256_diffusion.pt",
     dict(image_size=256, channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, dropout=0.0,
          num_classes=1000),
     dict(batch_size=256, lr=1e-4, max_steps=1_980_000))
_adm("adm-imagenet256-uncond", "ADM ImageNet 256 unconditional: as adm-imagenet256 without the class embedding",
     552_814_086, "FID 26.21; 12.00 with classifier guidance scale 10 (Tab. 4)", "256x256_diffusion_uncond.pt",
     dict(image_size=256, channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, dropout=0.0),
     dict(batch_size=256, lr=1e-4, max_steps=2_000_000))
_adm("adm-imagenet512", "ADM ImageNet 512 conditional: ch 256, mult 0.5,1,1,2,2,4,4, 64 ch/head",
     558_997_638, "FID 23.24 (ADM), 7.72 with classifier guidance (ADM-G; Tab. 5)", "512x512_diffusion.pt",
     dict(image_size=512, channels=256, channel_mult=(0.5, 1, 1, 2, 2, 4, 4), num_head_channels=64, dropout=0.0,
          num_classes=1000),
     dict(batch_size=256, lr=1e-4, max_steps=1_940_000))
for _animal, _steps, _fid, _flip in (("bedroom", 500_000, "1.90", False), ("cat", 200_000, "5.57", True),
                                    ("horse", 250_000, "2.57", True)):
    _adm(f"adm-lsun-{_animal}", f"ADM LSUN {_animal.capitalize()} 256: ImageNet-256 architecture, dropout 0.1",
         552_814_086, f"FID {_fid} (ADM, dropout; Tab. 5)", f"lsun_{_animal}.pt",
         dict(image_size=256, channels=256, channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64, dropout=0.1),
         dict(batch_size=256, lr=1e-4, max_steps=_steps),
         data=DataConfig(dataset="lsun", category=_animal, image_size=256, random_flip=_flip))
_adm("adm-upsampler-64-256", "ADM-U 64->256 upsampler: ch 192, 4 heads, class-conditional, low-res input concatenated",
     311_795_910, "FID 3.94 with ADM-G 64x64 base (ADM-G + ADM-U; Tab. 6)", "64_256_upsampler.pt",
     dict(image_size=256, channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_heads=4, dropout=0.0, num_classes=1000,
          super_res=True),
     dict(batch_size=256, lr=1e-4, max_steps=500_000))
_adm("adm-upsampler-128-512", "ADM-U 128->512 upsampler: ch 192, 64 ch/head, attention 32,16, class-conditional",
     308_835_270, "FID 3.85 with ADM-G 128x128 base, 250/250 steps (Tab. 6)", "128_512_upsampler.pt",
     dict(image_size=512, channels=192, channel_mult=(1, 1, 2, 2, 4, 4), num_head_channels=64,
          attention_resolutions=(32, 16), dropout=0.0, num_classes=1000, super_res=True),
     dict(batch_size=256, lr=1e-4, max_steps=1_050_000))

# ---------------------------------------------------------------------------------------------
# ADM's noise-aware classifiers (Dhariwal & Nichol 2021, Tab. 12; guided-diffusion README, create_classifier):
# width 128, attention at 32,16,8 (feature-map sides, as the README's --classifier_attention_resolutions),
# 64 channels per head, BigGAN down blocks, AdaGN, attention pooling, 1000 classes. Trained by
# scripts/classifier_train.py: AdamW, no EMA (ema_decay 0: the EMA copy is the model), no gradient clipping,
# on x_t = q_sample(x0, t) with uniform t. Its --anneal_lr (linear decay to 0) has no equivalent in
# TrainConfig; lr is kept constant. Only the schedule of the diffusion section matters (it makes x_t).


def _adm_classifier(image_size, params, channel_mult, depth, schedule, result, train):
    return register(Preset(
        name=f"adm-classifier{image_size}",
        summary=f"ADM noise-aware ImageNet {image_size} classifier: width 128, depth {depth}, "
                f"mult {','.join(f'{m:g}' for m in channel_mult)}, attention 32,16,8, attention pool",
        source="Dhariwal & Nichol 2021, Tab. 12; guided-diffusion README (classifier flags), create_classifier",
        params=params,
        result=result,
        checkpoint=f"{image_size}x{image_size}_classifier.pt",
        config=Config(
            model="classifier",
            classifier=ClassifierConfig(image_size=image_size, channels=128, channel_mult=channel_mult,
                                        num_res_blocks=depth, attention_resolutions=(32, 16, 8), num_head_channels=64,
                                        use_scale_shift_norm=True, resblock_updown=True, pool="attention",
                                        out_channels=1000),
            diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule=schedule),
            data=DataConfig(dataset="imagenet", image_size=image_size, random_flip=True),
            train=TrainConfig(warmup_steps=0, ema_decay=0.0, grad_clip=0.0,
                              out_dir=f"runs/adm-classifier{image_size}", **train),
        ),
    ))


# Tab. 12: weight decay 0.2 | 0.05 | 0.05 | 0.05, batch 1024 | 256 | 256 | 256, iterations 300K | 300K | 500K |
# 500K, lr 6e-4 | 3e-4 | 3e-4 | 3e-4 (the README's 128x128 training flags agree: bs 256, lr 3e-4, wd 0.05, 300K).
_adm_classifier(64, 65_438_568, (1, 2, 3, 4), 4, "cosine",
                "guides adm-imagenet64 at scale 1.0 (README, Tab. 14); the paper's best 64x64 FID, 2.07, is unguided",
                dict(batch_size=1024, lr=6e-4, weight_decay=0.2, max_steps=300_000))
_adm_classifier(128, 42_568_040, (1, 1, 2, 3, 4), 2, "linear",
                "ADM-G 128: FID 2.97 with adm-imagenet128 at scale 0.5, 250 steps; 5.98 in 25 DDIM steps (Tab. 5, 14)",
                dict(batch_size=256, lr=3e-4, weight_decay=0.05, max_steps=300_000))
_adm_classifier(256, 54_096_360, (1, 1, 2, 2, 4, 4), 2, "linear",
                "ADM-G 256: FID 4.59 with adm-imagenet256 at scale 1.0; the unconditional model at scale 10: 12.00 "
                "(Tab. 4)",
                dict(batch_size=256, lr=3e-4, weight_decay=0.05, max_steps=500_000))
_adm_classifier(512, 54_448_360, (0.5, 1, 1, 2, 2, 4, 4), 2, "linear",
                "ADM-G 512: FID 7.72 with adm-imagenet512 at scale 4.0, 250 steps; 8.41 in 25 DDIM steps (Tab. 5, 14)",
                dict(batch_size=256, lr=3e-4, weight_decay=0.05, max_steps=500_000))

# ---------------------------------------------------------------------------------------------
# LDM's first-stage autoencoders (Rombach et al. 2022, Tab. 8; latent-diffusion README "Pretrained
# Autoencoding Models" and models/first_stage_models/*/config.yaml). Counts: encoder, decoder, quant_conv,
# post_quant_conv (+ codebook), without the training-only loss (LPIPS, discriminator). Trained on OpenImages
# 256x256 crops by main.py: Adam betas (0.5, 0.9) for the autoencoder and the discriminator, lr = batch x
# base 4.5e-6 (--scale_lr on one GPU), no EMA, no clipping, no warm-up. LDM calls training_step once per optimiser
# for each batch (the discriminator's call runs the autoencoder again, with a new posterior sample); minildm steps
# the discriminator on the reconstructions of the autoencoder's step.


def _ldm_autoencoder(name, kind, params, channel_mult, attention_resolutions, z, n_embed, batch, loss, result,
                     checkpoint, attention=True):
    f = 2 ** (len(channel_mult) - 1)
    return register(Preset(
        name=name,
        summary=f"LDM {kind.upper()}-f{f} autoencoder: 256x256x3 <-> {256 // f}x{256 // f}x{z}"
                + (f", codebook {n_embed}" if n_embed else "") + ("" if attention else ", no attention"),
        source="Rombach et al. 2022, Tab. 8; latent-diffusion README and " + checkpoint.replace(".zip", "")
               + "/config.yaml",
        params=params,
        result=result,
        checkpoint=checkpoint,
        config=Config(
            model="autoencoder",
            autoencoder=AutoencoderConfig(kind=kind, image_size=256, channels=128, channel_mult=channel_mult,
                                          num_res_blocks=2, attention_resolutions=attention_resolutions,
                                          attention=attention, z_channels=z, embed_dim=z, n_embed=n_embed),
            autoencoder_loss=AutoencoderLossConfig(**loss),
            data=DataConfig(dataset="imagefolder", image_size=256, random_flip=False),
            train=TrainConfig(batch_size=batch, lr=batch * 4.5e-6, adam_betas=(0.5, 0.9), warmup_steps=0,
                              ema_decay=0.0, grad_clip=0.0, max_steps=1_000_000, sample_every=0,
                              out_dir=f"runs/{name}"),
        ),
    ))


_KL_LOSS = dict(perceptual="lpips", kl_weight=1e-6, disc_start=50001, disc_weight=0.5)
_ldm_autoencoder("ae-kl-f4", "kl", 55_312_063, (1, 2, 4), (), 3, 0, 10, _KL_LOSS,
                 "rFID 0.27, PSNR 27.53 (README)", "kl-f4.zip")
_ldm_autoencoder("ae-kl-f8", "kl", 83_653_863, (1, 2, 4, 4), (), 4, 0, 4, _KL_LOSS,
                 "rFID 0.90, PSNR 24.19 (README); the first stage of LSUN-churches LDM-8 and of Stable Diffusion v1",
                 "kl-f8.zip")
_ldm_autoencoder("ae-kl-f16", "kl", 69_610_963, (1, 1, 2, 2, 4), (16,), 16, 0, 6, _KL_LOSS,
                 "rFID 0.87, PSNR 24.08 (README)", "kl-f16.zip")
_ldm_autoencoder("ae-kl-f32", "kl", 103_880_131, (1, 1, 2, 2, 4, 4), (16, 8), 64, 0, 6, _KL_LOSS,
                 "rFID 2.04, PSNR 22.27 (README)", "kl-f32.zip")
_ldm_autoencoder("ae-vq-f4", "vq", 55_322_782, (1, 2, 4), (), 3, 8192, 8,
                 dict(perceptual="lpips", disc_start=0, disc_weight=0.75, codebook_weight=1.0),
                 "rFID 0.58, PSNR 27.43 (README); the first stage of CelebA-HQ / FFHQ / bedrooms LDM-4 and cin256-v2",
                 "vq-f4.zip")
_ldm_autoencoder("ae-vq-f4-noattn", "vq", 53_219_486, (1, 2, 4), (), 3, 8192, 8,
                 dict(perceptual="lpips", disc_start=11, disc_weight=0.75, codebook_weight=1.0),
                 "rFID 1.06, PSNR 25.21 (README); the first stage of the inpainting model", "vq-f4-noattn.zip",
                 attention=False)
_ldm_autoencoder("ae-vq-f8", "vq", 67_717_295, (1, 2, 2, 4), (32,), 4, 16384, 10,
                 dict(perceptual="lpips", disc_start=1, disc_weight=0.6, disc_num_layers=2, codebook_weight=1.0),
                 "rFID 1.14, PSNR 23.07 (README); the first stage of cin-ldm-vq-f8", "vq-f8.zip")
_ldm_autoencoder("ae-vq-f8-n256", "vq", 67_652_783, (1, 2, 2, 4), (32,), 4, 256, 10,
                 dict(perceptual="lpips", disc_start=250001, disc_weight=0.75, codebook_weight=1.0),
                 "rFID 1.49, PSNR 22.35 (README)", "vq-f8-n256.zip")
_ldm_autoencoder("ae-vq-f16", "vq", 69_593_371, (1, 1, 2, 2, 4), (16,), 8, 16384, 14,
                 dict(perceptual="lpips", disc_start=250001, disc_weight=0.75, disc_num_layers=2, codebook_weight=1.0),
                 "rFID 5.15, PSNR 20.83 (README)", "vq-f16.zip")

# ---------------------------------------------------------------------------------------------
# Latent diffusion, Rombach et al. 2022 (latent-diffusion model-zoo configs; Stable Diffusion's
# v1-inference.yaml). The UNet sections are the configs' unet_config kwargs, converted by the one converter of the
# originals' kwargs; `minildm.build_model` builds the UNet, `latent.build` the whole model (first stage:
# latent.first_stage; conditioner: latent.conditioner). LDM's "linear" betas are linear in sqrt(beta) (minildm's
# "scaled_linear"). Learning rates are the configs' base_learning_rate: LDM's main.py multiplies it by
# batch size x GPUs x gradient accumulation (--scale_lr, on by default). The released files are named in `source`;
# those with a `checkpoint` download and load by preset name (`latent.load_official("sd-v1")`).

def _ldm(name, summary, params, unet_kwargs, first_stage, scale_factor, beta_end, data, batch, lr, result,
         source, beta_start=0.0015, latent=None, ema=0.9999, checkpoint=""):
    from minildm.config import LatentConfig
    from minildm.unet import config_from_original

    return register(Preset(
        name=name,
        summary=summary,
        source="Rombach et al. 2022; " + source,
        params=params,
        result=result,
        checkpoint=checkpoint,
        config=Config(
            unet=config_from_original(unet_kwargs),
            latent=LatentConfig(first_stage=first_stage, scale_factor=scale_factor, **(latent or {})),
            diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="scaled_linear", beta_start=beta_start,
                                      beta_end=beta_end),
            data=data,
            train=TrainConfig(batch_size=batch, lr=lr, warmup_steps=0, grad_clip=0.0, ema_decay=ema,
                              max_steps=1_000_000, out_dir=f"runs/{name}"),
            sample=SampleConfig(sampler="ddim", timestep_respacing="ddim50", clip_denoised=False),
        ),
    ))


_ldm("ldm-celebahq256", "LDM-VQ-4 on CelebA-HQ 256: 64x64x3 VQ-f4 latents, ch 224, mult 1,2,3,4, attention at "
     "32,16,8 (32 ch/head), unconditional", 274_056_163,
     dict(image_size=64, in_channels=3, out_channels=3, model_channels=224, attention_resolutions=[8, 4, 2],
          num_res_blocks=2, channel_mult=[1, 2, 3, 4], num_head_channels=32),
     "ae-vq-f4", 1.0, 0.0195, DataConfig(dataset="celebahq", image_size=256, random_flip=True), 48, 2e-6,
     "FID 5.11 (Tab. 1, 500 DDIM steps)", "models/ldm/celeba256/config.yaml (released as celeba.zip)")
_ldm("ldm-lsun-churches256", "LDM-KL-8 on LSUN-churches 256: 32x32x4 KL-f8 latents, ch 192, mult 1,2,2,4,4, "
     "attention at every level (8 heads), scale-shift norm, resblock up/down, unconditional; LDM trains it with an "
     "L1 loss (minildm: L2) and scale_by_std (the checkpoint's scale_factor replaces 1.0 on load)", 294_966_916,
     dict(image_size=32, in_channels=4, out_channels=4, model_channels=192, attention_resolutions=[1, 2, 4, 8],
          num_res_blocks=2, channel_mult=[1, 2, 2, 4, 4], num_heads=8, use_scale_shift_norm=True,
          resblock_updown=True),
     "ae-kl-f8", 1.0, 0.0155, DataConfig(dataset="lsun", category="church_outdoor", image_size=256), 96, 5e-5,
     "FID 4.02 (Tab. 1, 200 DDIM steps, eta 0)", "models/ldm/lsun_churches256/config.yaml (released as lsun_churches.zip)")
_ldm("ldm-cin256-v2", "Class-conditional LDM-VQ-4 on ImageNet 256 (cin256-v2): 64x64x3 VQ-f4 latents, ch 192, "
     "mult 1,2,3,5, SpatialTransformer at sides 32,16,8 (1 head), context: ClassEmbedder 1001 x 512 "
     "(index 1000 the null class, classifier-free guidance)", 400_920_579,
     dict(image_size=64, in_channels=3, out_channels=3, model_channels=192, attention_resolutions=[8, 4, 2],
          num_res_blocks=2, channel_mult=[1, 2, 3, 5], num_heads=1, use_spatial_transformer=True,
          transformer_depth=1, context_dim=512),
     "ae-vq-f4", 1.0, 0.0195, DataConfig(dataset="imagenet", image_size=256, random_flip=True), 64, 1e-4,
     "FID 3.60, IS 247.67 with classifier-free scale 1.5 (Tab. 3, 250 DDIM steps)",
     "configs/latent-diffusion/cin256-v2.yaml (released as ommer-lab.com/files/latent-diffusion/nitro/cin/model.ckpt, "
     "saved here as cin256-v2.ckpt)",
     latent=dict(conditioner="class", cond_vocab=1001, cond_length=1), ema=0.0, checkpoint="cin256-v2.ckpt")
_ldm("sd-v1", "Stable Diffusion v1: 64x64x4 KL-f8 latents of 512x512 images, ch 320, mult 1,2,4,4, "
     "SpatialTransformer at sides 64,32,16 (8 heads), context: frozen CLIP ViT-L/14 text encoder (77 x 768, "
     "123,060,480 parameters), scale factor 0.18215", 859_520_964,
     dict(image_size=64, in_channels=4, out_channels=4, model_channels=320, attention_resolutions=[4, 2, 1],
          num_res_blocks=2, channel_mult=[1, 2, 4, 4], num_heads=8, use_spatial_transformer=True,
          transformer_depth=1, context_dim=768, legacy=False),
     "ae-kl-f8", 0.18215, 0.012, DataConfig(dataset="imagefolder", image_size=512, random_flip=False), 2048, 1e-4,
     "text-to-image at 512x512; FID and CLIP scores in the v1 model card (guidance 1.5-8, 50 PLMS steps)",
     "CompVis/stable-diffusion configs/stable-diffusion/v1-inference.yaml (released as sd-v1-1 ... sd-v1-4.ckpt; "
     "the preset loads sd-v1-4.ckpt from huggingface.co/CompVis/stable-diffusion-v-1-4-original)",
     beta_start=0.00085,
     latent=dict(conditioner="clip", cond_length=77), checkpoint="sd-v1-4.ckpt")

# Latent diffusion in small (chapter 06): 32x32 shapes through the shipped KL-f4 autoencoder of chapter 05
# (8x8x3 latents, its stored scale factor), a UNet of LDM's design (SpatialTransformer at both levels, cross-attention
# on the context) and LDM's process for f=4 models (sqrt-linear betas 0.0015..0.0195). The recipe is the shipped
# pixel models' (lr 1e-3, warm-up, cosine decay, EMA 0.999, Min-SNR-5), at batch 32; 10% condition dropout for
# classifier-free guidance. Captions (four attributes) and layouts (1-2 objects) train longer than classes: at 1,300
# steps the text model drew the asked kind, colour and position together for 7% of held-out captions. A first layout
# model (1-3 objects, a 16x16 lattice of corners, 6,000 steps) drew clean shapes but not in their boxes (IoU 0.12 with
# the boxes, real images 0.60); this one has 4x fewer corner tokens, each seen 4x as often, and at most 2 objects. The conditioner's vocabulary is set from the data by experiments.latent.

_SHAPES_LDM_UNET = UNetConfig(image_size=8, in_channels=3, out_channels=3, channels=64, channel_mult=(1, 2),
                              num_res_blocks=1, attention_resolutions=(8, 4), dropout=0.0, num_head_channels=32,
                              norm_groups=16, context_dim=64)


def _shapes_ldm(name, summary, latent, data, steps=4000, decay=1500):
    from minildm.config import LatentConfig

    return register(Preset(
        name=name,
        summary=summary,
        config=Config(
            unet=copy.deepcopy(_SHAPES_LDM_UNET),
            latent=LatentConfig(first_stage="data/checkpoints/ae-kl-f4-shapes.safetensors", scale_factor=0.0,
                                **latent),
            diffusion=DiffusionConfig(num_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.0015,
                                      beta_end=0.0195, snr_gamma=5.0),
            data=data,
            train=TrainConfig(batch_size=32, lr=1e-3, warmup_steps=200, max_steps=steps, lr_schedule="cosine",
                              lr_decay_steps=decay, ema_decay=0.999, cond_dropout=0.1, sample_every=0, save_every=500,
                              log_every=50, out_dir=f"runs/{name}"),
            sample=SampleConfig(sampler="ddim", clip_denoised=False),
        ),
    ))


_shapes_ldm("ldm-shapes-class", "class-conditional latent diffusion on 32x32 shapes: KL-f4 latents 8x8x3, UNet ch 64 "
            "with cross-attention on one class token (5 kinds + the null class) (chapter 06)",
            dict(conditioner="class", cond_vocab=6, cond_length=1), DataConfig(dataset="shapes", image_size=32,
                                                                                random_flip=False, num_samples=20_000))
_shapes_ldm("ldm-shapes-text", "text-to-image latent diffusion on 32x32 shapes: captions ('a large red circle on the "
            "left') through a word tokenizer and LDM's transformer text encoder (2 layers, width 64) trained with "
            "the UNet; KL-f4 latents 8x8x3 (chapter 06)",
            dict(conditioner="text", cond_vocab=26, cond_length=8, cond_layers=2),
            DataConfig(dataset="shapes", image_size=32, random_flip=False, num_samples=20_000), steps=8000, decay=3000)
_shapes_ldm("ldm-shapes-layout", "layout-to-image latent diffusion on 32x32 shapes with 1-2 small objects: each box "
            "becomes (kind, top-left, bottom-right) tokens on an 8x8 lattice (LDM's layout tokens) into LDM's "
            "transformer encoder (2 layers, width 64); KL-f4 latents 8x8x3 (chapter 06)",
            dict(conditioner="layout", cond_vocab=70, cond_length=6, cond_layers=2),
            DataConfig(dataset="shapes", image_size=32, random_flip=False, num_samples=20_000, max_objects=2),
            steps=7000, decay=2500)
