"""LDM's first stage: the KL- and VQ-regularised autoencoders that latent diffusion works in.

`AutoencoderKL` and `VQModel` follow latent-diffusion's ldm/models/autoencoder.py (Encoder / Decoder of
ldm/modules/diffusionmodules/model.py, taming-transformers' `VectorQuantizer2`) with their state_dict
names, so the model-zoo files (kl-f4 ... vq-f16, Stable Diffusion's VAE = KL-f8) load with `strict=True`:

    encoder       conv_in; per level num_res_blocks x ResnetBlock (+ AttnBlock where the side is in
                  attention_resolutions) and a Downsample except at the last level; mid: ResnetBlock,
                  AttnBlock, ResnetBlock; GroupNorm, swish, conv_out                 [N, z, H/f, W/f]
    quant_conv    1x1 conv to the latent's statistics: KL 2z -> 2 embed_dim (mean | log-variance),
                  VQ z -> embed_dim (the vector to quantise)
    quantize      VQ only: the nearest of n_embed codebook vectors, straight-through gradient
    post_quant_conv / decoder   the mirror image: 1x1 conv, conv_in, mid, per level num_res_blocks + 1
                  ResnetBlocks and an Upsample except at level 0, GroupNorm, swish, conv_out  [N, C, H, W]

f = 2^(len(channel_mult) - 1) is the downsampling factor: KL-f8 maps [N, 3, 256, 256] to [N, 4, 32, 32].
What differs from the diffusion UNet's blocks (and is easy to get wrong): GroupNorm eps 1e-6 computed in
the input dtype, no time embedding, Downsample pads right and bottom by one then convolves with stride 2
and no padding (a port of TensorFlow's 'SAME'), single-head attention with 1x1-conv q, k, v that exists
in the middle even when attention_resolutions is empty.

    >>> import minildm
    >>> ae = minildm.build_model(minildm.presets.get("ae-kl-f8"))    # Stable Diffusion v1's VAE
    >>> posterior = ae.encode(images)                                # DiagonalGaussian over [N, 4, H/8, W/8]
    >>> z = posterior.sample() ; images_rec = ae.decode(z)
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minildm.config import AutoencoderConfig

KINDS = ("kl", "vq")
LOGVAR_RANGE = (-30.0, 20.0)  # LDM clamps the posterior's log-variance to this range


def group_norm(channels: int, num_groups: int = 32) -> nn.GroupNorm:
    """LDM's autoencoder norm (its `Normalize`): nn.GroupNorm(num_groups, channels, eps=1e-6), in the input dtype."""
    if channels % num_groups:
        raise ValueError(f"GroupNorm with {num_groups} groups needs channels divisible by {num_groups}; got "
                         f"{channels}. Set autoencoder.norm_groups to a divisor of every level's width")
    return nn.GroupNorm(num_groups, channels, eps=1e-6, affine=True)


