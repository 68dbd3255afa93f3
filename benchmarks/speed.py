"""Speed benchmark of the pipeline's building blocks against the plain alternatives, side by side.

    python benchmarks/speed.py            # default sizes, < ~10 min on 2 CPU cores
    python benchmarks/speed.py --full     # larger sizes (for a GPU / many-core machine)
    python benchmarks/speed.py --quick --images DIR --out-dir DIR   # seconds; used by the tests

Every comparison is measured in the same process, one right after the other, on the same inputs,
so the *ratios* stay meaningful on a shared, noisy machine even when absolute seconds do not.
Results go to ``benchmarks/results/speed_<device>.json`` (device: ``cpu-<N>core`` or
``cuda-<GPU>``); benchmarks/README.md explains every number.
"""
from __future__ import annotations

import argparse
import glob
import json
import math
import os
import platform
import re
import resource
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a plain script from anywhere
    sys.path.insert(0, str(REPO))

import faiss  # noqa: E402
import torch  # noqa: E402

from grappa.config import BackboneParams, load_params  # noqa: E402
from grappa.core.backbones import create_backbone  # noqa: E402
from grappa.core.kmeans import spherical_kmeans  # noqa: E402
from grappa.core.metrics import knn_search, leave_one_out_neighbours  # noqa: E402
from grappa.core.model import CPU_CHUNK, GrappaModel, single  # noqa: E402

SCHEMA_VERSION = 1
DEFAULT_IMAGES = str(REPO.parent / "shared" / "data" / "multidomain" / "*" / "images")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

PRESETS = {
    # the default: finishes in well under ~10 min on 2 busy CPU cores
    "default": dict(extract_sizes=[64, 256], kmeans_sizes=[10_000, 100_000, 1_000_000], knn_sizes=[10_000, 100_000],
                    kmeans_k=256, niter=25, dim=384, knn_k=10, budget_s=150.0, knn_sample=2000,
                    train_batch=128, train_steps=5, paper_steps=2, fusion_m=4, repeats=1),
    "full": dict(extract_sizes=[64, 256, 1024], kmeans_sizes=[10_000, 100_000, 1_000_000],
                 knn_sizes=[10_000, 100_000, 1_000_000], kmeans_k=256, niter=25, dim=384, knn_k=10,
                 budget_s=600.0, knn_sample=5000, train_batch=128, train_steps=10, paper_steps=5, fusion_m=4,
                 repeats=2),
    # seconds: tiny sizes, random-init timm test model (tests/test_benchmarks.py)
    "quick": dict(extract_sizes=[4, 8], kmeans_sizes=[500, 2000], knn_sizes=[300, 1200], kmeans_k=8, niter=5,
                  dim=32, knn_k=10, budget_s=30.0, knn_sample=200, train_batch=8, train_steps=2, paper_steps=1,
                  fusion_m=4, repeats=1),
}


# --------------------------------------------------------------------------- helpers


def device_info() -> dict:
    cuda = torch.cuda.is_available()
    faiss_gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    if cuda:
        gpu = torch.cuda.get_device_name(0)
        tokens = [t for t in gpu.replace("NVIDIA", "").split() if any(c.isdigit() for c in t)]
        name = "cuda-" + re.sub(r"[^A-Za-z0-9]", "", tokens[0] if tokens else gpu)
    else:
        gpu, name = None, f"cpu-{cores}core"
    return {"name": name, "torch_device": "cuda" if cuda else "cpu", "gpu": gpu, "faiss_gpus": faiss_gpus,
            "cpu_cores": cores, "torch_threads": torch.get_num_threads(), "faiss_threads": faiss.omp_get_max_threads(),
            "platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "faiss": faiss.__version__, "numpy": np.__version__, "sklearn": _version("sklearn"),
            "timm": _version("timm")}


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def sync(dev: str) -> None:
    if dev == "cuda":
        torch.cuda.synchronize()


def cpu_seconds() -> float:
    """CPU time of this process (all threads) plus its finished children (DataLoader workers)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.process_time() + ru.ru_utime + ru.ru_stime


class Clock:
    """Wall and CPU seconds of a block. CPU seconds move less than wall seconds when other jobs share
    the cores, but miss what parallelism buys; both ratios are reported."""

    def __init__(self, dev: str = "cpu"):
        self.dev = dev

    def __enter__(self) -> "Clock":
        sync(self.dev)
        self._wall, self._cpu = time.perf_counter(), cpu_seconds()
        return self

    def __exit__(self, *exc) -> None:
        sync(self.dev)
        self.wall, self.cpu = time.perf_counter() - self._wall, cpu_seconds() - self._cpu


def growth_exponent(ns: list[float], seconds: list[float | None]) -> float | None:
    """Slope of log(time) vs log(N): 1 = linear, 2 = quadratic, < 1 = fixed costs amortised."""
    pts = [(n, s) for n, s in zip(ns, seconds) if s is not None and s > 0]
    if len(pts) < 2:
        return None
    x, y = np.log([p[0] for p in pts]), np.log([p[1] for p in pts])
    return round(float(np.polyfit(x, y, 1)[0]), 3)


def fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, (bool, np.bool_)):
        return str(v)
    if isinstance(v, (int, np.integer)):
        return f"{v:,}"
    if abs(v) >= 100:
        return f"{v:,.0f}"
    if abs(v) >= 1:
        return f"{v:.2f}"
    if abs(v) >= 0.1:
        return f"{v:.4f}"
    return f"{v:.3g}"


def print_table(title: str, headers: list[str], rows: list[list], notes: list[str] = ()) -> None:
    cells = [[fmt(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    print(f"\n== {title}")
    print("  ".join(h.rjust(w) for h, w in zip(headers, widths)))
    for r in cells:
        print("  ".join(c.rjust(w) for c, w in zip(r, widths)))
    for note in notes:
        print(f"   {note}")
    sys.stdout.flush()


def synthetic_vectors(n: int, d: int, seed: int, centres: int = 1000, noise: float = 0.7) -> np.ndarray:
    """L2-normalised float32 vectors around ``centres`` random directions (a clustered, feature-like cloud)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centres, d), dtype=np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    out = np.empty((n, d), dtype=np.float32)
    scale = np.float32(noise / math.sqrt(d))
    for s in range(0, n, 65536):
        e = min(n, s + 65536)
        chunk = c[rng.integers(0, centres, e - s)] + scale * rng.standard_normal((e - s, d), dtype=np.float32)
        out[s:e] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


