"""Evaluation plots (matplotlib, headless). Each function writes one PNG atomically."""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from grappa.io.artifacts import atomic_path  # noqa: E402
from grappa.io.sources import decode_image  # noqa: E402
from grappa.io.storage import StorageError, read_bytes  # noqa: E402


def _save(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)


def per_domain_bars(path: Path, methods: dict, metric: str) -> None:
    """Grouped bars: one group per domain (+ mean), one bar per method."""
    names = list(methods)
    domains = list(next(iter(methods.values()))["per_domain"]) + ["mean"]
    width = 0.8 / len(names)
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(domains)), 4.5))
    cmap = plt.get_cmap("tab20")
    for i, name in enumerate(names):
        values = [methods[name]["per_domain"][d][metric] for d in domains[:-1]] + [methods[name]["mean"][metric]]
        ax.bar(np.arange(len(domains)) + i * width - 0.4 + width / 2, 100 * np.array(values), width,
               label=name, color=cmap(i % 20))
    ax.set_xticks(np.arange(len(domains)), domains)
    ax.set_ylabel(f"{metric.replace('_', ' ')} (%)")
    ax.set_title(f"{metric} per domain and method")
    ax.legend(ncol=min(len(names), 4), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.08))
    ax.grid(axis="y", alpha=0.3)
    _save(fig, path)


def attention_heatmaps(path: Path, attention_by_domain: dict[str, list], ks: list[int]) -> None:
    """Per domain, the fused model's mean attention over granularities (rows: adapted blocks)."""
    domains = list(attention_by_domain)
    fig, axes = plt.subplots(1, len(domains), figsize=(2.6 * len(domains) + 1, 3.6), squeeze=False)
    for ax, domain in zip(axes[0], domains):
        att = np.asarray(attention_by_domain[domain])
        im = ax.imshow(att, vmin=0, vmax=max(0.5, float(att.max())), cmap="viridis", aspect="auto")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(att.shape[0]), [f"block {i}" for i in range(att.shape[0])], fontsize=7)
        ax.set_xlabel("k (granularity)")
        ax.set_title(domain)
    fig.colorbar(im, ax=axes[0].tolist(), shrink=0.8, label="mean attention")
    fig.suptitle("Granularity attention of the fused model, by domain")
    _save(fig, path)


def query_grid(path: Path, queries: list[str], results: list[list[str]], correct: list[list[bool]]) -> None:
    """Each row: a query, then its top results framed green (same class) or red."""
    cols = 1 + max(len(r) for r in results)
    fig, axes = plt.subplots(len(queries), cols, figsize=(1.6 * cols, 1.6 * len(queries)), squeeze=False)
    for row, (query, hits, ok) in enumerate(zip(queries, results, correct)):
        for col, uri in enumerate([query, *hits]):
            ax = axes[row][col]
            ax.set_xticks([])
            ax.set_yticks([])
            try:
                ax.imshow(decode_image(read_bytes(uri), 1, 1 << 40).resize((96, 96)))
            except (StorageError, ValueError):
                ax.text(0.5, 0.5, "n/a", ha="center")
            color = "black" if col == 0 else ("green" if ok[col - 1] else "red")
            for spine in ax.spines.values():
                spine.set_edgecolor(color)
                spine.set_linewidth(3)
        axes[row][0].set_ylabel("query", fontsize=8)
    fig.suptitle("Top-5 retrievals of the fused model (green: same class)")
    _save(fig, path)
