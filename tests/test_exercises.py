"""The exercise checks (`minildm.exercises`): each accepts the reference solution (tests/exercise_solutions.py),
rejects typical mistakes, and answers the notebook stub with "not attempted yet" instead of an exception."""

import math

import exercise_solutions as solutions
import numpy as np
import pytest
import torch

import minildm
from minildm import exercises, presets, schedules, unet


def stub(*args, **kwargs):
    raise NotImplementedError  # your code here


# ---------------------------------------------------------------------------------------------
# Typical mistakes, chapter 01


def q_jump_ignoring_s(x_s, s, t, noise, alpha_bar):
    return math.sqrt(alpha_bar[t]) * x_s + math.sqrt(1 - alpha_bar[t]) * noise


def q_jump_without_sqrt(x_s, s, t, noise, alpha_bar):
    ratio = alpha_bar[t] / alpha_bar[s]
    return ratio * x_s + (1 - ratio) * noise


def q_jump_off_by_one(x_s, s, t, noise, alpha_bar):  # also multiplies alpha_s, which x_s already contains
    ratio = alpha_bar[t] / alpha_bar[s - 1] if s > 0 else alpha_bar[t]
    return math.sqrt(ratio) * x_s + math.sqrt(1 - ratio) * noise


def shifted_by_factor(alpha_bar, factor):  # SNR / factor instead of / factor**2
    snr = alpha_bar / (1 - alpha_bar) / factor
    return snr / (1 + snr)


def shifted_alpha_bar_itself(alpha_bar, factor):
    return alpha_bar / factor**2


def shifted_snr_not_alpha_bar(alpha_bar, factor):
    return alpha_bar / (1 - alpha_bar) / factor**2


def posterior_jump_one_step_beta(x0, x_t, t, s, alpha_bar):  # Eq. 6-7 with the beta of the step t-1 -> t
    a, a_s = alpha_bar[t], alpha_bar[s]
    beta = 1 - a / alpha_bar[t - 1]
    mean = math.sqrt(a_s) * beta / (1 - a) * x0 + math.sqrt(1 - beta) * (1 - a_s) / (1 - a) * x_t
    return mean, beta * (1 - a_s) / (1 - a)


def posterior_jump_without_sqrt(x0, x_t, t, s, alpha_bar):
    a, a_s = alpha_bar[t], alpha_bar[s]
    beta = 1 - a / a_s
    mean = math.sqrt(a_s) * beta / (1 - a) * x0 + (1 - beta) * (1 - a_s) / (1 - a) * x_t
    return mean, beta * (1 - a_s) / (1 - a)


# ---------------------------------------------------------------------------------------------
# Typical mistakes, chapter 02


def ancestral_one_step_beta(model, process, x_t, t, t_prev, z):  # uses beta_t even across a jump
    a = process.alpha_bar[t]
    a_prev = process.alpha_bar[t_prev] if t_prev >= 0 else 1.0
    beta = process.betas[t]
    eps = model(x_t, torch.full((len(x_t),), t))
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    mean = math.sqrt(a_prev) * beta / (1 - a) * pred_x0 + math.sqrt(1 - beta) * (1 - a_prev) / (1 - a) * x_t
    return mean + (t_prev >= 0) * math.sqrt(beta * (1 - a_prev) / (1 - a)) * z


def ancestral_noise_on_last_step(model, process, x_t, t, t_prev, z):
    x_prev = solutions.ancestral_step(model, process, x_t, t, t_prev, z)
    return x_prev + (t_prev == -1) * math.sqrt(process.betas[t]) * z


def ancestral_variance_beta(model, process, x_t, t, t_prev, z):  # sigma^2 = beta of the jump, not beta~
    mean = solutions.ancestral_step(model, process, x_t, t, t_prev, torch.zeros_like(z))
    a_prev = process.alpha_bar[t_prev] if t_prev >= 0 else 1.0
    return mean + (t_prev >= 0) * math.sqrt(1 - process.alpha_bar[t] / a_prev) * z


def vlb_without_constant(model, process, x0, t, noise):
    t_batch = torch.full((len(x0),), t)
    mse = ((noise - model(process.q_sample(x0, t_batch, noise), t_batch)) ** 2).mean(dim=1)
    return process.num_timesteps * solutions.bound_weight(process, t, process.model_var_type) * mse / math.log(2)


