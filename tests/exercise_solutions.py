"""Reference solutions of the chapters' exercises.

They live here, not in the notebooks (where the learner's cells are stubs), so that CI can prove in
tests/test_exercises.py that every check of `minildm.exercises` accepts them. Written from the chapters'
derivations, not with the package functions the checks compare against.
"""

import math

import numpy as np
import torch

from minildm import schedules, unet

# ---------------------------------------------------------------------------------------------
# Chapter 01: the forward process


def q_jump(x_s, s, t, noise, alpha_bar):
    # The jump s -> t multiplies alpha_{s+1} ... alpha_t (code indices): alpha_bar_t / alpha_bar_s.
    ratio = alpha_bar[t] / alpha_bar[s]
    return math.sqrt(ratio) * x_s + math.sqrt(1 - ratio) * noise


def shifted_alpha_bar(alpha_bar, factor):
    snr = alpha_bar / (1 - alpha_bar) / factor**2
    return snr / (1 + snr)


def q_posterior_jump(x0, x_t, t, s, alpha_bar):
    a, a_s = alpha_bar[t], alpha_bar[s]
    beta = 1 - a / a_s  # the variance of the jump s -> t
    mean = math.sqrt(a_s) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a) * x_t
    return mean, beta * (1 - a_s) / (1 - a)


# ---------------------------------------------------------------------------------------------
# Chapter 02: the reverse process


def ancestral_step(model, process, x_t, t, t_prev, z):
    a = process.alpha_bar[t]
    a_prev = process.alpha_bar[t_prev] if t_prev >= 0 else 1.0
    beta = 1 - a / a_prev  # the jump t_prev -> t as one step
    eps = model(x_t, torch.full((len(x_t),), t))
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta / (1 - a) * pred_x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
    if t_prev == -1:
        return mean
    return mean + math.sqrt(beta * (1 - a_prev) / (1 - a)) * z


def bound_weight(process, t, variance="fixed_large"):
    # lambda_t of chapter 02's Eq. 12 for code timesteps t >= 1: beta^2 / (2 sigma^2 alpha (1 - alpha_bar))
    beta, a, a_prev = process.betas[t], process.alpha_bar[t], process.alpha_bar[t - 1]
    sigma2 = beta if variance == "fixed_large" else beta * (1 - a_prev) / (1 - a)
    return beta**2 / (2 * sigma2 * (1 - beta) * (1 - a))


def vlb_loss(model, process, x0, t, noise):
    beta, a, a_prev = process.betas[t], process.alpha_bar[t], process.alpha_bar[t - 1]
    posterior_variance = beta * (1 - a_prev) / (1 - a)
    sigma2 = beta if process.model_var_type == "fixed_large" else posterior_variance
    t_batch = torch.full((len(x0),), t)
    mse = ((noise - model(process.q_sample(x0, t_batch, noise), t_batch)) ** 2).mean(dim=1)
    C = 0.5 * (math.log(sigma2 / posterior_variance) + posterior_variance / sigma2 - 1)
    return process.num_timesteps * (bound_weight(process, t, process.model_var_type) * mse + C) / math.log(2)


def ddim_step(model, process, x_t, t, t_prev, eta, z):
    a = process.alpha_bar[t]
    a_prev = process.alpha_bar[t_prev] if t_prev >= 0 else 1.0
    eps = model(x_t, torch.full((len(x_t),), t))
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev - sigma**2) * eps + sigma * z


# ---------------------------------------------------------------------------------------------
# Chapter 03: from DDPM's UNet to ADM


def adagn_extra_parameters(model):
    # Every ResBlock's Linear(4C, C_out) becomes Linear(4C, 2 C_out): C_out more rows of weights and biases.
    blocks = [m for m in model.modules() if isinstance(m, unet.ResBlock)]
    return sum(block.emb_layers[1].in_features * block.out_channels + block.out_channels for block in blocks)