# --------------------------------------------------------------------------- 1. feature extraction


def list_images(pattern: str) -> list[str]:
    roots = sorted(glob.glob(pattern)) or [pattern]
    files = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            files += [os.path.join(dirpath, n) for n in names if n.lower().endswith(IMAGE_EXTS)]
    return sorted(files)


def bench_extraction(args, dev: str) -> dict:
    import timm.data
    from PIL import Image

    from grappa.io.datasets import ImageDataset, loader

    from grappa.core.augment import image_transform

    files = list_images(args.images)
    if not files:
        raise SystemExit(f"speed.py: no images under {args.images}")
    order = np.random.default_rng(0).permutation(len(files))  # a fixed mix of all domains
    sizes = [n for n in args.extract_sizes if n <= len(files)]
    if len(sizes) < len(args.extract_sizes):
        print(f"extraction: only {len(files)} images under {args.images}; sizes capped to {sizes}")
    chosen = [files[i] for i in order[: max(sizes)]]
    for path in chosen:  # warm the page cache, so neither path pays the cold disk read
        Path(path).read_bytes()

    bp = BackboneParams(name=args.backbone, weights=args.weights, image_size=args.image_size,
                        adapt_from_block=args.adapt_from_block)
    backbone, preprocess, _ = create_backbone(bp)
    model = GrappaModel(backbone, bp.adapt_from_block, ks=[], reduction=1).to(dev).eval()
    timm_model = backbone.model  # the same timm module and weights, called the plain way
    cfg = timm.data.resolve_data_config({"input_size": (3, args.image_size, args.image_size)}, model=timm_model)
    plain_tf = timm.data.create_transform(**cfg)
    start = bp.adapt_from_block

    def ours(paths: list[str]) -> np.ndarray:
        """extract.py's path: ImageDataset + loader (workers, batches) + inference_mode."""
        dataset = ImageDataset(paths, image_transform(preprocess, train=False), min_side=1, max_pixels=1 << 40)
        out = np.zeros((len(paths), backbone.embed_dim), np.float32)
        with torch.inference_mode():
            for rows, x, bad in loader(dataset, args.extract_batch, num_workers=args.num_workers):
                assert not bad, bad
                acts = model.forward_prefix(x.to(dev))
                emb, _ = model.forward_suffix(acts, "zero_shot")
                if start > 0:  # extract.py also keeps the float16 prefix activations
                    acts.to(torch.float16).cpu().numpy().tobytes()
                out[rows.numpy()] = emb.float().cpu().numpy()
        sync(dev)
        return out

    def plain(paths: list[str]) -> np.ndarray:
        """What one writes without the pipeline: decode, transform, model(x[None]), one image at a time."""
        out = []
        with torch.no_grad():
            for path in paths:
                x = plain_tf(Image.open(path).convert("RGB"))
                out.append(timm_model(x[None].to(dev))[0].float().cpu().numpy())
        sync(dev)
        return np.stack(out)

    ours(chosen[: min(8, len(chosen))])  # warm-up (thread pools, allocator, first-call overheads)
    plain(chosen[:2])
    rows = []
    for n in sizes:
        paths = chosen[:n]
        t_plain, t_ours = [], []
        for _ in range(args.repeats):  # alternate, so both paths see the same background load
            with Clock(dev) as c:
                f_plain = plain(paths)
            t_plain.append((c.wall, c.cpu))
            with Clock(dev) as c:
                f_ours = ours(paths)
            t_ours.append((c.wall, c.cpu))
        f_plain /= np.linalg.norm(f_plain, axis=1, keepdims=True)
        cos = (f_plain * f_ours).sum(1)
        (ps, pc), (os_, oc) = min(t_plain), min(t_ours)
        rows.append({"n": n, "ours_s": os_, "plain_s": ps, "ours_img_per_s": n / os_,
                     "plain_img_per_s": n / ps, "ratio": ps / os_, "ours_cpu_s": oc, "plain_cpu_s": pc,
                     "ratio_cpu": pc / oc, "min_cosine_ours_vs_plain": float(cos.min())})
    growth = {"ours_exponent": growth_exponent(sizes, [r["ours_s"] for r in rows]),
              "plain_exponent": growth_exponent(sizes, [r["plain_s"] for r in rows])}
    print_table(f"1. feature extraction, {args.backbone} ({args.weights} weights, {args.image_size}px), "
                f"{dev}, batch {args.extract_batch}, {args.num_workers} workers",
                ["N", "ours s", "ours img/s", "plain s", "plain img/s", "ratio", "cpu ratio", "min cos"],
                [[r["n"], r["ours_s"], r["ours_img_per_s"], r["plain_s"], r["plain_img_per_s"], r["ratio"],
                  r["ratio_cpu"], r["min_cosine_ours_vs_plain"]] for r in rows],
                ["cpu ratio = the same ratio in CPU seconds (process + worker processes; less load-sensitive)",
                 f"ratio = ours img/s / plain img/s; growth exponent (time ~ N^e): ours {growth['ours_exponent']}, "
                 f"plain {growth['plain_exponent']}",
                 "min cos: smallest cosine between the two paths' embeddings of one image (1 = same features)"])
    return {"backbone": args.backbone, "weights": args.weights, "image_size": args.image_size,
            "adapt_from_block": start, "batch_size": args.extract_batch, "num_workers": args.num_workers,
            "images": args.images, "rows": rows, "growth": growth}


