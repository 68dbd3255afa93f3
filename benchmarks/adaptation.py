"""Adaptation experiments: which stage-1 recipe and fusion variant make adaptation pay, chosen on validation.

    python -m benchmarks.adaptation screen --recipe e20 --variants baseline cosine   # train + score, resumable
    python -m benchmarks.adaptation diagnose --recipe e5                             # step 0: no training
    python -m benchmarks.adaptation report                                          # the screening table
    python -m benchmarks.adaptation final --recipe e20 --variant route --seeds 0 1 2 # the test classes

A *recipe* (``RECIPES``) is a set of stage-1 overrides; its adaptor sets are trained once, into
``outputs/bench/adaptation/<recipe>/seed<S>``. A *variant* (``VARIANTS``) is a set of fusion overrides
trained on those adaptors, in ``.../variants/<variant>`` (stage-1 folders linked, not copied).
``screen`` appends one JSON line per finished row to ``results/adaptation_screen.jsonl``: the recipe's
reference rows (zero_shot, every single k, uniform, oracle_val) once, then one ``grappa:<variant>`` row per
variant, each with its validation-class metrics per domain, routing metrics and seconds; a row already
in the file is skipped, so a killed screen resumes where it stopped. The per-query AP@R of every row is
kept beside it (``ap/<row>.npy``) for ``report``'s paired class-bootstrap intervals. Only the
validation classes of ``query_db`` are ever scored by ``screen``: this is where choices are made.
``final`` reports the chosen recipe and variant on the test classes over seeds, through the evaluate
step in each seed's variant folder (stage 1 and the fusion reused where ``screen`` trained them), into
``results/adaptation_final_<recipe>_<variant>.{json,md}`` and the attention plot of the first seed.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from grappa.cli import _parse_set, run_all, run_step
from grappa.config import Params, load_params
from grappa.core.augment import augment_feature_maps
from grappa.core.backbones import create_backbone
from grappa.core.evaluation import (ORACLE, VALIDATION, TEST, best_k, markdown_table, oracle, per_domain_metrics,
                                    per_domain_queries, routing_metrics, split_mask)
from grappa.core.losses import CosineClassifier
from grappa.core.model import FUSION, UNIFORM, ZERO_SHOT, GrappaModel, image_pool, pick_device, single
from grappa.io.artifacts import load_torch, read_json, write_json, write_text
from grappa.io.assemble import assemble
from grappa.io.datasets import encode, load_inputs, loader
from grappa.io.layout import FUSION_REPORT, layout
from grappa.io.pseudo_labels import pseudo_labels_for
from grappa.io.scoring import validation_classes

from .quality import FULL_DATA, RESULTS, render, summary

SCREEN = RESULTS / "adaptation_screen.jsonl"
OUTPUTS = Path("outputs/bench/adaptation")
STAGE1_FOLDERS = ("snapshot", "extract", "cluster", "adaptors")

# stage-1 recipes: params overrides on top of params.yaml (all images, every domain), spelt out in
# full so that a row of the results file keeps its meaning when params.yaml moves on
OLD_LADDER = [64, 256, 1024]
RECIPES: dict[str, dict] = {
    "e5": {"adaptor.epochs": 5, "cluster.ks": OLD_LADDER},  # params.yaml as shipped before this search
    "e20": {"adaptor.epochs": 20, "cluster.ks": OLD_LADDER},
    # after e20's screen: its k=64 set scored below zero-shot on every domain, k=1024 best on every one
    "e20_fine": {"adaptor.epochs": 20, "cluster.ks": [256, 1024, 2048]},
}
# fusion variants: params overrides on top of a recipe
ROUTE = {"fusion.attention": "cosine", "fusion.value": "identity", "fusion.qk_lr": 0.01}  # attention that can route
BASELINE = {"fusion.attention": "bilinear", "fusion.value": "linear", "fusion.qk_lr": None, "fusion.augment_scale": 1.0,
            "fusion.lambda_mi": 0.0, "fusion.level_norm": False}  # the fusion shipped before this search
VARIANTS: dict[str, dict] = {
    "baseline": BASELINE,
    "scale4": {**BASELINE, "fusion.attention_scale": 4.0},
    "cosine": {**BASELINE, "fusion.attention": "cosine"},
    "identity": {**BASELINE, "fusion.value": "identity"},
    "route": {**BASELINE, **ROUTE},
    # a per-image signal: pseudo-labels not read off the very features they came from
    "route_aug": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5},
    "route_aug_norm": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.level_norm": True},
    "route_aug_mi": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.lambda_mi": 0.1},
    "route_aug_bank": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.propagation": "bank"},
    "route_aug_bank_mi": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.propagation": "bank",
                          "fusion.lambda_mi": 0.1},
    # the bank halves a fusion step: twice the epochs for the time of route_aug; a sharper target
    "route_aug_bank_e10": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.propagation": "bank",
                           "fusion.epochs": 10},
    "route_aug_bank_sharp": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.propagation": "bank",
                             "fusion.bank_sharpen": 0.25, "fusion.lambda_prop": 3.0},
    "route_all": {**BASELINE, **ROUTE, "fusion.augment_scale": 0.5, "fusion.level_norm": True, "fusion.lambda_mi": 0.1},
}


def recipe_params(args, recipe: str, seed: int, variant: str | None = None) -> Params:
    out = args.out / recipe / f"seed{seed}"
    overrides = {**FULL_DATA, **RECIPES[recipe], **_parse_set(args.set), "seed": seed, "out_dir": str(out)}
    if variant is not None:
        overrides.update({**VARIANTS[variant], "out_dir": str(out / "variants" / variant)})
    return load_params(args.params, overrides)


def stage1(params: Params) -> None:
    """Snapshot, extract (the content-hash cache makes a repeat cheap), cluster, and every adaptor set
    not already trained."""
    run_all(params, until="merge-features")
    if not all(layout(params).pseudo_labels(k).exists() for k in params.cluster.ks):
        run_step("cluster", params)
    for k in params.cluster.ks:
        if not layout(params).adaptor(k).exists():
            run_step("train-adaptor", params, k)


def link_stage1(recipe_out: Path, variant_out: Path) -> None:
    """The variant's folder sees the recipe's stage-1 outputs (relative links; the fusion writes its own)."""
    variant_out.mkdir(parents=True, exist_ok=True)
    for name in STAGE1_FOLDERS:
        link = variant_out / name
        if not link.exists():
            link.symlink_to(os.path.relpath(recipe_out / name, variant_out))


class Screen:
    """The results file: which rows are done, and appending a finished one."""

    def __init__(self, path: Path):
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []

    def done(self, recipe: str, seed: int, name: str) -> bool:
        return any((r["recipe"], r["seed"], r["row"]) == (recipe, seed, name) for r in self.rows)

    def add(self, row: dict) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows.append(row)


class QueryDb:
    """query_db of one params file, with the rows of its validation and test classes."""

    def __init__(self, params: Params, preprocess):
        inputs = load_inputs(layout(params), "query_db", preprocess, train=False,
                             min_side=params.data.min_side, max_pixels=params.data.max_pixels)
        labels = inputs.labels.astype(str)
        self.val_classes = validation_classes(params, inputs.domains, labels)
        self.mask = {split: split_mask(inputs.domains, labels, self.val_classes, split) for split in (VALIDATION, TEST)}
        self.dataset, self.domains, self.labels = inputs.dataset, inputs.domains, labels

    def encode(self, model: GrappaModel, mode: str, batch_size: int) -> tuple[np.ndarray, np.ndarray | None]:
        return encode(model, self.dataset, mode, batch_size, desc=mode)

    def split(self, name: str, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        rows = self.mask[name]
        return vectors[rows], self.domains[rows], self.labels[rows]


def screen(args) -> int:
    results = Screen(args.results)
    for seed in args.seeds:
        params = recipe_params(args, args.recipe, seed)
        recipe_out = Path(params.out_dir)
        ap_dir = recipe_out / "ap"
        ap_dir.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        stage1(params)
        backbone, preprocess, _ = create_backbone(params.backbone)
        qdb = QueryDb(params, preprocess)
        val_domains, val_labels = qdb.domains[qdb.mask[VALIDATION]], qdb.labels[qdb.mask[VALIDATION]]
        np.savez(ap_dir / "_rows.npz", domains=val_domains, labels=val_labels)

        def record(name: str, vectors: np.ndarray, seconds: float, **extra) -> dict:
            metrics, ap, valid = per_domain_queries(*qdb.split(VALIDATION, vectors))
            np.save(ap_dir / f"{name}.npy", np.where(valid, ap, np.nan))
            row = {"recipe": args.recipe, "seed": seed, "row": name, "overrides": RECIPES[args.recipe],
                   "val": metrics, "seconds": round(seconds, 1), **extra}
            results.add(row)
            print(f"[{args.recipe} seed {seed}] {name}: val mAP@R {100 * metrics['mean']['map_at_r']:.2f}")
            return row

        references = [ZERO_SHOT, *(single(k) for k in params.cluster.ks), UNIFORM]
        if not all(results.done(args.recipe, seed, name) for name in [*references, ORACLE]):
            model = assemble(params, backbone, with_fusion=False, load_fusion=False).to(pick_device())
            singles = {}
            for name in references:
                vectors, _ = qdb.encode(model, name, params.evaluate.batch_size)
                singles[name] = per_domain_metrics(*qdb.split(VALIDATION, vectors))
                if not results.done(args.recipe, seed, name):
                    record(name, vectors, time.perf_counter() - t0)
            if not results.done(args.recipe, seed, ORACLE):  # per domain the single k best on validation
                choice = best_k(singles, params.cluster.ks)
                ap = np.full(len(val_labels), np.nan)
                for d, k in choice.items():
                    rows = val_domains == d
                    ap[rows] = np.load(ap_dir / f"{single(k)}.npy")[rows]
                np.save(ap_dir / f"{ORACLE}.npy", ap)
                results.add({"recipe": args.recipe, "seed": seed, "row": ORACLE, "choice": choice,
                             "val": oracle(singles, choice), "seconds": 0.0})
        for variant in args.variants:
            name = f"{FUSION}:{variant}"
            if results.done(args.recipe, seed, name):
                print(f"[{args.recipe} seed {seed}] {name}: already in {args.results.name}")
                continue
            vparams = recipe_params(args, args.recipe, seed, variant)
            link_stage1(recipe_out, Path(vparams.out_dir))
            t1 = time.perf_counter()
            done = layout(vparams).path(FUSION_REPORT)  # trained before the scoring was cut short: reused
            report = read_json(done) if done.exists() else run_step("train-fusion", vparams)
            model = assemble(vparams, backbone, with_fusion=True, load_fusion=True).to(pick_device())
            vectors, alpha = qdb.encode(model, FUSION, params.evaluate.batch_size)
            rows = qdb.mask[VALIDATION]
            blocks = list(range(model.start, model.start + alpha.shape[1]))
            by_domain = {d: alpha[rows][val_domains == d].mean(0).round(4).tolist() for d in sorted(set(val_domains))}
            record(name, vectors, time.perf_counter() - t1, variant=VARIANTS[variant],
                   routing=routing_metrics(alpha[rows], val_domains, blocks), attention_by_domain=by_domain,
                   fusion_final=report["final"])
    return 0


def final(args) -> int:
    """The chosen recipe and variant on the test classes, seed after seed (a seed whose evaluate
    already ran in its variant folder is read back, so a killed run resumes)."""
    import shutil

    name = f"adaptation_final_{args.recipe}_{args.variant}"
    previous = args.results.parent / f"{name}.json"
    # a seed read back keeps the seconds it took when it ran (reading it back takes none)
    earlier = read_json(previous).get("timings_s", {}) if previous.exists() else {}
    per_seed, timings = [], {}
    for seed in args.seeds:
        params, vparams = recipe_params(args, args.recipe, seed), recipe_params(args, args.recipe, seed, args.variant)
        link_stage1(Path(params.out_dir), Path(vparams.out_dir))
        t0 = time.perf_counter()
        ran = not layout(vparams).metrics.exists()
        if ran:
            stage1(params)
            if not layout(vparams).path(FUSION_REPORT).exists():
                run_step("train-fusion", vparams)
            run_step("evaluate", vparams)
        per_seed.append(read_json(layout(vparams).metrics))
        # read back with no record of its run: not measured here (None), never the read's own 0 s
        timings[f"seed{seed}"] = ({"total": time.perf_counter() - t0} if ran
                                  else earlier.get(f"seed{seed}", {"total": None}))
        results = summary(per_seed, args.seeds[:len(per_seed)], timings, vparams)
        results["recipe"], results["variant"] = {args.recipe: RECIPES[args.recipe]}, {args.variant: VARIANTS[args.variant]}
        write_json(args.results.parent / f"{name}.json", results)
        write_text(args.results.parent / f"{name}.md", render(results))
        if len(per_seed) == 1:
            shutil.copyfile(layout(vparams).plots / "attention_by_domain.png",
                            args.results.parent / f"{name}_attention_seed{seed}.png")
    print(render(results))
    return 0


# ------------------------------------------------------------------------------------------ diagnostics


@torch.inference_mode()
def mixture_embeddings(model: GrappaModel, dataset, weights: list[float], batch_size: int) -> np.ndarray:
    """Embeddings with a fixed attention ``weights`` over the adaptor sets in every block."""
    model.eval()
    device = next(model.parameters()).device
    sets = [model.adaptor_set(k) for k in model.ks]
    out = np.zeros((len(dataset), model.backbone.embed_dim), np.float32)
    for rows, x, _ in loader(dataset, batch_size):
        x = model._layout(x.to(device))
        for i, block in enumerate(model.backbone.blocks[model.start:]):
            h = block(x)
            x = h + sum(w * adaptors[i](h) for w, adaptors in zip(weights, sets) if w)
        out[rows.numpy()] = torch.nn.functional.normalize(model.backbone.embed(x), dim=-1).cpu().numpy()
    return out


def simplex_grid(m: int) -> dict[str, list[float]]:
    """The corners, the edge midpoints and the centre of the (m-1)-simplex."""
    points = {}
    for i in range(m):
        points[f"e{i}"] = [float(j == i) for j in range(m)]
    for i in range(m):
        for j in range(i + 1, m):
            points[f"e{i}+e{j}"] = [0.5 if t in (i, j) else 0.0 for t in range(m)]
    points["centre"] = [1.0 / m] * m
    return points


def headroom(params: Params, model: GrappaModel, qdb: QueryDb) -> dict:
    """Step 0 (a): per domain, fixed attention mixtures on validation; the val-chosen mixture on test."""
    ks = params.cluster.ks
    points = simplex_grid(len(ks))
    scores = {}
    for name, weights in points.items():
        vectors = mixture_embeddings(model, qdb.dataset, weights, params.evaluate.batch_size)
        scores[name] = {split: per_domain_metrics(*qdb.split(split, vectors)) for split in (VALIDATION, TEST)}
        print(f"mixture {name} {weights}: val {100 * scores[name][VALIDATION]['mean']['map_at_r']:.2f}")
    domains = sorted(scores["centre"][VALIDATION]["per_domain"])

    def val(name, d):
        return scores[name][VALIDATION]["per_domain"][d]["map_at_r"]

    corners = [f"e{i}" for i in range(len(ks))]
    best_single = {d: max(corners, key=lambda n: val(n, d)) for d in domains}
    best_mix = {d: max(points, key=lambda n: val(n, d)) for d in domains}
    summary = {}
    for split in (VALIDATION, TEST):
        single_mean = np.mean([scores[best_single[d]][split]["per_domain"][d]["map_at_r"] for d in domains])
        mix_mean = np.mean([scores[best_mix[d]][split]["per_domain"][d]["map_at_r"] for d in domains])
        summary[split] = {"best_single_per_domain": float(single_mean), "best_mixture_per_domain": float(mix_mean),
                          "gain": float(mix_mean - single_mean)}
    return {"points": {n: dict(zip(map(str, ks), w)) for n, w in points.items()},
            "per_domain_val": {n: {d: val(n, d) for d in domains} for n in points},
            "chosen_on_val": {"single": best_single, "mixture": best_mix}, "summary": summary}


@torch.inference_mode()
def ce_matrix(params: Params, model: GrappaModel, preprocess) -> dict:
    """Step 0 (b): per domain of the unlabeled pool, each level's pseudo-label CE under each single-k
    model (rows) on feature maps jittered as in stage 1 (domains used for this analysis only)."""
    inputs = load_inputs(layout(params), "unlabeled", preprocess, train=True, min_side=params.data.min_side,
                         max_pixels=params.data.max_pixels)
    ks = params.cluster.ks
    heads = []
    for k in ks:
        state = load_torch(layout(params).classifier(k))
        heads.append((CosineClassifier(state["weight"], state["temperature"]), torch.from_numpy(pseudo_labels_for(params, k, inputs.ids))))
    domains = inputs.domains
    out = {}
    for mode in [*(single(k) for k in ks), UNIFORM]:
        torch.manual_seed(params.seed)
        ce = np.zeros((len(domains), len(ks)))
        for rows, x, _ in loader(inputs.dataset, params.evaluate.batch_size):
            x = augment_feature_maps(x, params.adaptor.prefix_augment_scale) if params.adaptor.prefix_augment_scale < 1 else x
            emb, _ = model.forward_suffix(x, mode)
            for j, (head, labels) in enumerate(heads):
                ce[rows.numpy(), j] = torch.nn.functional.cross_entropy(head(emb), labels[rows], reduction="none").numpy()
        out[mode] = {d: dict(zip(map(str, ks), ce[domains == d].mean(0).round(4).tolist())) for d in sorted(set(domains))}
    return out


@torch.inference_mode()
def block_statistics(model: GrappaModel, qdb: QueryDb, batch_size: int) -> dict:
    """Step 0 (c): per adapted block on the validation images, through the fused model: |pool d_m| /
    |pool h|, the cosines between the sets' pooled deltas, and the spread of the attention logits."""
    model.eval()
    sets = [model.adaptor_set(k) for k in model.ks]
    blocks = model.backbone.blocks[model.start:]
    sums = [{"ratio": np.zeros(len(sets)), "cos": np.zeros((len(sets), len(sets))), "spread": 0.0} for _ in blocks]
    count = 0
    weights = model._fusion_weights()
    val_rows = np.flatnonzero(qdb.mask[VALIDATION])
    subset = torch.utils.data.Subset(qdb.dataset, val_rows.tolist())
    for _, x, _ in loader(subset, batch_size):
        x = model._layout(x)
        for i, block in enumerate(blocks):
            h = block(x)
            ph = image_pool(h, model.backbone.layout)
            pd = torch.stack([image_pool(adaptors[i](h), model.backbone.layout) for adaptors in sets], 1)  # (B, M, C)
            sums[i]["ratio"] += (pd.norm(dim=-1) / ph.norm(dim=-1, keepdim=True)).sum(0).numpy()
            unit = torch.nn.functional.normalize(pd, dim=-1)
            sums[i]["cos"] += torch.einsum("bmc,bnc->mn", unit, unit).numpy()
            sums[i]["spread"] += float(model.fusion[i].logits(ph, pd).std(dim=-1).sum())
            pooled = model._pooled_out(i)
            x, _ = model.fusion[i](h, weights[i], pooled=pooled)
        count += len(x)
    return {f"block{model.start + i}": {"delta_norm_ratio": dict(zip(map(str, model.ks), (s["ratio"] / count).round(4).tolist())),
                                        "delta_cosine": (s["cos"] / count).round(3).tolist(),
                                        "logit_std": round(s["spread"] / count, 4)} for i, s in enumerate(sums)}


