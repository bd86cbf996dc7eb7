"""Per-module ranks shared by the rank-adaptive methods (AdaLoRA, SoRA).

* `diagonal_to_lora`: a factorised adapter `x @ A @ diag(d) @ B · s` (A `[L, in, r]`, d `[L, r]`,
  B `[L, r, out]`) with a keep mask `[L, r]` becomes a plain LoRA with per-module ranks: the kept columns
  of A, and `d·s` folded into the kept rows of B, with `lora_alpha = r` so peft's scale is 1.
* `rank_table` / `plot_ranks` / `report_ranks`: the final rank per module as a text table, a layer × module
  heat map, and both plus OUT/ranks.json after a training run.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from jpeft.errors import ConfigError
from jpeft.methods.lora import LoRA, LoraSite
from jpeft.methods.targeting import Site
from jpeft.torch_bridge.hf_names import SITE_ORDER as ALL_SITES


def diagonal_to_lora(factors: Mapping[Site, tuple], keep: Mapping[Site, np.ndarray], scale: float
                     ) -> tuple[LoRA, dict]:
    """`(LoRA, {"lora": tree})` equal to `x @ A @ diag(d) @ B · scale` restricted to the kept ranks.

    factors: site -> (A `[L, in, r]`, d `[L, r]`, B `[L, r, out]`); keep: site -> bool `[L, r]`.
    A module with no kept rank gets rank 0 (not transformed, not exported); a site with none is dropped.
    """
    sites, layers = [], {}
    for (block, proj), (a, d, b) in factors.items():
        a, d, b = (np.asarray(x, np.float32) for x in (a, d, b))
        k = np.asarray(keep[(block, proj)], bool)
        ranks = tuple(int(n) for n in k.sum(axis=1))
        r_max = max(ranks)
        if r_max == 0:
            continue
        n_layers, d_in, d_out = a.shape[0], a.shape[1], b.shape[2]
        new_a = np.zeros((n_layers, d_in, r_max), np.float32)
        new_b = np.zeros((n_layers, r_max, d_out), np.float32)
        for i in range(n_layers):
            idx = np.flatnonzero(k[i])
            new_a[i, :, :idx.size] = a[i][:, idx]
            new_b[i, :idx.size, :] = b[i][idx, :] * (d[i][idx] * np.float32(scale))[:, None]
        sites.append(LoraSite(block, proj, ranks, tuple(float(r) for r in ranks)))
        layers.setdefault(block, {})[proj] = {"lora_A": jnp.asarray(new_a), "lora_B": jnp.asarray(new_b)}
    if not sites:
        raise ConfigError("every rank of every module is pruned (all gates / singular values are zero): there is "
                          "nothing to export as LoRA; lower the sparsity (xi, sparse_lambda) or raise target_r")
    r_ref = max(max(s.ranks) for s in sites)
    return LoRA(sites=tuple(sites), r=r_ref, lora_alpha=r_ref), {"lora": {"layers": layers}}


def rank_table(ranks: Mapping[Site, list[int]], budget: int | None = None) -> str:
    """A text table: one row per layer, one column per projection, final ranks; totals at the bottom."""
    cols = [s for s in ALL_SITES if s in ranks]
    n_layers = len(next(iter(ranks.values()))) if ranks else 0
    head = ["layer"] + [p for _, p in cols] + ["total"]
    rows = [[str(i)] + [str(ranks[c][i]) for c in cols] + [str(sum(ranks[c][i] for c in cols))]
            for i in range(n_layers)]
    total = sum(sum(v) for v in ranks.values())
    rows.append(["all"] + [str(sum(ranks[c])) for c in cols] + [str(total)])
    width = [max(len(r[j]) for r in [head] + rows) for j in range(len(head))]
    lines = ["  ".join(x.rjust(w) for x, w in zip(r, width)) for r in [head] + rows]
    if budget is not None:
        lines.append(f"total rank {total} of {budget} at the start ({100.0 * total / max(budget, 1):.1f}%)")
    return "\n".join(lines)


def plot_ranks(ranks: Mapping[Site, list[int]], path: str | Path, title: str = "final rank") -> Path:
    """A heat map of rank by layer (rows) × module (columns), written as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [s for s in ALL_SITES if s in ranks]
    grid = np.asarray([ranks[c] for c in cols], np.float32).T  # [L, modules]
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(cols), 1.0 + 0.3 * grid.shape[0]), dpi=100)
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0)
    ax.set_xticks(range(len(cols)), [p for _, p in cols], rotation=45, ha="right")
    ax.set_ylabel("layer")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label="rank")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def report_ranks(out: Path, ranks: Mapping[Site, list[int]], budget: int, lora: tuple[LoRA, dict] | None,
                 title: str) -> dict[str, Any]:
    """Print the rank table, write OUT/ranks.png and OUT/ranks.json (ranks and the exported LoRA's size)."""
    print(f"final rank per module ({title}):\n" + rank_table(ranks, budget))
    plot_ranks(ranks, out / "ranks.png", title=f"{title}: final rank")
    rec = {"ranks": {f"{b}.{p}": v for (b, p), v in ranks.items()}, "total_rank": sum(map(sum, ranks.values())),
           "initial_rank": budget,
           "exported_lora_parameters": lora[0].num_trainable(lora[1]["lora"]) if lora is not None else 0}
    (out / "ranks.json").write_text(json.dumps(rec, indent=1))
    return rec