# --------------------------------------------------------------------------- 2. k-means


def faiss_kmeans(x: np.ndarray, k: int, niter: int, seed: int, gpu: bool) -> np.ndarray:
    """Centroids of the pipeline's spherical k-means (faiss), one run (nredo=1, like n_init=1)."""
    if not gpu:  # every point trains, as in sklearn (the step's training sample is not what is compared)
        _, centroids = spherical_kmeans(x, k, niter, 1, seed, max_points_per_centroid=1 << 30)
        return centroids
    km = faiss.Kmeans(x.shape[1], k, niter=niter, nredo=1, spherical=True, seed=seed, verbose=False, gpu=True,
                      min_points_per_centroid=1, max_points_per_centroid=1 << 30)
    km.train(x)
    km.index.search(x, 1)  # the pipeline also assigns every point after training
    return km.centroids


def kmeans_objective(x: np.ndarray, centroids: np.ndarray) -> dict:
    """Both objectives for any centroids: mean squared L2 distance to the nearest raw centroid
    (sklearn's inertia / N) and mean cosine to the nearest L2-normalised centroid (spherical k-means)."""
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    l2 = faiss.IndexFlatL2(c.shape[1])
    l2.add(c)
    d2, _ = l2.search(x, 1)
    ip = faiss.IndexFlatIP(c.shape[1])
    ip.add(c / np.linalg.norm(c, axis=1, keepdims=True))
    cos, _ = ip.search(x, 1)
    return {"mean_sq_l2": float(d2.mean()), "mean_cosine": float(cos.mean())}


def bench_kmeans(args, info: dict) -> dict:
    from sklearn.cluster import KMeans

    gpu = info["faiss_gpus"] > 0
    rows, last = [], None
    for n in args.kmeans_sizes:
        x = synthetic_vectors(n, args.dim, seed=n)
        k = min(args.kmeans_k, n)
        with Clock() as c:
            cf = faiss_kmeans(x, k, args.niter, seed=1, gpu=gpu)
        t_faiss = c.wall
        row = {"n": n, "k": k, "faiss_s": t_faiss, "faiss_cpu_s": c.cpu, "faiss_iters": args.niter,
               "sklearn_s": None, "sklearn_cpu_s": None, "sklearn_iters": None, "sklearn_skipped_est_s": None,
               "ratio": None, "ratio_cpu": None, "ratio_per_iter": None,
               "faiss_objective": kmeans_objective(x, cf), "sklearn_objective": None}
        est = None if last is None else last[1] * n / last[0]  # Lloyd's cost is linear in N
        if est is not None and est > args.budget_s:
            row["sklearn_skipped_est_s"] = est
        else:
            km = KMeans(n_clusters=k, init=args.sklearn_init, n_init=1, max_iter=args.niter, tol=0.0,
                        random_state=1, algorithm="lloyd")
            with Clock() as c:
                km.fit(x)
            row["sklearn_s"], row["sklearn_cpu_s"] = c.wall, c.cpu
            row["ratio_cpu"] = c.cpu / row["faiss_cpu_s"]
            # sklearn stops early once no label changes (a fixed point); faiss always runs niter
            row["ratio_per_iter"] = (c.wall / max(km.n_iter_, 1)) / (t_faiss / args.niter)
            row["sklearn_iters"] = int(km.n_iter_)
            row["ratio"] = row["sklearn_s"] / t_faiss
            row["sklearn_objective"] = kmeans_objective(x, km.cluster_centers_)
            last = (n, row["sklearn_s"])
        rows.append(row)
        del x
    growth = {"faiss_exponent": growth_exponent([r["n"] for r in rows], [r["faiss_s"] for r in rows]),
              "sklearn_exponent": growth_exponent([r["n"] for r in rows], [r["sklearn_s"] for r in rows])}

    def sk(r, key):
        return r["sklearn_objective"][key] if r["sklearn_objective"] else None

    print_table(f"2. k-means, {args.dim}-d L2-normalised synthetic vectors, k={args.kmeans_k}, {args.niter} iterations, "
                f"faiss {'GPU' if gpu else 'CPU'} (spherical) vs sklearn KMeans (lloyd, init={args.sklearn_init}, n_init=1)",
                ["N", "faiss s", "sklearn s", "sk iters", "ratio", "cpu ratio", "ratio/iter", "faiss cos", "sklearn cos", "faiss msq", "sklearn msq"],
                [[r["n"], r["faiss_s"],
                  r["sklearn_s"] if r["sklearn_s"] is not None else f"skipped (est. {r['sklearn_skipped_est_s']:.0f} s)",
                  r["sklearn_iters"], r["ratio"], r["ratio_cpu"], r["ratio_per_iter"],
                  r["faiss_objective"]["mean_cosine"], sk(r, "mean_cosine"),
                  r["faiss_objective"]["mean_sq_l2"], sk(r, "mean_sq_l2")] for r in rows],
                [f"ratio = sklearn s / faiss s; growth exponent: faiss {growth['faiss_exponent']}, "
                 f"sklearn {growth['sklearn_exponent']}",
                 f"faiss always runs {args.niter} iterations; sklearn stops at a fixed point (no label changes, "
                 "'sk iters'): ratio/iter compares seconds per iteration",
                 "cos = mean cosine to the nearest normalised centroid (higher is better, spherical objective); "
                 "msq = mean squared L2 to the nearest centroid (lower is better, sklearn's objective; faiss's "
                 "centroids are unit-norm, so msq favours sklearn by construction)",
                 f"sklearn is skipped where its time, extrapolated linearly in N, exceeds --budget-s {args.budget_s:.0f}"])
    return {"dim": args.dim, "k": args.kmeans_k, "niter": args.niter, "sklearn_init": args.sklearn_init,
            "faiss_gpu": gpu, "budget_s": args.budget_s, "rows": rows, "growth": growth}