def diagnose(args) -> int:
    seed = args.seeds[0]
    params = recipe_params(args, args.recipe, seed)
    vparams = recipe_params(args, args.recipe, seed, args.variant)
    backbone, preprocess, _ = create_backbone(params.backbone)
    qdb = QueryDb(params, preprocess)
    model = assemble(vparams, backbone, with_fusion=True, load_fusion=True).to(pick_device())
    result = {"recipe": args.recipe, "variant": args.variant, "seed": seed}
    result["block_statistics"] = block_statistics(model, qdb, params.evaluate.batch_size)
    result["ce_matrix"] = ce_matrix(params, model, preprocess)
    result["headroom"] = headroom(params, model, qdb)
    name = f"adaptation_diagnostics_{args.recipe}_seed{seed}"
    write_json(args.results.parent / f"{name}.json", result)
    write_text(args.results.parent / f"{name}.md", diagnostics_markdown(result, params.cluster.ks))
    print(diagnostics_markdown(result, params.cluster.ks))
    return 0


def diagnostics_markdown(result: dict, ks: list[int]) -> str:
    head = result["headroom"]
    domains = sorted(next(iter(head["per_domain_val"].values())))
    text = [f"# Diagnostics: recipe {result['recipe']}, fusion variant {result['variant']}, seed {result['seed']}\n",
            "Command: `python -m benchmarks.adaptation diagnose --recipe "
            f"{result['recipe']} --variant {result['variant']} --seeds {result['seed']}`\n"]
    rows = [[name, " / ".join(f"{w:g}" for w in head["points"][name].values()),
             *(f"{100 * head['per_domain_val'][name][d]:.2f}" for d in domains),
             f"{100 * np.mean(list(head['per_domain_val'][name].values())):.2f}"] for name in head["per_domain_val"]]
    text.append(markdown_table(f"(a) Fixed attention mixtures over k = {ks} in every block, mAP@R (%) on the validation classes",
                               ["point", "weights", *domains, "mean"], rows))
    rows = [[split, *(f"{100 * v:.2f}" for v in s.values())] for split, s in head["summary"].items()]
    text.append(markdown_table("Per domain the best single set against the best mixture, both chosen on validation "
                               "(the test row scores the validation choice)",
                               ["classes", "best single per domain", "best mixture per domain", "gain"], rows))
    ce = result["ce_matrix"]
    rows = [[d, mode, *(f"{v:.3f}" for v in ce[mode][d].values()), f"{sum(ce[mode][d].values()):.3f}"]
            for d in domains for mode in ce]
    text.append(markdown_table("(b) Pseudo-label cross-entropy of each level (columns) under each model, per domain "
                               "of the unlabeled pool, on jittered feature maps", ["domain", "model", *map(str, ks), "sum"], rows))
    rows = [[block, " / ".join(f"{v:.3f}" for v in s["delta_norm_ratio"].values()),
             ", ".join(f"{s['delta_cosine'][i][j]:.2f}" for i in range(len(ks)) for j in range(i + 1, len(ks))),
             f"{s['logit_std']:.4f}"] for block, s in result["block_statistics"].items()]
    text.append(markdown_table("(c) Per adapted block on the validation images: |pool d_m| / |pool h| per k, cosine "
                               "between the sets' pooled deltas (pairs in k order), std of the fusion logits",
                               ["block", "delta ratio", "delta cosines", "logit std"], rows))
    return "\n".join(text)