def vlb_without_T(model, process, x0, t, noise):
    return solutions.vlb_loss(model, process, x0, t, noise) / process.num_timesteps


def vlb_in_nats(model, process, x0, t, noise):
    return solutions.vlb_loss(model, process, x0, t, noise) * math.log(2)


def ddim_without_sigma_in_sqrt(model, process, x_t, t, t_prev, eta, z):
    a = process.alpha_bar[t]
    a_prev = process.alpha_bar[t_prev] if t_prev >= 0 else 1.0
    eps = model(x_t, torch.full((len(x_t),), t))
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = eta * math.sqrt((1 - a_prev) / (1 - a)) * math.sqrt(1 - a / a_prev)
    return math.sqrt(a_prev) * pred_x0 + math.sqrt(1 - a_prev) * eps + sigma * z


def ddim_ignoring_eta(model, process, x_t, t, t_prev, eta, z):
    return solutions.ddim_step(model, process, x_t, t, t_prev, 1.0, z)


def ddim_wrapping_index(model, process, x_t, t, t_prev, eta, z):  # alpha_bar[-1] is the *last* step, not 1
    a, a_prev = process.alpha_bar[t], process.alpha_bar[t_prev]
    eps = model(x_t, torch.full((len(x_t),), t))
    pred_x0 = (x_t - math.sqrt(1 - a) * eps) / math.sqrt(a)
    sigma = eta * math.sqrt(abs((1 - a_prev) / (1 - a) * (1 - a / a_prev)))
    return math.sqrt(a_prev) * pred_x0 + math.sqrt(abs(1 - a_prev - sigma**2)) * eps + sigma * z


# ---------------------------------------------------------------------------------------------
# Typical mistakes, chapter 03


def adagn_weights_only(model):
    blocks = [m for m in model.modules() if isinstance(m, unet.ResBlock)]
    return sum(block.emb_layers[1].in_features * block.out_channels for block in blocks)


def adagn_input_channels(model):
    blocks = [m for m in model.modules() if isinstance(m, unet.ResBlock)]
    return sum(block.emb_layers[1].in_features * block.channels + block.channels for block in blocks)


def adagn_every_linear(model):  # doubles the time embedding's layers too
    return sum(m.weight.numel() + m.bias.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))


def adagn_hard_coded(model):  # the number chapter 03 prints for its base network
    return 78_432


def heads_ignoring_head_channels(config):
    u = config.unet
    return {side: u.num_heads for side in u.attention_resolutions}


def heads_from_base_width(config):
    u = config.unet
    return {side: (u.channels // u.num_head_channels if u.num_head_channels > 0 else u.num_heads)
            for side in u.attention_resolutions}


def heads_at_every_side(config):
    u = config.unet
    return {u.image_size // 2**level: (int(mult * u.channels) // u.num_head_channels if u.num_head_channels > 0
                                       else u.num_heads) for level, mult in enumerate(u.channel_mult)}


def respaced_original_betas(alpha_bar, kept):
    return 1 - alpha_bar[kept] / np.concatenate([[1.0], alpha_bar[:-1]])[kept]


def respaced_dropping_first(alpha_bar, kept):
    return 1 - alpha_bar[kept][1:] / alpha_bar[kept][:-1]


def respaced_from_alpha_bar_0(alpha_bar, kept):  # starts from alpha_bar[0] instead of 1
    kept_bar = alpha_bar[kept]
    return 1 - kept_bar / np.concatenate([[alpha_bar[0]], kept_bar[:-1]])


LARGEST_OF_THE_WRONG_SPACING = float(schedules.respace_betas(schedules.beta_schedule("cosine", 1000),
                                                             schedules.space_timesteps(1000, "25")).max())