# --------------------------------------------------------------------------- 3. kNN graph


def numpy_knn(x: np.ndarray, k: int, queries: np.ndarray | None = None, chunk_bytes: int = 1 << 27) -> np.ndarray:
    """Brute force: chunked matmul, self masked out, argpartition then sort of the top k."""
    q_idx = np.arange(len(x)) if queries is None else queries
    out = np.empty((len(q_idx), k), dtype=np.int64)
    chunk = max(1, chunk_bytes // (4 * len(x)))
    for s in range(0, len(q_idx), chunk):
        ids = q_idx[s:s + chunk]
        sims = x[ids] @ x.T
        sims[np.arange(len(ids)), ids] = -np.inf
        part = np.argpartition(sims, -k, axis=1)[:, -k:]
        top = np.take_along_axis(sims, part, axis=1)
        out[s:s + len(ids)] = np.take_along_axis(part, np.argsort(-top, axis=1), axis=1)
    return out


def faiss_knn(x: np.ndarray, k: int, gpu: bool, queries: np.ndarray | None = None) -> np.ndarray:
    """The pipeline's kNN graph (``leave_one_out_neighbours``: exact IndexFlatIP, self removed by index);
    on a faiss-GPU machine the same flat index on the GPU; ``queries``: a subset of rows only."""
    if queries is None and not gpu:
        return leave_one_out_neighbours(x, k)
    if gpu:
        index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatIP(x.shape[1]))
        index.add(x)
        _, idx = index.search(x if queries is None else x[queries], k + 1)
    else:
        _, idx = knn_search(x, k + 1, queries=x[queries])
    q_idx = np.arange(len(x)) if queries is None else queries
    out = np.empty((len(q_idx), k), dtype=np.int64)
    for r, i in enumerate(q_idx):
        out[r] = idx[r][idx[r] != i][:k]
    return out


def knn_agreement(x: np.ndarray, q_idx: np.ndarray, a: np.ndarray, b: np.ndarray) -> dict:
    """recall: |faiss ∩ numpy| / k per query; tie-aware: a faiss neighbour also counts when its similarity
    is within 1e-5 of numpy's k-th (the two BLAS paths round differently on near-ties)."""
    hits = np.array([len(set(r1) & set(r2)) for r1, r2 in zip(a, b)])
    kth = np.einsum("qd,qd->q", x[q_idx], x[b[:, -1]])
    sims_a = np.einsum("qd,qkd->qk", x[q_idx], x[a])
    ok = (sims_a >= kth[:, None] - 1e-5).sum(1)
    k = a.shape[1]
    return {"recall": float(hits.mean() / k), "recall_tie_aware": float(np.minimum(ok, k).mean() / k),
            "identical_rows": float((a == b).all(1).mean())}


def bench_knn(args, info: dict) -> dict:
    gpu = info["faiss_gpus"] > 0
    k = args.knn_k
    rows, last = [], {"faiss": None, "numpy": None}
    for n in args.knn_sizes:
        x = synthetic_vectors(n, args.dim, seed=10 * n + 1)
        rng = np.random.default_rng(n)
        sample = np.sort(rng.choice(n, size=min(args.knn_sample, n), replace=False))
        row = {"n": n, "k": k}
        results = {}
        for method in ("faiss", "numpy"):
            est = None if last[method] is None else last[method][1] * (n / last[method][0]) ** 2
            full = est is None or est <= args.budget_s
            with Clock() as c:
                if method == "faiss":
                    results[method] = faiss_knn(x, k, gpu, None if full else sample)
                else:
                    results[method] = numpy_knn(x, k, None if full else sample)
            scale = 1.0 if full else n / len(sample)  # every query costs the same: scale the sample to all N
            if full:
                last[method] = (n, c.wall)
            row[f"{method}_s"], row[f"{method}_cpu_s"] = c.wall * scale, c.cpu * scale
            row[f"{method}_extrapolated"] = not full
        # compare on the sample rows (all rows when both ran in full)
        both_full = not row["faiss_extrapolated"] and not row["numpy_extrapolated"]
        q_idx = np.arange(n) if both_full else sample
        a = results["faiss"] if row["faiss_extrapolated"] or both_full else results["faiss"][sample]
        b = results["numpy"] if row["numpy_extrapolated"] or both_full else results["numpy"][sample]
        row.update(knn_agreement(x, q_idx, a, b), compared_queries=int(len(q_idx)),
                   ratio=row["numpy_s"] / row["faiss_s"], ratio_cpu=row["numpy_cpu_s"] / row["faiss_cpu_s"])
        rows.append(row)
        del x
    growth = {"faiss_exponent": growth_exponent([r["n"] for r in rows], [r["faiss_s"] for r in rows]),
              "numpy_exponent": growth_exponent([r["n"] for r in rows], [r["numpy_s"] for r in rows])}

    def sec(r, m):
        return f"{fmt(r[m + '_s'])}*" if r[m + "_extrapolated"] else r[m + "_s"]

    print_table(f"3. kNN graph, k={k}, {args.dim}-d L2-normalised synthetic vectors, exact inner product: "
                f"faiss {'GPU' if gpu else 'CPU'} (leave_one_out_neighbours) vs numpy (chunked matmul + argpartition)",
                ["N", "faiss s", "numpy s", "ratio", "cpu ratio", "recall", "tie-aware", "queries checked"],
                [[r["n"], sec(r, "faiss"), sec(r, "numpy"), r["ratio"], r["ratio_cpu"], r["recall"], r["recall_tie_aware"],
                  r["compared_queries"]] for r in rows],
                [f"ratio = numpy s / faiss s; growth exponent: faiss {growth['faiss_exponent']}, "
                 f"numpy {growth['numpy_exponent']}",
                 "recall = share of numpy's k neighbours that faiss also returns (1 = the same graph)"]
                + ([f"* timed on {args.knn_sample} random queries against all N and scaled by N/{args.knn_sample} "
                    f"(its full run was estimated, quadratically in N, above --budget-s {args.budget_s:.0f})"]
                   if any(r["faiss_extrapolated"] or r["numpy_extrapolated"] for r in rows) else []))
    return {"dim": args.dim, "k": k, "faiss_gpu": gpu, "budget_s": args.budget_s, "sample_queries": args.knn_sample,
            "rows": rows, "growth": growth}