class ResnetBlock(nn.Module):
    """x + conv(swish(GN(conv(swish(GN(x)))))), a 1x1 `nin_shortcut` on x when the width changes; no time input."""

    def __init__(self, in_channels: int, out_channels: int, dropout: float = 0.0, num_groups: int = 32):
        super().__init__()
        self.norm1 = group_norm(in_channels, num_groups)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = group_norm(out_channels, num_groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return (self.nin_shortcut(x) if hasattr(self, "nin_shortcut") else x) + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W pixels: x + proj_out(softmax(q^T k / sqrt(C)) v), [N, C, H, W]."""

    def __init__(self, channels: int, num_groups: int = 32):
        super().__init__()
        self.norm = group_norm(channels, num_groups)
        self.q, self.k, self.v = (nn.Conv2d(channels, channels, 1) for _ in range(3))
        self.proj_out = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, height, width = x.shape
        h = self.norm(x)
        # [N, 1 head, H*W tokens, C]: the fused kernel computes LDM's bmm / softmax / bmm.
        q, k, v = (conv(h).reshape(n, 1, c, height * width).transpose(2, 3) for conv in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v).transpose(2, 3).reshape(n, c, height, width)
        return x + self.proj_out(h)


def make_attn(channels: int, attention: bool, num_groups: int) -> nn.Module:
    """An AttnBlock, or nn.Identity for LDM's attn_type "none" (e.g. the vq-f4-noattn model)."""
    return AttnBlock(channels, num_groups) if attention else nn.Identity()


class Downsample(nn.Module):
    """Halve the side: pad right and bottom by 1, then a 3x3 conv with stride 2 and no padding (TF 'SAME')."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    """Double the side: nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the encoder or decoder (LDM builds it as a bare nn.Module: block, attn, down/upsample)."""

    def __init__(self, blocks: list[nn.Module], attns: list[nn.Module]):
        super().__init__()
        self.block = nn.ModuleList(blocks)
        self.attn = nn.ModuleList(attns)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        for i, block in enumerate(self.block):
            h = block(h)
            if len(self.attn):
                h = self.attn[i](h)
        return h


class Middle(nn.Module):
    """ResnetBlock, AttnBlock, ResnetBlock at the lowest resolution (`mid.block_1`, `mid.attn_1`, `mid.block_2`)."""

    def __init__(self, channels: int, c: AutoencoderConfig):
        super().__init__()
        self.block_1 = ResnetBlock(channels, channels, c.dropout, c.norm_groups)
        self.attn_1 = make_attn(channels, c.attention, c.norm_groups)
        self.block_2 = ResnetBlock(channels, channels, c.dropout, c.norm_groups)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.block_2(self.attn_1(self.block_1(h)))


def _widths(c: AutoencoderConfig) -> list[int]:
    return [int(c.channels * m) for m in c.channel_mult]


class Encoder(nn.Module):
    """Image [N, in_channels, H, W] -> [N, 2z (KL) or z (VQ), H/f, W/f] (LDM `Encoder`)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths, side = _widths(c), c.image_size
        self.conv_in = nn.Conv2d(c.in_channels, c.channels, 3, padding=1)
        self.down = nn.ModuleList()
        width = c.channels
        for level, out in enumerate(widths):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks):
                blocks.append(ResnetBlock(width, out, c.dropout, c.norm_groups))
                width = out
                if side in c.attention_resolutions:
                    attns.append(make_attn(width, c.attention, c.norm_groups))
            down = Level(blocks, attns)
            if level != len(widths) - 1:
                down.downsample = Downsample(width)
                side //= 2
            self.down.append(down)
        self.mid = Middle(width, c)
        self.norm_out = group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, 2 * c.z_channels if c.kind == "kl" else c.z_channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)
        for down in self.down:
            h = down(h)
            if hasattr(down, "downsample"):
                h = down.downsample(h)
        h = self.mid(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    """Latent [N, z_channels, H/f, W/f] -> image [N, out_channels, H, W] (LDM `Decoder`; `up` indexed by level)."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        widths = _widths(c)
        side = c.image_size // 2 ** (len(widths) - 1)
        width = widths[-1]
        self.conv_in = nn.Conv2d(c.z_channels, width, 3, padding=1)
        self.mid = Middle(width, c)
        levels = []
        for level in reversed(range(len(widths))):
            blocks, attns = [], []
            for _ in range(c.num_res_blocks + 1):
                blocks.append(ResnetBlock(width, widths[level], c.dropout, c.norm_groups))
                width = widths[level]
                if side in c.attention_resolutions:
                    attns.append(make_attn(width, c.attention, c.norm_groups))
            up = Level(blocks, attns)
            if level != 0:
                up.upsample = Upsample(width)
                side *= 2
            levels.insert(0, up)  # built from the bottom, stored by level as in LDM
        self.up = nn.ModuleList(levels)
        self.norm_out = group_norm(width, c.norm_groups)
        self.conv_out = nn.Conv2d(width, c.out_channels, 3, padding=1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.mid(self.conv_in(z))
        for up in reversed(self.up):
            h = up(h)
            if hasattr(up, "upsample"):
                h = up.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class DiagonalGaussian:
    """The KL autoencoder's posterior q(z | x) = N(mean, diag(exp(logvar))) (LDM `DiagonalGaussianDistribution`).

    moments [N, 2 embed_dim, h, w] = mean | logvar; logvar is clamped to [-30, 20] as in LDM.
    kl() = KL(q || N(0, I)) = 0.5 * sum_{c,h,w} (mean^2 + var - 1 - logvar), [N].
    """

    def __init__(self, moments: torch.Tensor):
        self.mean, logvar = torch.chunk(moments, 2, dim=1)
        self.logvar = torch.clamp(logvar, *LOGVAR_RANGE)
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """z = mean + std * noise, noise ~ N(0, I) (drawn from `generator` if given), [N, embed_dim, h, w]."""
        device = generator.device if generator is not None else self.mean.device  # a CPU generator works anywhere
        noise = torch.randn(self.mean.shape, generator=generator, device=device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self) -> torch.Tensor:
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=[1, 2, 3])

    def nll(self, sample: torch.Tensor) -> torch.Tensor:
        """-log q(sample | x) = 0.5 * sum (log 2 pi + logvar + (sample - mean)^2 / var), [N]."""
        return 0.5 * torch.sum(math.log(2.0 * math.pi) + self.logvar + (sample - self.mean).pow(2) / self.var,
                               dim=[1, 2, 3])


class VectorQuantizer(nn.Module):
    """Nearest-codebook quantisation with a straight-through gradient (taming `VectorQuantizer2`, remap None).

    z [N, D, h, w] -> (z_q, loss, indices): indices [N*h*w] = argmin_k |z - e_k|^2 in (n, h, w) order,
    z_q = z + (e_idx - z).detach() (the forward value is the codebook row, the gradient passes to z), and
        legacy_beta (taming's default, every LDM model): loss = |sg(e) - z|^2 + beta |e - sg(z)|^2
        otherwise (VQ-VAE, van den Oord et al. 2017, Eq. 3):   loss = beta |sg(e) - z|^2 + |e - sg(z)|^2
    (means over all elements). The first term moves the encoder towards its code (the "commitment"), the
    second the code towards the encoder; the VQ-VAE paper weights the commitment by beta, taming's legacy
    placement weights the codebook term.
    """

    def __init__(self, n_embed: int, embed_dim: int, beta: float = 0.25, legacy_beta: bool = True):
        super().__init__()
        self.n_embed, self.embed_dim, self.beta, self.legacy_beta = n_embed, embed_dim, beta, legacy_beta
        self.embedding = nn.Embedding(n_embed, embed_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_embed, 1.0 / n_embed)

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = z.permute(0, 2, 3, 1).contiguous()  # [N, h, w, D]
        flat = z.view(-1, self.embed_dim)
        codebook = self.embedding.weight
        # |z|^2 + |e|^2 - 2 z.e, in taming's operation order (same argmin at float32 ties)
        distances = (flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)
                     - 2 * torch.einsum("bd,dn->bn", flat, codebook.t()))
        indices = torch.argmin(distances, dim=1)
        z_q = self.embedding(indices).view(z.shape)
        commitment, codebook_term = torch.mean((z_q.detach() - z) ** 2), torch.mean((z_q - z.detach()) ** 2)
        if self.legacy_beta:
            loss = commitment + self.beta * codebook_term
        else:
            loss = self.beta * commitment + codebook_term
        z_q = z + (z_q - z).detach()
        return z_q.permute(0, 3, 1, 2).contiguous(), loss, indices

    def lookup(self, indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Codebook rows of `indices` [N*h*w] as a latent [N, D, h, w]; shape = (N, h, w)."""
        return self.embedding(indices).view(*shape, self.embed_dim).permute(0, 3, 1, 2).contiguous()


class Autoencoder(nn.Module):
    """What the KL and VQ models share: the encoder, decoder, input checks and the decoder's last layer."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__()
        self.config = c
        self.factor = 2 ** (len(c.channel_mult) - 1)
        self.encoder = Encoder(c)
        self.decoder = Decoder(c)

    @property
    def last_layer(self) -> nn.Parameter:
        """The decoder's conv_out weight: LDM's adaptive GAN weight compares gradients here."""
        return self.decoder.conv_out.weight

    def latent_shape(self, image_size: int) -> tuple[int, int, int]:
        """[embed_dim, side / f, side / f] of the latent of a square image of side `image_size`."""
        return (self.config.embed_dim, image_size // self.factor, image_size // self.factor)

    def check_images(self, x) -> None:
        c = self.config
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != c.in_channels:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"images must be [N, {c.in_channels}, H, W] (autoencoder.in_channels={c.in_channels}) "
                             f"in [-1, 1]; got {shape}")
        if x.shape[-1] % self.factor or x.shape[-2] % self.factor:
            raise ValueError(f"image side {tuple(x.shape[-2:])} is not divisible by f={self.factor} (this "
                             f"autoencoder halves it {len(c.channel_mult) - 1} times); resize or crop to a multiple "
                             f"of {self.factor}")
        self._check_tensor(x, "images")

    def check_latents(self, z, channels: int) -> None:
        if not isinstance(z, torch.Tensor) or z.ndim != 4 or z.shape[1] != channels:
            shape = tuple(z.shape) if isinstance(z, torch.Tensor) else type(z).__name__
            raise ValueError(f"latents must be [N, {channels}, h, w] (autoencoder.embed_dim={channels}); got {shape}")
        self._check_tensor(z, "latents")

    def _check_tensor(self, x: torch.Tensor, name: str) -> None:
        weight = self.encoder.conv_in.weight
        if not x.is_floating_point():
            raise ValueError(f"{name} must be a float tensor, got {x.dtype} (uint8 images: x.float() / 127.5 - 1)")
        if x.device != weight.device:
            raise ValueError(f"{name} are on {x.device} but the autoencoder is on {weight.device}; move one of them")
        if x.dtype != weight.dtype and not torch.is_autocast_enabled(x.device.type):
            raise ValueError(f"{name} are {x.dtype} but the autoencoder's weights are {weight.dtype}; convert one "
                             "of them, or run under torch.autocast")


class AutoencoderKL(Autoencoder):
    """LDM `AutoencoderKL`: images [N, C, H, W] <-> latents z ~ q(z | x) = N(mean, diag(var)) [N, embed_dim, H/f, W/f]
    (f = 2^(levels - 1))."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__(c)
        self.quant_conv = nn.Conv2d(2 * c.z_channels, 2 * c.embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussian:
        """The posterior q(z | x) of images x in [-1, 1]."""
        self.check_images(x)
        return DiagonalGaussian(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Images [N, C, f h, f w] (about [-1, 1]; not clamped) from latents z [N, embed_dim, h, w]."""
        self.check_latents(z, self.config.embed_dim)
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True,
                generator: torch.Generator | None = None) -> tuple[torch.Tensor, DiagonalGaussian]:
        """(reconstruction, posterior): decode a sample of q(z | x) (its mean if sample_posterior=False)."""
        posterior = self.encode(x)
        z = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(z), posterior


class VQModel(Autoencoder):
    """LDM `VQModel`: images <-> the nearest of `n_embed` codebook vectors at each latent pixel."""

    def __init__(self, c: AutoencoderConfig):
        super().__init__(c)
        self.quantize = VectorQuantizer(c.n_embed, c.embed_dim, beta=c.beta, legacy_beta=c.legacy_beta)
        self.quant_conv = nn.Conv2d(c.z_channels, c.embed_dim, 1)  # registered after quantize, as in LDM
        self.post_quant_conv = nn.Conv2d(c.embed_dim, c.z_channels, 1)

    def encode_to_prequant(self, x: torch.Tensor) -> torch.Tensor:
        """The latent before quantisation, [N, embed_dim, H/f, W/f]: what LDM's diffusion models see."""
        self.check_images(x)
        return self.quant_conv(self.encoder(x))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(quant [N, D, h, w], codebook loss (scalar), indices [N*h*w]) of images x in [-1, 1]."""
        return self.quantize(self.encode_to_prequant(x))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        """Images [N, C, f h, f w] from quantised latents [N, embed_dim, h, w]."""
        self.check_latents(quant, self.config.embed_dim)
        return self.decoder(self.post_quant_conv(quant))

    def decode_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Quantise a latent (e.g. one a diffusion model produced), then decode it (LDM's VQModelInterface)."""
        self.check_latents(z, self.config.embed_dim)
        return self.decode(self.quantize(z)[0])

    def decode_indices(self, indices: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
        """Images from codebook indices [N*h*w] in (n, h, w) order; shape = (N, h, w)."""
        return self.decode(self.quantize.lookup(indices, shape))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reconstruction, codebook loss, indices)."""
        quant, loss, indices = self.encode(x)
        return self.decode(quant), loss, indices


def build(c: AutoencoderConfig) -> Autoencoder:
    """The autoencoder of `c.kind`: `AutoencoderKL` ("kl") or `VQModel` ("vq")."""
    if c.kind == "kl":
        return AutoencoderKL(c)
    if c.kind == "vq":
        return VQModel(c)
    raise ValueError(f"autoencoder.kind={c.kind!r} is not one of {KINDS}")


def config_from_original(params: dict) -> AutoencoderConfig:
    """An `AutoencoderConfig` from an LDM model-zoo config's `model.params` (ddconfig, embed_dim, n_embed)."""
    dd = params["ddconfig"]
    vq = "n_embed" in params
    if not vq and not dd.get("double_z", True):
        raise ValueError("an AutoencoderKL config needs ddconfig.double_z=True (mean and log-variance)")
    return AutoencoderConfig(
        kind="vq" if vq else "kl", image_size=dd["resolution"], in_channels=dd["in_channels"],
        out_channels=dd["out_ch"], channels=dd["ch"], channel_mult=tuple(dd["ch_mult"]),
        num_res_blocks=dd["num_res_blocks"], attention_resolutions=tuple(dd["attn_resolutions"]),
        attention=dd.get("attn_type", "vanilla") != "none", dropout=dd.get("dropout", 0.0),
        z_channels=dd["z_channels"], embed_dim=params["embed_dim"], n_embed=params.get("n_embed", 0))


def convert_official_state_dict(state_dict: dict) -> dict:
    """A model-zoo state_dict with the training-only `loss.*` keys (LPIPS, discriminator) dropped."""
    return {k: v for k, v in state_dict.items() if not k.startswith("loss.")}


# ---------------------------------------------------------------------------------------------
# Measured from data: the latent scale factor and the codebook's usage


@torch.no_grad()
def encode_latents(ae: Autoencoder, images: torch.Tensor, *, batch_size: int = 256, sample: bool = True,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The latents a diffusion model would be trained on, [N, embed_dim, h, w]: KL, a sample of q(z | x)
    (LDM's `get_first_stage_encoding`; the mean if sample=False); VQ, the latent before quantisation."""
    device = ae.last_layer.device
    latents = []
    for batch in images.split(batch_size):
        batch = batch.to(device)
        if isinstance(ae, AutoencoderKL):
            posterior = ae.encode(batch)
            latents.append(posterior.sample(generator) if sample else posterior.mode())
        else:
            latents.append(ae.encode_to_prequant(batch))
    return torch.cat(latents)


def latent_scale_factor(ae: Autoencoder, images: torch.Tensor, *, batch_size: int = 256,
                        generator: torch.Generator | None = None) -> float:
    """1 / std of the latents of `images` over all their elements (LDM's `scale_by_std`, which uses one batch).

    Latent diffusion trains on z * scale_factor, so the diffusion model sees unit-variance data, as its noise
    schedule assumes; decoding divides by it. Stable Diffusion fixes 0.18215 (KL-f8 on its data).
    """
    latents = encode_latents(ae, images, batch_size=batch_size, generator=generator)
    return 1.0 / latents.flatten().std().item()


def stored_scale_factor(ae: Autoencoder, training_images: torch.Tensor) -> float:
    """The scale factor a training run stores with its last checkpoint: `latent_scale_factor` of the first 2,000
    training images (KL samples drawn with a generator seeded 0), so a re-measurement gives the same number."""
    device = ae.last_layer.device
    return latent_scale_factor(ae, training_images[:2000].to(device),
                               generator=torch.Generator(device).manual_seed(0))


@torch.no_grad()
def codebook_usage(ae: VQModel, images: torch.Tensor, *, batch_size: int = 256) -> dict:
    """How often each code is chosen over `images` (e.g. one epoch of the training data).

    Returns counts [n_embed] (int64), used (codes chosen at least once), dead (never chosen: they get no
    gradient and stay where they are), perplexity exp(H(p)) of the code frequencies p (= n_embed when all
    codes are equally used, 1 when one code does everything).
    """
    if not isinstance(ae, VQModel):
        raise TypeError(f"codebook_usage needs a VQModel (autoencoder.kind='vq'); got {type(ae).__name__}")
    device = ae.last_layer.device
    counts = torch.zeros(ae.config.n_embed, dtype=torch.int64)
    for batch in images.split(batch_size):
        indices = ae.encode(batch.to(device))[2]
        counts += torch.bincount(indices.cpu(), minlength=ae.config.n_embed)
    p = counts.double() / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum().item()
    used = int((counts > 0).sum())
    return {"counts": counts, "used": used, "dead": ae.config.n_embed - used, "perplexity": math.exp(entropy)}