CASES = {  # check: (reference solution, typical mistakes)
    "q_jump": (exercises.check_q_jump, solutions.q_jump,
               [q_jump_ignoring_s, q_jump_without_sqrt, q_jump_off_by_one]),
    "shifted_alpha_bar": (exercises.check_shifted_alpha_bar, solutions.shifted_alpha_bar,
                          [shifted_by_factor, shifted_alpha_bar_itself, shifted_snr_not_alpha_bar]),
    "q_posterior_jump": (exercises.check_q_posterior_jump, solutions.q_posterior_jump,
                         [posterior_jump_one_step_beta, posterior_jump_without_sqrt]),
    "ancestral_step": (exercises.check_ancestral_step, solutions.ancestral_step,
                       [ancestral_one_step_beta, ancestral_noise_on_last_step, ancestral_variance_beta]),
    "vlb_loss": (exercises.check_vlb_loss, solutions.vlb_loss, [vlb_without_constant, vlb_without_T, vlb_in_nats]),
    "ddim_step": (exercises.check_ddim_step, solutions.ddim_step,
                  [ddim_without_sigma_in_sqrt, ddim_ignoring_eta, ddim_wrapping_index]),
    "adagn_extra_parameters": (exercises.check_adagn_extra_parameters, solutions.adagn_extra_parameters,
                               [adagn_weights_only, adagn_input_channels, adagn_every_linear, adagn_hard_coded]),
    "heads_per_side": (exercises.check_heads_per_side, solutions.heads_per_side,
                       [heads_ignoring_head_channels, heads_from_base_width, heads_at_every_side]),
    "respaced_betas": (exercises.check_respaced_betas, solutions.respaced_betas,
                       [respaced_original_betas, respaced_dropping_first, respaced_from_alpha_bar_0]),
    "largest_respaced_beta": (exercises.check_largest_respaced_beta, solutions.LARGEST_RESPACED_BETA,
                              [LARGEST_OF_THE_WRONG_SPACING, 0.999, round(solutions.LARGEST_RESPACED_BETA, 1)]),
}


def verdict(capsys) -> str:
    out = capsys.readouterr().out.strip()
    assert "\n" not in out, f"a check prints one line, got {out!r}"
    return out


def assert_hints(cases: dict, expected: dict, capsys) -> None:
    """Each mistake of `expected` run through the check of the case that lists it: its verdict names the phrase."""
    for mistake, phrase in expected.items():
        check = next(check for check, _, mistakes in cases.values() if mistake in mistakes)
        check(mistake)
        out = verdict(capsys)
        assert phrase in out, (mistake.__name__, out)


def test_a_crash_in_the_answer_is_reported_not_raised(capsys):
    def q_jump(x_s, s, t, noise, alpha_bar):
        return alpha_bar[t + 1000] * x_s  # past the end of the schedule
    assert exercises.check_q_jump(q_jump) is False
    out = verdict(capsys)
    assert "not yet: your code raised IndexError" in out and "alpha_bar[t + 1000]" in out


def test_checks_do_not_print_the_expected_answer(capsys):
    exercises.check_heads_per_side(heads_ignoring_head_channels)
    exercises.check_adagn_extra_parameters(adagn_hard_coded)
    exercises.check_largest_respaced_beta(0.5)
    out = capsys.readouterr().out
    expected_heads = exercises._expected_heads("adm-imagenet256")
    assert str(expected_heads) not in out and "{" not in out
    assert f"{solutions.LARGEST_RESPACED_BETA:.3f}"[:4] not in out


def test_chapter_02_checks_take_the_notebook_model_and_process(capsys):
    # chapter 02 may pass its trained float32 MLP and its toy process instead of the checks' random model
    config = presets.get("toy-2d")
    torch.manual_seed(0)
    model, process = minildm.build_model(config).eval(), minildm.build_diffusion(config)
    for check, solution in [(exercises.check_ancestral_step, solutions.ancestral_step),
                            (exercises.check_vlb_loss, solutions.vlb_loss),
                            (exercises.check_ddim_step, solutions.ddim_step)]:
        assert check(solution, model=model, process=process) is True
        assert check(stub, model=model, process=process) is False
    assert check(ddim_ignoring_eta, model=model, process=process) is False


# ---------------------------------------------------------------------------------------------
# Chapter 04: guidance


def guided_mean_without_variance(mean, variance, gradient):
    return mean + gradient


def guided_mean_with_std(mean, variance, gradient):
    return mean + variance.sqrt() * gradient


def guided_mean_downhill(mean, variance, gradient):
    return mean - variance * gradient


def guided_eps_sqrt_alpha_bar(eps, gradient, alpha_bar_t):
    return eps - math.sqrt(alpha_bar_t) * gradient