# --------------------------------------------------------------------------- 4. training steps


def _runner(step, batches, params, lr: float, weight_decay: float, steps: int):
    """One training step per call on the next batch: AdamW + the warm-up/cosine schedule."""
    from grappa.core.training import train_on_batch, warmup_cosine

    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    scheduler = warmup_cosine(optimizer, steps, 1)
    it = iter(batches)
    return lambda: train_on_batch(step, next(it), optimizer, scheduler)


class TrainingBench:
    """What every timed training step shares: the backbone, the batch size, the pipeline's params.
    A *runner* is one step kind ready to run: (call = one optimisation step, adaptor sets, inputs per step)."""

    def __init__(self, args, dev: str):
        self.args, self.dev = args, dev
        self.hp_a, self.hp_f = args._params.adaptor, args._params.fusion
        self.bp = BackboneParams(name=args.backbone, weights=args.weights, image_size=args.image_size,
                                 adapt_from_block=args.adapt_from_block)
        self.backbone, _, _ = create_backbone(self.bp)
        self.backbone.to(dev)
        self.b, self.g = args.train_batch, torch.Generator().manual_seed(0)
        self.k_cls = max(args.ks)
        m = args.fusion_m
        self.fks = args.ks[:m] if len(args.ks) >= m else [2 ** (i + 3) for i in range(m)]

    def prefix_array(self, start: int, n: int) -> np.ndarray:
        shape = self.backbone.block_shapes[start - 1]
        return np.random.default_rng(0).standard_normal((n, *shape), dtype=np.float32).astype(np.float16)

    def adaptor_runner(self, start: int, timed: int, chunk: int | None):
        from functools import partial

        from grappa.core.losses import CosineClassifier
        from grappa.core.objectives import adaptor_objective
        from grappa.core.samplers import NeighbourPairs
        from grappa.core.training import adaptor_step
        from grappa.io.datasets import PrefixDataset
        from pipeline_steps.train_adaptor import epoch_batches

        hp_a, b, k_cls = self.hp_a, self.b, self.k_cls
        model = GrappaModel(self.backbone, start, [k_cls], self.args.reduction).to(self.dev)
        model.cpu_chunk = chunk
        n = b * (timed + 1)
        # pseudo-labels in groups of images_per_cluster, so AP terms find positives in every batch
        targets = torch.arange(n) // hp_a.images_per_cluster % k_cls
        classifier = CosineClassifier(torch.randn(k_cls, self.backbone.embed_dim), hp_a.temperature).to(self.dev)
        objective = adaptor_objective(hp_a, classifier, targets.to(self.dev))
        two_views = objective.ranks_batch and hp_a.ap_positives == "augmentation"
        if start > 0:  # the CPU recipe: cached float16 prefix activations, batched as the step batches them
            dataset = PrefixDataset(self.prefix_array(start, n))
            dataset = NeighbourPairs(dataset, np.arange(n)[:, None]) if two_views else dataset
            batches = epoch_batches(dataset, targets.numpy(), b, hp_a, objective.ranks_batch and not two_views, self.g)
        else:  # the paper's placement: transformed image tensors (decode/augment not counted: a lower bound)
            views = (b, 2) if two_views else (b,)
            images = torch.randn(*views, 3, self.args.image_size, self.args.image_size, generator=self.g)
            batches = [(torch.arange(b), images, [])] * (timed + 1)
        step = partial(adaptor_step, model, objective, single(k_cls), self.dev, images=start == 0, two_views=two_views,
                       augment_scale=hp_a.prefix_augment_scale)
        model.train()
        params = [{"params": model.adaptors.parameters()},
                  {"params": classifier.parameters(), "lr": hp_a.classifier_lr}]
        run = _runner(step, batches, params, hp_a.lr, hp_a.weight_decay, timed + 1)
        return run, 1, b * (2 if two_views else 1)

    def fusion_runner(self, start: int, timed: int, chunk: int | None):
        """The shipped propagation: batches of anchor/neighbour pairs, or of anchors alone with the bank."""
        from functools import partial

        from grappa.core.losses import AttentionBank, CosineClassifier
        from grappa.core.objectives import fusion_objective
        from grappa.core.samplers import NeighbourPairs
        from grappa.core.training import fusion_step
        from grappa.io.datasets import PrefixDataset, loader

        hp_a, hp_f, b, g = self.hp_a, self.hp_f, self.b, self.g
        model = GrappaModel(self.backbone, start, self.fks, self.args.reduction, attn_dim=self.args.attn_dim).to(self.dev)
        model.cpu_chunk = chunk
        model.requires_grad_(False)
        model.fusion.requires_grad_(True)
        n = b * (timed + 1)
        neighbours = np.random.default_rng(1).integers(0, n, (n, 10))
        heads = [(CosineClassifier(torch.randn(k, self.backbone.embed_dim, generator=g), hp_a.temperature)
                  .requires_grad_(False).to(self.dev), torch.randint(0, k, (n,), generator=g).to(self.dev))
                 for k in self.fks]
        pairs = hp_f.propagation == "pairs"
        bank = None if pairs else AttentionBank(torch.from_numpy(neighbours), len(model.fusion), len(self.fks),
                                                hp_f.bank_momentum, hp_f.bank_sharpen).to(self.dev)
        if start > 0:
            dataset = PrefixDataset(self.prefix_array(start, n))
            batches = loader(NeighbourPairs(dataset, neighbours) if pairs else dataset, b, shuffle=True,
                             generator=g, drop_last=True)
        else:
            images = torch.randn(b, *((2,) if pairs else ()), 3, self.args.image_size, self.args.image_size, generator=g)
            batches = [(torch.arange(b), images, [])] * (timed + 1)
        step = partial(fusion_step, model, fusion_objective(hp_f, model.fusion, heads, bank), self.dev,
                       images=start == 0, pairs=pairs)
        model.train()
        run = _runner(step, batches, list(model.fusion.parameters()), hp_f.lr, hp_f.weight_decay, timed + 1)
        return run, len(self.fks), (2 if pairs else 1) * b

    def interleaved(self, entries: list[tuple[str, int, int, int | None]]) -> list[tuple[list, int, int]]:
        """Per planned step kind: (wall, cpu) seconds of each timed step after one warm-up step, adaptor
        sets, inputs per step. The kinds take turns, one step each, so a load that comes and goes during
        the run hits them all alike."""
        built = [(self.adaptor_runner if kind == "adaptor" else self.fusion_runner)(s, timed, chunk)
                 for kind, s, timed, chunk in entries]
        for run, _, _ in built:
            run()
        times: list[list[tuple[float, float]]] = [[] for _ in entries]
        for i in range(max(timed for _, _, timed, _ in entries)):
            for (run, _, _), (_, _, timed, _), out in zip(built, entries, times):
                if i < timed:
                    with Clock(self.dev) as c:
                        run()
                    out.append((c.wall, c.cpu))
        return [(out, sets, inputs) for out, (_, sets, inputs) in zip(times, built)]


