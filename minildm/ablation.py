"""The name chapter 03 imports for its experiments; they live in `minildm.experiments` (run from there).

- ADM's architecture ablation: `minildm.experiments.adm_ablation` (`VARIANTS`, `plot`);
- iDDPM's cosine schedule and learned variances: `minildm.experiments.iddpm` (`plot_schedule`, `plot_variance`);
- DDPM's objectives (eps / x0, L_simple / L_vlb): `minildm.experiments.ddpm_objectives` (`plot`);
- what they share (the base config, training through `train.train`, scoring, mean ± standard error):
  `minildm.experiments.runner`.

    python -m minildm.ablation adm ...        is   python -m minildm.experiments.adm_ablation ...
    python -m minildm.ablation variance ...   is   python -m minildm.experiments.iddpm variance ...
"""

from __future__ import annotations

import sys

from minildm.experiments import adm_ablation, iddpm
from minildm.experiments.runner import BASE, BASE_PRESET, make_config  # noqa: F401

ADM_VARIANTS = adm_ablation.VARIANTS
VARIANCE_VARIANTS = iddpm.VARIANCE_VARIANTS


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in ("adm", "variance"):
        raise SystemExit("usage: python -m minildm.ablation adm|variance [options]; the experiments are "
                         "python -m minildm.experiments.{adm_ablation,iddpm,ddpm_objectives} --help")
    if argv[0] == "adm":
        return adm_ablation.main(argv[1:])
    return iddpm.main(argv)


if __name__ == "__main__":
    main()