def guided_eps_variance(eps, gradient, alpha_bar_t):
    return eps - (1 - alpha_bar_t) * gradient


def guided_eps_plus(eps, gradient, alpha_bar_t):
    return eps + math.sqrt(1 - alpha_bar_t) * gradient


def cfg_guiding_variance_channels(out_cond, out_uncond, guidance_scale, channels):
    return out_uncond + guidance_scale * (out_cond - out_uncond)


def cfg_uncond_variance(out_cond, out_uncond, guidance_scale, channels):
    eps = out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([eps, out_uncond[:, channels:]], dim=1)


def cfg_from_conditional(out_cond, out_uncond, guidance_scale, channels):  # w = 0 would be "no guidance"
    eps = out_cond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])
    return torch.cat([eps, out_cond[:, channels:]], dim=1)


def cfg_eps_only(out_cond, out_uncond, guidance_scale, channels):  # drops the variance channels
    return out_uncond[:, :channels] + guidance_scale * (out_cond[:, :channels] - out_uncond[:, :channels])


def _gradient_of(select, classifier, x_t, t):
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        return torch.autograd.grad(select(classifier(x, t)).sum(), x)[0]


def gradient_of_logit(classifier, x_t, t, y, scale):
    return scale * _gradient_of(lambda z: z[torch.arange(len(y)), y], classifier, x_t, t)


def gradient_of_probability(classifier, x_t, t, y, scale):
    return scale * _gradient_of(lambda z: z.softmax(-1)[torch.arange(len(y)), y], classifier, x_t, t)


def gradient_without_scale(classifier, x_t, t, y, scale):
    return _gradient_of(lambda z: z.log_softmax(-1)[torch.arange(len(y)), y], classifier, x_t, t)


def gradient_without_enable_grad(classifier, x_t, t, y, scale):  # fails under the samplers' no_grad
    x = x_t.detach().requires_grad_(True)
    selected = torch.log_softmax(classifier(x, t), dim=-1)[torch.arange(len(y)), y]
    return scale * torch.autograd.grad(selected.sum(), x)[0]


CASES_04 = {
    "guided_mean": (exercises.check_guided_mean, solutions.guided_mean,
                    [guided_mean_without_variance, guided_mean_with_std, guided_mean_downhill]),
    "guided_eps": (exercises.check_guided_eps, solutions.guided_eps,
                   [guided_eps_sqrt_alpha_bar, guided_eps_variance, guided_eps_plus]),
    "classifier_free_output": (exercises.check_classifier_free_output, solutions.classifier_free_output,
                               [cfg_guiding_variance_channels, cfg_uncond_variance, cfg_from_conditional,
                                cfg_eps_only]),
    "log_prob_gradient": (exercises.check_log_prob_gradient, solutions.log_prob_gradient,
                          [gradient_of_logit, gradient_of_probability, gradient_without_scale,
                           gradient_without_enable_grad]),
}


def test_chapter_04_hints_name_the_mistake(capsys):
    exercises.check_guided_mean(guided_mean_without_variance)
    exercises.check_guided_eps(guided_eps_sqrt_alpha_bar)
    exercises.check_classifier_free_output(cfg_guiding_variance_channels)
    exercises.check_log_prob_gradient(gradient_of_logit)
    out = capsys.readouterr().out.splitlines()
    assert "forgot the variance" in out[0]
    assert "not sqrt(alpha_bar_t)" in out[1]
    assert "variance channels are not guided" in out[2]
    assert "log-probability" in out[3]


# ---------------------------------------------------------------------------------------------
# Chapter 05: the autoencoder


def downsample_symmetric(x, weight, bias):  # ADM's padding
    return torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1)


def downsample_left_top(x, weight, bias):
    return torch.nn.functional.conv2d(torch.nn.functional.pad(x, (1, 0, 1, 0)), weight, bias, stride=2)


def kl_without_half(mean, logvar):
    return (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3))


def kl_averaged(mean, logvar):
    return 0.5 * (mean**2 + logvar.exp() - 1 - logvar).mean(dim=(1, 2, 3))


def kl_with_std(mean, logvar):
    return 0.5 * (mean**2 + (0.5 * logvar).exp() - 1 - logvar).sum(dim=(1, 2, 3))