def training_rows(bench: TrainingBench, timings: dict, order: list) -> list[dict]:
    """One table row per timed step kind, in ``order``."""
    rows = []
    for entry in order:
        (kind, s, timed, chunk), (steps, sets, inputs) = entry, timings[entry]
        walls, cpus = [w for w, _ in steps], [c for _, c in steps]
        name = f"{kind} {'cpu-recipe (cached prefix)' if s > 0 else 'paper (all blocks, image tensors)'}"
        rows.append({"name": name + ("" if chunk else ", whole batch"), "stage": kind, "adapt_from_block": s,
                     "adapted_blocks": len(bench.backbone.blocks) - s, "adaptor_sets": sets, "batch": bench.b,
                     "inputs_per_step": inputs, "chunk": chunk, "timed_steps": timed,
                     "objective": (bench.hp_f if kind == "fusion" else bench.hp_a).objective,
                     "s_per_step": float(np.mean(walls)), "cpu_s_per_step": float(np.mean(cpus)),
                     "s_per_step_median": float(np.median(walls)), "s_steps": walls})
    return rows


def bench_training(args, dev: str) -> dict:
    """The pipeline's own batch steps (grappa.core.training) on the objectives params.yaml ships: the
    step kinds built, timed (interleaved), tabulated, then compared as ratios."""
    bench = TrainingBench(args, dev)
    hp_a, hp_f, b, backbone, fks = bench.hp_a, bench.hp_f, bench.b, bench.backbone, bench.fks
    start = bench.bp.adapt_from_block
    # The shipped model forwards CPU batches in chunks of CPU_CHUNK images; the whole-batch rows are
    # the same steps without it. The cached-prefix steps are timed interleaved; the paper ones after.
    recipe = [("adaptor", start, args.train_steps, CPU_CHUNK), ("adaptor", start, args.train_steps, None),
              ("fusion", start, args.train_steps, CPU_CHUNK), ("fusion", start, args.train_steps, None)]
    paper = [("adaptor", 0, args.paper_steps, CPU_CHUNK)] + ([("fusion", 0, args.paper_steps, CPU_CHUNK)]
                                                            if args.fusion_paper else [])
    timings = dict(zip(recipe, bench.interleaved(recipe)))
    for entry in paper:
        timings[entry] = bench.interleaved([entry])[0]
    rows = training_rows(bench, timings, recipe[:2] + paper[:1] + recipe[2:] + paper[1:])

    def paired(num, den) -> float:
        """Median over the rounds of num's step time / den's in the same round (interleaved rows)."""
        return float(np.median([n[0] / d[0] for n, d in zip(timings[num][0], timings[den][0])]))

    def mean_ratio(num, den, key: str = "s_per_step") -> float:
        by = {(r["stage"], r["adapt_from_block"] > 0, r["chunk"]): r[key] for r in rows}
        return by[num] / by[den]

    shipped = CPU_CHUNK
    a_chunk, a_whole, f_chunk, f_whole = recipe
    ratios = {"adaptor_paper_vs_cpu_recipe": mean_ratio(("adaptor", False, shipped), ("adaptor", True, shipped)),
              "adaptor_paper_vs_cpu_recipe_cpu": mean_ratio(("adaptor", False, shipped), ("adaptor", True, shipped),
                                                            "cpu_s_per_step"),
              "fusion_vs_adaptor_batch": paired(f_chunk, a_chunk),
              "fusion_whole_vs_chunked": paired(f_whole, f_chunk),
              "adaptor_whole_vs_chunked": paired(a_whole, a_chunk)}
    if args.fusion_paper:
        ratios["fusion_paper_vs_cpu_recipe"] = mean_ratio(("fusion", False, shipped), ("fusion", True, shipped))
        ratios["fusion_paper_vs_cpu_recipe_cpu"] = mean_ratio(("fusion", False, shipped), ("fusion", True, shipped),
                                                              "cpu_s_per_step")
    print_table(f"4. training step time, batch {b}, {args.backbone} ({len(backbone.blocks)} blocks), {dev}",
                ["step", "from block", "sets", "inputs", "s/step", "median s", "cpu s/step"],
                [[r["name"], r["adapt_from_block"], r["adaptor_sets"], r["inputs_per_step"], r["s_per_step"],
                  r["s_per_step_median"], r["cpu_s_per_step"]] for r in rows],
                [", ".join(f"{k} = {v:.2f}x" for k, v in ratios.items()),
                 f"fusion_vs_adaptor_batch = a fusion batch / an adaptor batch at the same B = {b}, as shipped "
                 f"(chunks of {shipped}): the median over {args.train_steps} rounds of the two steps timed back to "
                 "back (the cached-prefix rows take turns, one step each); *_whole_vs_chunked likewise",
                 (f"fusion: a batch is B anchor/neighbour pairs = 2B inputs" if hp_f.propagation == "pairs" else
                  "fusion: a batch is B anchors (propagation from the attention bank)")
                 + f" through M = {len(fks)} adaptor sets (k = {fks}) and as many frozen classifiers",
                 f"the pipeline's own steps and objectives (from {args.params}): adaptor {hp_a.objective}, "
                 f"fusion {hp_f.objective} + attention propagation and value regulariser"])
    return {"backbone": args.backbone, "blocks": len(backbone.blocks), "batch": b, "rows": rows, "ratios": ratios,
            "objectives": {"adaptor": hp_a.objective, "fusion": hp_f.objective}}