def heads_per_side(config):
    u = config.unet
    widths = {u.image_size // 2**level: int(mult * u.channels) for level, mult in enumerate(u.channel_mult)}
    deepest = min(widths)  # the middle block attends there, whatever attention_resolutions says
    return {side: (width // u.num_head_channels if u.num_head_channels > 0 else u.num_heads)
            for side, width in widths.items() if side in u.attention_resolutions or side == deepest}


def respaced_betas(alpha_bar, kept):
    kept_bar = alpha_bar[kept]
    return 1 - kept_bar / np.concatenate([[1.0], kept_bar[:-1]])


LARGEST_RESPACED_BETA = round(float(respaced_betas(
    schedules.alpha_bar(schedules.beta_schedule("cosine", 1000)), schedules.space_timesteps(1000, "ddim25")).max()), 3)


# ---------------------------------------------------------------------------------------------
# Chapter 04: guidance


def guided_mean(mean, variance, gradient):
    # ADM Algorithm 1: x_{t-1} ~ N(mu + Sigma g, Sigma), g = s grad log p(y | x_t).
    return mean + variance * gradient


def guided_eps(eps, gradient, alpha_bar_t):
    # ADM Algorithm 2: eps = -sqrt(1 - a) * score, so adding g to the score subtracts sqrt(1 - a) g from eps.
    return eps - math.sqrt(1 - alpha_bar_t) * gradient


def classifier_free_output(out_cond, out_uncond, guidance_scale, channels):
    eps = out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([eps, out_cond[:, channels:]], dim=1)  # learned-variance channels: the conditional pass's


def log_prob_gradient(classifier, x_t, t, y, scale):
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        log_probs = torch.log_softmax(classifier(x, t), dim=-1)
        selected = log_probs[torch.arange(len(y)), y]
        return scale * torch.autograd.grad(selected.sum(), x)[0]


# ---------------------------------------------------------------------------------------------
# Chapter 05: the autoencoder


def ldm_downsample(x, weight, bias):
    # pad right and bottom by one (TensorFlow's 'SAME' for stride 2), then a 3x3 convolution with stride 2
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (0, 1, 0, 1)), weight, bias, stride=2)


def gaussian_kl(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


def nearest_code(z, codebook):
    flat = z.permute(0, 2, 3, 1).reshape(-1, z.shape[1])  # [N*h*w, D], (n, h, w) order
    distances = (flat**2).sum(1, keepdim=True) - 2 * flat @ codebook.T + (codebook**2).sum(1)
    return distances.argmin(dim=1)


def scale_factor(latents):
    return 1.0 / latents.flatten().std().item()


# ---------------------------------------------------------------------------------------------
# Chapter 06: latent diffusion


def cross_attention(x, context, w_q, w_k, w_v, heads):
    # LDM Eq. 3 per head: softmax(Q K^T / sqrt(d)) V, Q from x, K and V from the context
    n, T, inner = x.shape[0], x.shape[1], w_q.shape[0]
    dim_head = inner // heads
    q = (x @ w_q.T).reshape(n, T, heads, dim_head).transpose(1, 2)  # [N, heads, T, dim_head]
    k = (context @ w_k.T).reshape(n, -1, heads, dim_head).transpose(1, 2)  # [N, heads, L, dim_head]
    v = (context @ w_v.T).reshape(n, -1, heads, dim_head).transpose(1, 2)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(dim_head), dim=-1)  # over the L context tokens
    return (weights @ v).transpose(1, 2).reshape(n, T, inner)


def layout_tokens(box, label, grid, num_classes):
    # <pad> 0, lattice point (ix, iy) at 1 + iy * grid + ix (points i / (grid - 1)), class c at 1 + grid^2 + c
    def corner(x, y):
        return 1 + round(float(y) * (grid - 1)) * grid + round(float(x) * (grid - 1))
    x0, y0, x1, y1 = box
    return 1 + grid * grid + label, corner(x0, y0), corner(x1, y1)


def plms_combination(eps_now, eps_history):
    # Adams-Bashforth of order 2, 3, 4 for equal steps; e[k] is the eps k steps back
    e = [eps_now, *eps_history[::-1]]
    if len(eps_history) == 1:
        return (3 * e[0] - e[1]) / 2
    if len(eps_history) == 2:
        return (23 * e[0] - 16 * e[1] + 5 * e[2]) / 12
    return (55 * e[0] - 59 * e[1] + 37 * e[2] - 9 * e[3]) / 24


def frechet_distance(mu_a, sigma_a, mu_b, sigma_b):
    # |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2)); Tr of the square root = sum of sqrt(eigenvalues of S_a S_b)
    trace_sqrt = np.sqrt(np.linalg.eigvals(sigma_a @ sigma_b).real.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * trace_sqrt)


def rank_indices(num, batch_size, rank, world_size):
    # round k: indices [k W B, (k + 1) W B); process r takes the r-th batch of B of them, cut at num
    per_round = world_size * batch_size
    indices = []
    for start in range(rank * batch_size, num, per_round):
        indices += range(start, min(start + batch_size, num))
    return indices


def to_bfloat16(x):
    # round to nearest, ties to even: add 0x7FFF plus the lowest bit kept, then clear the 16 dropped bits
    bits = x.view(torch.int32)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & ~0xFFFF
    return rounded.view(torch.float32)