def nearest_by_dot_product(z, codebook):
    return (z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]) @ codebook.T).argmax(dim=1)


def nearest_channels_mixed(z, codebook):
    return torch.cdist(z.reshape(-1, z.shape[1]), codebook).argmin(dim=1)


def nearest_per_image(z, codebook):  # [N, h*w]: right values, wrong shape
    return torch.cdist(z.permute(0, 2, 3, 1).reshape(len(z), -1, z.shape[1]), codebook[None]).argmin(dim=2)


def scale_by_std(latents):
    return latents.flatten().std().item()


def scale_by_variance(latents):
    return 1.0 / latents.flatten().var().item()


def scale_per_channel(latents):
    return 1.0 / latents.std(dim=(0, 2, 3))


CASES_05 = {
    "ldm_downsample": (exercises.check_ldm_downsample, solutions.ldm_downsample,
                       [downsample_symmetric, downsample_left_top]),
    "gaussian_kl": (exercises.check_gaussian_kl, solutions.gaussian_kl, [kl_without_half, kl_averaged, kl_with_std]),
    "nearest_code": (exercises.check_nearest_code, solutions.nearest_code,
                     [nearest_by_dot_product, nearest_channels_mixed, nearest_per_image]),
    "scale_factor": (exercises.check_scale_factor, solutions.scale_factor,
                     [scale_by_std, scale_by_variance, scale_per_channel]),
}


# ---------------------------------------------------------------------------------------------
# Chapter 06: latent diffusion


def _attention_with(x, context, w_q, w_k, w_v, heads, *, softmax_dim=-1, scale=None, split="heads first",
                    merge="transpose"):
    """Multi-head attention with one thing changed, for the typical mistakes below."""
    n, T, inner = x.shape[0], x.shape[1], w_q.shape[0]
    dim_head = inner // heads

    def split_heads(t):
        if split == "heads first":
            return t.reshape(n, t.shape[1], heads, dim_head).transpose(1, 2)
        if split == "heads last":  # channel c in head c % heads
            return t.reshape(n, t.shape[1], dim_head, heads).permute(0, 3, 1, 2)
        return t.reshape(n, heads, t.shape[1], dim_head)  # "tokens": splits the token axis into heads
    q, k, v = split_heads(x @ w_q.T), split_heads(context @ w_k.T), split_heads(context @ w_v.T)
    weights = torch.softmax(q @ k.transpose(-1, -2) * (scale or dim_head**-0.5), dim=softmax_dim)
    out = weights @ v
    return out.reshape(n, T, inner) if merge == "reshape" else out.transpose(1, 2).reshape(n, T, inner)


def attention_softmax_over_queries(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, heads, softmax_dim=-2)


def attention_scaled_by_inner(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, heads, scale=w_q.shape[0] ** -0.5)


def attention_heads_interleaved(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, heads, split="heads last")


def attention_heads_split_over_tokens(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, heads, split="tokens")


def attention_merged_without_transpose(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, heads, merge="reshape")