# --------------------------------------------------------------------------- 5. pipeline wall time


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def timings_from_outputs(out_dir: Path) -> dict[str, float]:
    """Seconds per stage run (``extract@0-of-2``, ``train_adaptor@64``) from the step reports of a
    finished run: each records its own ``timings_s.total``."""
    from grappa import registry

    steps: dict[str, float] = {}
    for step in registry.STEPS:
        # the report template as a pattern whose group is the item: adaptors/k(?P<item>\d+)/report\.json
        pattern = re.escape(step.report).replace(r"\{k\}", r"(?P<item>\d+)").replace(r"\{shard\}", r"(?P<item>[^/]+)")
        for path in sorted(out_dir.glob(step.report.format(k="*", shard="*"))):
            item = re.fullmatch(pattern, path.relative_to(out_dir).as_posix())["item"] if step.mapped else None
            total = ((_read_json(path) or {}).get("timings_s") or {}).get("total")
            if total is not None:
                steps[step.stage if item is None else f"{step.stage}@{item}"] = float(total)
    return steps


def parse_timings_file(path: Path) -> dict[str, float]:
    """A JSON {step: seconds} / {"timings_s": {...}}, or a log with grappa run's 'step timings (s): a=1.0, ...'."""
    data = _read_json(path)
    if isinstance(data, dict):
        data = data.get("timings_s", data.get("steps", data))
        return {str(k): float(v) for k, v in data.items() if isinstance(v, (int, float))}
    line = [ln for ln in path.read_text(errors="replace").splitlines() if "step timings (s):" in ln]
    if not line:
        return {}
    pairs = line[-1].split("step timings (s):", 1)[1].split(",")
    return {k.strip(): float(v) for k, _, v in (p.partition("=") for p in pairs) if v.strip()}


