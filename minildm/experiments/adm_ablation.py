"""ADM's architecture ablation (Dhariwal & Nichol 2021, Tab. 1) in small: each change alone, then all together.

The changes, each added to the DDPM-style base of `runner.BASE` (16x16 shapes, widths 16/32/32):
attention at several resolutions (8x8 and 4x4, the 1/2 and 1/4 sides, as ADM's 32/16/8 of 128) with a
fixed number of channels per head (8, so 4 heads where the base has 1, as ADM's 64 at its width),
BigGAN-style residual up/down sampling, and adaptive group norm (AdaGN). Every variant trains the same
number of steps (ADM compared its rows at equal steps) with `train.train`, for several seeds, and is scored
on DDIM samples by `minildm.metrics.evaluate_shapes`. ADM's claim: each change lowers FID.

    python -m minildm.experiments.adm_ablation --out data/results/adm_ablation.json \\
        --grid data/results/adm_ablation_samples.png
    python -m minildm.experiments.adm_ablation --seeds 0 --train-steps 2 --num-samples 8 --variants adm  # smoke

A notebook draws the result with `adm_ablation.plot(json.load(...))`.
"""

from __future__ import annotations

from minildm.experiments import runner

ATTENTION = ["unet.attention_resolutions=8,4", "unet.num_head_channels=8"]
UPDOWN = ["unet.resblock_updown=true"]
ADAGN = ["unet.use_scale_shift_norm=true"]
VARIANTS = {
    "ddpm": [],
    "+attention": ATTENTION,
    "+updown": UPDOWN,
    "+adagn": ADAGN,
    "adm": ATTENTION + UPDOWN + ADAGN,
}
CLAIM = ("ADM Tab. 1: starting from a DDPM-style UNet, attention at several resolutions with more heads, BigGAN "
         "up/down sampling and AdaGN each improve FID at equal training steps; together they improve it most.")


def rows(sample_steps: int = 20) -> list[runner.Row]:
    """One row per variant, scored on `sample_steps`-step DDIM samples and the held-out L_simple, against ddpm."""
    return [runner.Row(name, name, overrides, sampler="ddim", steps=sample_steps, reference="ddpm", heldout_loss=True)
            for name, overrides in VARIANTS.items()]


def plot(report: dict):
    """The figure of a report: Fréchet distance (and floor), confident fraction, precision, recall, held-out loss."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 5, figsize=(18, 3.4))
    runner.bar_chart(axes[0], report, "frechet_distance_to_real", floor="frechet_distance_floor",
                     ylabel="Fréchet distance (lower is better)", title="shapes-evaluator Fréchet distance")
    runner.bar_chart(axes[1], report, "confident_fraction", ylabel="confident fraction (higher is better)")
    runner.bar_chart(axes[2], report, "precision", ylabel="precision (fidelity)")
    runner.bar_chart(axes[3], report, "recall", ylabel="recall (diversity)")
    if any("heldout_loss" in r["aggregate"] for r in report["results"].values()):
        runner.bar_chart(axes[4], report, "heldout_loss", ylabel="held-out L_simple (lower is better)")
        values = [r["aggregate"]["heldout_loss"]["mean"] for r in report["results"].values()]
        axes[4].set_ylim(0.9 * min(values), 1.05 * max(values))
    settings = report["settings"]
    fig.suptitle(f"ADM ablation in small: {settings['train_steps']} training steps, {len(settings['seeds'])} seeds "
                 f"(mean ± SE, dots = seeds), {settings['num_samples']} DDIM samples each")
    fig.tight_layout()
    return fig


def main(argv=None) -> dict:
    return runner.ddim_experiment_main("adm", "minildm.experiments.adm_ablation", __doc__.split("\n")[0], CLAIM, rows,
                                       "heldout_loss", argv)


if __name__ == "__main__":
    main()