def attention_single_head(x, context, w_q, w_k, w_v, heads):
    return _attention_with(x, context, w_q, w_k, w_v, 1, scale=(w_q.shape[0] // heads) ** -0.5)


def layout_x_y_swapped(box, label, grid, num_classes):
    x0, y0, x1, y1 = box
    return solutions.layout_tokens((y0, x0, y1, x1), label, grid, num_classes)


def layout_class_without_offset(box, label, grid, num_classes):
    return (1 + label, *solutions.layout_tokens(box, label, grid, num_classes)[1:])


def layout_floored(box, label, grid, num_classes):
    def corner(x, y):
        return 1 + math.floor(float(y) * (grid - 1)) * grid + math.floor(float(x) * (grid - 1))
    return 1 + grid * grid + label, corner(box[0], box[1]), corner(box[2], box[3])


def layout_lattice_of_side_grid(box, label, grid, num_classes):  # points i / grid: x = 1 leaves the lattice
    def corner(x, y):
        return 1 + round(float(y) * grid) * grid + round(float(x) * grid)
    return 1 + grid * grid + label, corner(box[0], box[1]), corner(box[2], box[3])


def layout_without_pad(box, label, grid, num_classes):
    return tuple(token - 1 for token in solutions.layout_tokens(box, label, grid, num_classes))


def plms_history_newest_first(eps_now, eps_history):
    return solutions.plms_combination(eps_now, eps_history[::-1])


def plms_fourth_order_sign_error(eps_now, eps_history):
    if len(eps_history) < 3:
        return solutions.plms_combination(eps_now, eps_history)
    e3, e2, e1 = eps_history
    return (55 * eps_now - 59 * e1 + 37 * e2 + 9 * e3) / 24


def plms_always_second_order(eps_now, eps_history):
    return (3 * eps_now - eps_history[-1]) / 2


def plms_euler(eps_now, eps_history):
    return eps_now


CASES_06 = {
    "cross_attention": (exercises.check_cross_attention, solutions.cross_attention,
                        [attention_softmax_over_queries, attention_scaled_by_inner, attention_heads_interleaved,
                         attention_heads_split_over_tokens, attention_merged_without_transpose,
                         attention_single_head]),
    "layout_tokens": (exercises.check_layout_tokens, solutions.layout_tokens,
                      [layout_x_y_swapped, layout_class_without_offset, layout_floored, layout_lattice_of_side_grid,
                       layout_without_pad]),
    "plms_combination": (exercises.check_plms_combination, solutions.plms_combination,
                         [plms_history_newest_first, plms_fourth_order_sign_error, plms_always_second_order,
                          plms_euler]),
}


def test_chapter_06_hints_name_the_mistake(capsys):
    expected = {
        attention_softmax_over_queries: "over the context tokens",
        attention_scaled_by_inner: "the width of *one* head",
        attention_heads_interleaved: "contiguous block of channels",
        attention_merged_without_transpose: "tokens axis back in front of the heads",
        attention_single_head: "attend in each head separately",
        attention_heads_split_over_tokens: "not the tokens",
        layout_x_y_swapped: "a row is one value of y",
        layout_class_without_offset: "after <pad> and all grid * grid lattice tokens",
        layout_floored: "round, do not floor",
        layout_lattice_of_side_grid: "i / (grid - 1)",
        layout_without_pad: "after <pad>",
        plms_history_newest_first: "oldest first",
        plms_fourth_order_sign_error: "signs of the fourth-order weights",
        plms_always_second_order: "use all of them",
    }
    assert_hints(CASES_06, expected, capsys)


def test_chapter_06_layout_check_takes_tensors_and_reports_a_wrong_return(capsys):
    def as_tensor(box, label, grid, num_classes):  # a tensor of three tokens is accepted
        return torch.tensor(solutions.layout_tokens(box, label, grid, num_classes))

    def two_tokens(box, label, grid, num_classes):
        return solutions.layout_tokens(box, label, grid, num_classes)[1:]
    assert exercises.check_layout_tokens(as_tensor) is True
    assert ": correct" in verdict(capsys)
    assert exercises.check_layout_tokens(two_tokens) is False
    assert "should return three tokens" in verdict(capsys)

# ---------------------------------------------------------------------------------------------
# Typical mistakes, chapter 07


def frechet_elementwise_sqrt(mu_a, sigma_a, mu_b, sigma_b):  # sqrt of each entry of S_a * S_b
    cross = np.sqrt((sigma_a * sigma_b).clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)


def frechet_diagonal(mu_a, sigma_a, mu_b, sigma_b):  # treats the covariances as diagonal
    cross = np.sqrt(np.diag(sigma_a) * np.diag(sigma_b)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)


def frechet_without_two(mu_a, sigma_a, mu_b, sigma_b):
    cross = np.sqrt(np.linalg.eigvals(sigma_a @ sigma_b).real.clip(min=0)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(sigma_a) + np.trace(sigma_b) - cross)


def frechet_mean_not_squared(mu_a, sigma_a, mu_b, sigma_b):
    cross = np.sqrt(np.linalg.eigvals(sigma_a @ sigma_b).real.clip(min=0)).sum()
    return float(np.linalg.norm(mu_a - mu_b) + np.trace(sigma_a) + np.trace(sigma_b) - 2 * cross)


def frechet_complex(mu_a, sigma_a, mu_b, sigma_b):  # keeps sqrtm's complex dtype
    return complex(solutions.frechet_distance(mu_a, sigma_a, mu_b, sigma_b))


def rank_indices_strided(num, batch_size, rank, world_size):
    return list(range(rank, num, world_size))


def rank_indices_contiguous_blocks(num, batch_size, rank, world_size):  # one block of num / W per process
    per_rank = math.ceil(num / world_size)
    return list(range(rank * per_rank, min((rank + 1) * per_rank, num)))


def rank_indices_dropping_the_last_round(num, batch_size, rank, world_size):
    per_round = world_size * batch_size
    return [i for start in range(rank * batch_size, num - per_round + 1, per_round)
            for i in range(start, start + batch_size)]


def rank_indices_past_num(num, batch_size, rank, world_size):
    per_round = world_size * batch_size
    return [i for start in range(rank * batch_size, num, per_round) for i in range(start, start + batch_size)]


def bfloat16_truncated(x):
    return (x.view(torch.int32) & ~0xFFFF).view(torch.float32)


def bfloat16_half_up(x):
    return ((x.view(torch.int32) + 0x8000) & ~0xFFFF).view(torch.float32)


def bfloat16_is_float16(x):
    return x.half().float()


def bfloat16_returned_as_bfloat16(x):
    return x.to(torch.bfloat16)


CASES_07 = {
    "frechet_distance": (exercises.check_frechet_distance, solutions.frechet_distance,
                         [frechet_elementwise_sqrt, frechet_diagonal, frechet_without_two, frechet_mean_not_squared,
                          frechet_complex]),
    "rank_indices": (exercises.check_rank_indices, solutions.rank_indices,
                     [rank_indices_strided, rank_indices_contiguous_blocks, rank_indices_dropping_the_last_round,
                      rank_indices_past_num]),
    "to_bfloat16": (exercises.check_to_bfloat16, solutions.to_bfloat16,
                    [bfloat16_truncated, bfloat16_half_up, bfloat16_is_float16, bfloat16_returned_as_bfloat16]),
}


def test_chapter_07_hints_name_the_mistake(capsys):
    expected = {
        frechet_elementwise_sqrt: "not the square root of each entry",
        frechet_diagonal: "the covariances are not diagonal",
        frechet_without_two: "the factor 2 is missing",
        frechet_mean_not_squared: "*squared* distance of the means",
        frechet_complex: "keep the real part",
        rank_indices_strided: "not every W-th index",
        rank_indices_contiguous_blocks: "round k holds",
        rank_indices_dropping_the_last_round: "cut it at num instead of dropping it",
        rank_indices_past_num: "must stay below num",
        bfloat16_truncated: "rounds towards zero",
        bfloat16_half_up: "even neighbour",
        bfloat16_is_float16: "that is float16",
        bfloat16_returned_as_bfloat16: "as float32",
    }
    assert_hints(CASES_07, expected, capsys)


# ---------------------------------------------------------------------------------------------
# Every chapter's checks: each accepts its reference solution, rejects each typical mistake, answers a stub.

ALL_CASES = {**CASES, **CASES_04, **CASES_05, **CASES_06, **CASES_07}
assert len(ALL_CASES) == len(CASES) + len(CASES_04) + len(CASES_05) + len(CASES_06) + len(CASES_07)  # no name twice
MISTAKES = [(name, mistake) for name, (_, _, mistakes) in ALL_CASES.items() for mistake in mistakes]


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_check_accepts_the_reference_solution(name, capsys):
    check, solution, _ = ALL_CASES[name]
    assert check(solution) is True
    assert ": correct" in verdict(capsys)


@pytest.mark.parametrize("name, mistake", MISTAKES,
                         ids=[f"{name}-{getattr(m, '__name__', m)}" for name, m in MISTAKES])
def test_check_rejects_a_typical_mistake(name, mistake, capsys):
    check, _, _ = ALL_CASES[name]
    assert check(mistake) is False
    assert ": not yet: " in verdict(capsys)


@pytest.mark.parametrize("name", list(ALL_CASES))
def test_check_answers_the_stub_without_raising(name, capsys):
    check = ALL_CASES[name][0]
    assert check(None if name == "largest_respaced_beta" else stub) is False
    assert verdict(capsys).endswith("not attempted yet: fill in the cell above")
