"""Evaluation plots (matplotlib, headless). Each function writes one PNG atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grappa.core.evaluation import method_order  # noqa: E402
from grappa.io.artifacts import atomic_path  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


LABELS = {"map_at_r": "mAP@R", "recall_at_1": "R@1"}
COLOURS = {"zero_shot": "#9e9e9e", "grappa": "#e66101"}  # the baseline grey, the product orange; the rest blue


def per_domain_bars(path: Path, methods: dict, metric: str) -> None:
    """One panel per domain and the mean: each method's score as a labelled bar, each panel's axis zoomed
    to its own scores (domains differ by tens of points, methods by one to three)."""
    names = method_order(list(methods))
    panels = list(next(iter(methods.values()))["per_domain"]) + ["mean"]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 0.38 * len(names) + 1.5), sharey=True,
                             squeeze=False, layout="constrained")
    for ax, panel in zip(axes[0], panels):
        values = [100 * (methods[n]["mean"] if panel == "mean" else methods[n]["per_domain"][panel])[metric]
                  for n in names]
        low, high = min(values), max(values)
        pad = max(0.6, 0.25 * (high - low))
        ax.barh(range(len(names)), values, color=[COLOURS.get(n, "#4c78a8") for n in names])
        ax.set_xlim(low - pad, high + 1.6 * pad)
        for y, value in enumerate(values):
            ax.text(value, y, f" {value:.1f}", va="center", fontsize=8)
        ax.set_title(panel, fontweight="bold" if panel == "mean" else None)
        ax.grid(axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
    axes[0][0].set_yticks(range(len(names)), names)
    axes[0][0].invert_yaxis()
    fig.suptitle(f"{LABELS.get(metric, metric)} (%) per domain and method (each panel's axis starts near its lowest score)")
    _save(fig, path)


def attention_heatmaps(path: Path, attention_by_domain: dict[str, list], ks: list[int]) -> None:
    """Per domain, the fused model's mean attention over granularities (rows: adapted blocks, first to last)."""
    domains = list(attention_by_domain)
    fig, axes = plt.subplots(1, len(domains), figsize=(2.4 * len(domains) + 1.2, 3.8), sharey=True, squeeze=False,
                             layout="constrained")
    top = max(0.5, max(float(np.max(a)) for a in attention_by_domain.values()))
    for ax, domain in zip(axes[0], domains):
        att = np.asarray(attention_by_domain[domain])
        im = ax.imshow(att, vmin=0, vmax=top, cmap="viridis", aspect="auto")
        for (row, col), value in np.ndenumerate(att):
            ax.text(col, row, f"{value:.2f}", ha="center", va="center", fontsize=7,
                    color="black" if value > 0.6 * top else "white")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_xlabel("k (granularity)")
        ax.set_title(domain)
    axes[0][0].set_yticks(range(att.shape[0]), [f"adapted block {i + 1}" for i in range(att.shape[0])], fontsize=8)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean attention")
    fig.suptitle("Granularity attention of the fused model, by domain")
    _save(fig, path)