def pipeline_timings(args) -> dict:
    source, steps = None, {}
    if args.pipeline_timings:
        path = Path(args.pipeline_timings)
        steps = timings_from_outputs(path) if path.is_dir() else parse_timings_file(path)
        source = str(path)
    else:
        try:
            out_dir = Path(load_params(REPO / "params.yaml").out_dir)
        except Exception:
            out_dir = Path("outputs")
        out_dir = out_dir if out_dir.is_absolute() else REPO / out_dir
        if (out_dir / "evaluate" / "report.json").exists():
            steps = timings_from_outputs(out_dir)
            source = str(out_dir) + "/*/report.json"
    total = float(sum(steps.values())) if steps else None
    if steps:
        print_table(f"5. end-to-end pipeline (read from {source})", ["step", "s"],
                    [[k, v] for k, v in steps.items()] + [["total", total]],
                    ["sum of the steps' own timings (model loading and process start-up partly excluded)"])
    else:
        print("\n== 5. end-to-end pipeline: not available (no outputs/evaluate/report.json; "
              "run `grappa run` first or pass --pipeline-timings PATH)")
    return {"source": source, "steps_s": steps, "total_s": total}


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    preset = p.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true", help="tiny sizes + random-init test_efficientnet (tests)")
    preset.add_argument("--full", action="store_true", help="larger sizes (GPU / many cores)")
    p.add_argument("--only", nargs="+", choices=["extract", "kmeans", "knn", "train", "pipeline"],
                   help="run only these measurements")
    p.add_argument("--images", default=DEFAULT_IMAGES, help="glob of image folders (searched recursively)")
    p.add_argument("--out-dir", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--device-name", help="override the detected device name used in the file name")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="where adapt_from_block, ks etc. come from")
    p.add_argument("--pipeline-timings", help="JSON/log with step timings, or an outputs/ folder")
    p.add_argument("--note", default="", help="free text stored in the JSON (e.g. 'machine busy')")
    for name, typ in [("extract-sizes", int), ("kmeans-sizes", int), ("knn-sizes", int)]:
        p.add_argument(f"--{name}", type=typ, nargs="+")
    for name, typ in [("kmeans-k", int), ("niter", int), ("dim", int), ("knn-k", int), ("budget-s", float),
                      ("knn-sample", int), ("train-batch", int), ("train-steps", int), ("paper-steps", int),
                      ("fusion-m", int), ("repeats", int), ("backbone", str), ("weights", str), ("image-size", int),
                      ("adapt-from-block", int), ("extract-batch", int), ("num-workers", int)]:
        p.add_argument(f"--{name}", type=typ)
    p.add_argument("--sklearn-init", default="random", choices=["random", "k-means++"],
                   help="random = the same init as faiss (default); k-means++ = sklearn's default (much slower)")
    p.add_argument("--fusion-paper", action="store_true", help="also time fusion through every block (slow on CPU)")
    return p


def resolve_args(argv=None) -> argparse.Namespace:
    args = build_parser().parse_args(argv)
    args.preset = "quick" if args.quick else "full" if args.full else "default"
    for key, value in PRESETS[args.preset].items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    params = load_params(args.params)
    args._params = params  # the shipped recipe the training steps are timed with (not stored in the JSON)
    if args.quick:
        defaults = dict(backbone="test_efficientnet", weights="none", image_size=48, adapt_from_block=3,
                        extract_batch=4, num_workers=0)
    else:
        defaults = dict(backbone=params.backbone.name, weights=params.backbone.weights,
                        image_size=params.backbone.image_size, adapt_from_block=params.backbone.adapt_from_block,
                        extract_batch=params.extract.batch_size, num_workers=params.extract.num_workers)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.ks, args.reduction, args.attn_dim = params.cluster.ks, params.adaptor.reduction, params.fusion.attn_dim
    if args.full:
        args.fusion_paper = True
    return args


SECTIONS = {"extract": "extraction", "kmeans": "kmeans", "knn": "knn", "train": "training", "pipeline": "pipeline"}


def keep_other_sections(previous: dict, result: dict, only: set[str]) -> dict:
    """``--only``: the sections just measured replace theirs in the existing JSON; the others, and
    the run that made each (``runs``), are kept."""
    runs = previous.get("runs") or {SECTIONS[k]: {key: previous.get(key) for key in ("created_utc", "note", "args")}
                                    for k in SECTIONS if SECTIONS[k] in previous}
    merged = {**previous, **result}
    for key in SECTIONS.values():
        if key in previous and key not in result:
            merged[key] = previous[key]
    merged["runs"] = {**runs, **{SECTIONS[k]: {key: result[key] for key in ("created_utc", "note", "args")}
                                 for k in only}}
    return merged


def main(argv=None) -> dict:
    args = resolve_args(argv)
    info = device_info()
    name = args.device_name or info["name"]
    dev = info["torch_device"]
    torch.manual_seed(0)
    only = set(args.only or ["extract", "kmeans", "knn", "train", "pipeline"])
    print(f"speed benchmark: preset {args.preset}, device {name} ({info['cpu_cores']} cores, torch {dev}, "
          f"{info['torch_threads']} torch threads, faiss GPUs {info['faiss_gpus']})", flush=True)
    t_start = time.perf_counter()
    result = {"schema_version": SCHEMA_VERSION, "device": name, "preset": args.preset,
              "created_utc": datetime.now(timezone.utc).isoformat(timespec="seconds"), "host": info,
              "note": args.note, "args": {k: v for k, v in vars(args).items() if not k.startswith("_")},
              "ratio_convention": "ratio = baseline time / our time (> 1: the pipeline's way is faster)"}
    if "extract" in only:
        result["extraction"] = bench_extraction(args, dev)
    if "kmeans" in only:
        result["kmeans"] = bench_kmeans(args, info)
    if "knn" in only:
        result["knn"] = bench_knn(args, info)
    if "train" in only:
        result["training"] = bench_training(args, dev)
    if "pipeline" in only:
        result["pipeline"] = pipeline_timings(args)
    result["benchmark_wall_s"] = time.perf_counter() - t_start
    out = Path(args.out_dir) / f"speed_{name}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.only and out.is_file():
        result = keep_other_sections(json.loads(out.read_text()), result, only)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
    tmp.replace(out)
    print(f"\nwrote {out} ({result['benchmark_wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