# ------------------------------------------------------------------------------------------------ report


def paired_interval(ap_a: np.ndarray, ap_b: np.ndarray, domains: np.ndarray, labels: np.ndarray,
                    draws: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """Mean over domains of the mAP@R difference a - b, and its 95 % interval from resampling each
    domain's classes with replacement (both rows on the same draws: a paired bootstrap)."""
    rng = np.random.default_rng(seed)
    valid = ~np.isnan(ap_a) & ~np.isnan(ap_b)
    diff = np.where(valid, np.nan_to_num(ap_a) - np.nan_to_num(ap_b), 0.0)
    per_domain = []
    for d in sorted(set(domains)):
        rows = domains == d
        _, inverse = np.unique(labels[rows], return_inverse=True)
        sums = np.bincount(inverse, diff[rows])
        counts = np.bincount(inverse, valid[rows].astype(float))
        per_domain.append((sums, counts))
    point = np.mean([s.sum() / c.sum() for s, c in per_domain])
    samples = np.zeros(draws)
    for s, c in per_domain:
        idx = rng.integers(0, len(s), size=(draws, len(s)))
        samples += s[idx].sum(1) / np.maximum(c[idx].sum(1), 1)
    samples /= len(per_domain)
    return float(point), float(np.percentile(samples, 2.5)), float(np.percentile(samples, 97.5))


def report(args) -> int:
    rows = Screen(args.results).rows
    text = ["# Adaptation screening (validation classes, one seed)\n",
            "Made by `python -m benchmarks.adaptation screen --recipe <recipe> --variants ...`; this page by "
            "`python -m benchmarks.adaptation report`. Δ: paired class-bootstrap 95 % intervals (1,000 draws) "
            "against the recipe's best single k and its oracle_val, in mAP@R points.\n"]
    for recipe, seed in sorted({(r["recipe"], r["seed"]) for r in rows}):
        mine = [r for r in rows if (r["recipe"], r["seed"]) == (recipe, seed)]
        ap_dir = args.out / recipe / f"seed{seed}" / "ap"
        named = {r["row"]: r for r in mine}
        singles = [n for n in named if n.startswith("single_k_")]
        best = max(singles, key=lambda n: named[n]["val"]["mean"]["map_at_r"]) if singles else None
        have_ap = (ap_dir / "_rows.npz").exists()
        meta = np.load(ap_dir / "_rows.npz") if have_ap else None
        domains = list(mine[0]["val"]["per_domain"])
        table = []
        for r in mine:
            cells = [r["row"], *(f"{100 * r['val']['per_domain'][d]['map_at_r']:.2f}" for d in domains),
                     f"**{100 * r['val']['mean']['map_at_r']:.2f}**"]
            for ref in (best, ORACLE):
                if have_ap and ref in named and r["row"] != ref and (ap_dir / f"{r['row']}.npy").exists():
                    p, lo, hi = paired_interval(np.load(ap_dir / f"{r['row']}.npy"), np.load(ap_dir / f"{ref}.npy"),
                                                meta["domains"], meta["labels"])
                    cells.append(f"{100 * p:+.2f} [{100 * lo:+.2f}, {100 * hi:+.2f}]")
                else:
                    cells.append("")
            routing = r.get("routing")
            last = routing[max((b for b in routing if b.startswith("block")), key=lambda b: int(b[5:]))] if routing else None
            cells += [f"{last['per_image_attn_entropy']:.3f} / {last['mutual_information']:.3f} / {last['domain_js_max']:.3f}"
                      if last else "", f"{r['seconds']:.0f}" if "variant" in r else ""]
            table.append(cells)
        text.append(markdown_table(f"Recipe `{recipe}` {json.dumps(RECIPES.get(recipe, {}))}, seed {seed}: mAP@R (%) "
                                   f"on the validation classes (best single k: {best})",
                                   ["row", *domains, "mean", f"Δ vs {best}", f"Δ vs {ORACLE}",
                                    "last block: per-image H / MI / max domain JS (nats)",
                                    "fusion seconds (train + score)"], table))
    write_text(args.results.with_suffix(".md"), "\n".join(text))
    print("\n".join(text))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=["screen", "diagnose", "report", "final"])
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="e5")
    parser.add_argument("--variants", nargs="*", choices=sorted(VARIANTS), default=["baseline"],
                        help="screen: the fusion variants (none: stage 1 and the reference rows only)")
    parser.add_argument("--variant", choices=sorted(VARIANTS), default="baseline",
                        help="diagnose: the fusion read; final: the variant reported")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--results", type=Path, default=SCREEN)
    parser.add_argument("--out", type=Path, default=OUTPUTS, help="where recipes and variants are trained")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="more overrides for every recipe (smoke tests on a few images)")
    args = parser.parse_args(argv)
    return {"screen": screen, "diagnose": diagnose, "report": report, "final": final}[args.command](args)


if __name__ == "__main__":
    raise SystemExit(main())
