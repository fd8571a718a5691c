"""Experiments that sit apart from the concept modules: each is a command that writes its results to data/results/.

- `adm_ablation`: ADM's architecture ablation (Dhariwal & Nichol 2021, Tab. 1) in small;
- `iddpm`: the cosine schedule and learned variances of improved DDPM (Nichol & Dhariwal 2021);
- `ddpm_objectives`: DDPM's Table 2 in small (eps / x0 prediction, L_simple / L_vlb; Ho et al. 2020);
- `runner`: what those three share (base config, training through `train.train`, scoring, mean ± standard error);
- `levers`: what limits sample quality per CPU minute.
"""
