"""Adapting from the champion rather than from scratch: which mode a run takes and why, k-means
warm-started from the champion's centroids (their ids persist), how many old images keep their
pseudo-label, and the bounded, seeded replay sample of old images trained beside the new ones."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from grappa.config import ConfigError
from grappa.core.kmeans import assign

MODES = ("auto", "full", "incremental")


@dataclass(frozen=True)
class Decision:
    mode: str  # full | incremental
    reason: str  # one line, for the plan's log, the MLflow run and dvc.lock


def recipe_diff(champion: dict, current: dict, prefix: str = "") -> list[str]:
    """The dotted keys where two recipes (nested params without the data) differ."""
    keys = sorted(set(champion) | set(current))
    diff = []
    for key in keys:
        a, b = champion.get(key), current.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            diff += recipe_diff(a, b, f"{prefix}{key}.")
        elif a != b:
            diff.append(f"{prefix}{key}")
    return diff


def choose_mode(requested: str, champion_recipe: dict | None, recipe: dict, new_share: float,
                max_new_share: float, generation: int, max_generations: int, known: int | None = None) -> Decision:
    """Incremental when a champion exists, was trained on this pool (``known``: how many of its images
    are in it, when counted), its recipe is the current one apart from the data, the new share of the
    pool is above 0 and at most ``max_new_share``, and fewer than ``max_generations`` incremental runs followed its
    last full one; else full. ``auto`` falls back to full saying why; an explicit ``incremental`` that
    cannot be honoured is refused with the same reason."""
    if requested not in MODES:
        raise ConfigError(f"adapt.mode must be one of {', '.join(MODES)}, got {requested!r}")
    if requested == "full":
        return Decision("full", "adapt.mode is full")
    if champion_recipe is None:
        why = "no champion to start from"
    elif known == 0:
        why = "the champion was trained on other data: none of its images is in the pool"
    elif diff := recipe_diff(champion_recipe, recipe):
        why = f"the recipe changed since the champion: {', '.join(diff[:5])}" + (" ..." if len(diff) > 5 else "")
    elif new_share == 0:  # the code or the labelled split changed: what the champion learnt may not hold
        why = "no image of the pool is new to the champion: what changed is not the unlabeled data"
    elif new_share > max_new_share:
        why = f"{new_share:.0%} of the pool is new, above adapt.max_new_share {max_new_share:.0%}"
    elif generation >= max_generations:
        why = f"{generation} incremental runs since the last full one (adapt.max_generations {max_generations})"
    else:
        return Decision("incremental", f"{new_share:.0%} of the pool is new, same recipe as the champion, "
                                       f"incremental run {generation + 1} of at most {max_generations}")
    return fall_back(requested, why)


def fall_back(requested: str, why: str) -> Decision:
    """A full run for ``why``, or, when ``adapt.mode`` asked for incremental, a one-line refusal."""
    if requested == "incremental":
        raise ConfigError(f"adapt.mode incremental: {why}; run with adapt.mode auto or full")
    return Decision("full", why)


def refine_centroids(init: np.ndarray, sample: np.ndarray, niter: int) -> np.ndarray:
    """Spherical Lloyd iterations started from ``init`` (k, D), ``niter`` of them on ``sample``:
    L2-normalised centroids in the order of ``init``. A centroid that no image picks stays where it
    was (k-means would re-seed it elsewhere), so every centroid keeps its id and its classifier row."""
    x = np.ascontiguousarray(sample, dtype=np.float32)
    centroids = np.ascontiguousarray(init, dtype=np.float32).copy()
    for _ in range(niter):
        labels = assign(centroids, x)
        sums = np.zeros_like(centroids)
        np.add.at(sums, labels, x)
        picked = np.bincount(labels, minlength=len(centroids)) > 0
        centroids[picked] = sums[picked] / np.linalg.norm(sums[picked], axis=1, keepdims=True).clip(1e-12)
    return centroids


def label_change_reason(persistence: dict[int, float], max_change: float) -> str | None:
    """Why a full run is needed after all: the k whose old images changed pseudo-label the most, when
    that share is above ``max_change`` (None: the warm-started clusters hold)."""
    if not persistence:
        return None
    k, kept = min(persistence.items(), key=lambda item: item[1])
    if 1.0 - kept <= max_change:
        return None
    return f"{1.0 - kept:.0%} of the old images changed pseudo-label at k={k}, above adapt.max_label_change {max_change:.0%}"


def label_persistence(before: np.ndarray, after: np.ndarray) -> float:
    """The share of images whose pseudo-label is the same before and after (aligned arrays)."""
    if len(before) != len(after):
        raise ValueError(f"{len(before)} labels before, {len(after)} after: align them on the same images")
    return float(np.mean(np.asarray(before) == np.asarray(after))) if len(before) else 1.0


def replay_sample(n_old: int, size: int, seed: int) -> np.ndarray:
    """Sorted positions of at most ``size`` of ``n_old`` old images, drawn with ``seed``: what an
    incremental run trains on beside the new images, so its cost follows the new data, not the pool."""
    if size < 0:
        raise ValueError(f"replay size must be >= 0, got {size}")
    take = min(size, n_old)
    return np.sort(np.random.default_rng(seed).choice(n_old, take, replace=False)) if take else np.empty(0, np.int64)
