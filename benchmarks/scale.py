"""Scale benchmark: wall time and peak memory of the steps at 10k, 100k and 1M images, and how they grow.

    python benchmarks/scale.py                         # 10k, 100k, 1M + extraction of 2000 / 10000 images
    python benchmarks/scale.py --sizes 10000 100000    # a shorter run
    python benchmarks/scale.py --quick --out DIR       # seconds: tiny sizes and model (the tests)

Each step runs as the pipeline runs it, ``python -m grappa <verb> --params FILE``, in a child process,
on a synthetic feature store of N unlabeled images (clustered unit vectors and random float16 prefix
activations, written as ``extract --shard 0/1`` writes its part): ``merge-features``, ``cluster``,
``train-adaptor --k K`` for every K of ``cluster.ks`` (fusion reads them all) and ``train-fusion``.
For each: wall seconds and the child's peak RSS (``os.wait4``'s ``ru_maxrss``: the largest resident
set of the process or any descendant it waited for), then the growth exponents (log-log slopes
against N). Extraction runs on real images (the multidomain images, repeated, each copy re-encoded
with one pixel changed so every file has its own content hash) with the real backbone, and is
compared, in the same run, with the plain per-image timm loop of speed.py and with the FLOP-bound
rate (GFLOPs per image against a matmul rate measured here). Results:
``benchmarks/results/scale_<device>.json``; benchmarks/README.md explains every number.
"""
from __future__ import annotations

import argparse
import csv
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np

REPO = Path(__file__).resolve().parents[1]
for path in (REPO, REPO / "benchmarks"):  # run as a plain script from anywhere
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import pyarrow as pa  # noqa: E402
import pyarrow.parquet as pq  # noqa: E402
import yaml  # noqa: E402

import speed  # noqa: E402  (device_info, growth_exponent, print_table, list_images, bench_extraction)
from grappa import registry  # noqa: E402
from grappa.config import BackboneParams, Params, load_params  # noqa: E402
from grappa.io.artifacts import file_sha256, vectors_to_arrow, write_json  # noqa: E402
from grappa.io.features import RowFileWriter, chunk_rows  # noqa: E402
from grappa.io.layout import Layout, Shard  # noqa: E402

SCHEMA_VERSION = 1
MB = 1 << 20
TINY = {"name": "test_efficientnet", "weights": "none", "image_size": 48, "adapt_from_block": 3}
DEFAULT_IMAGES = speed.DEFAULT_IMAGES
# "flat": peak RSS grows by less than N^0.1 from 100k to 1M (10x the images, < 26% more memory)
FLAT_EXPONENT = 0.1
PRESETS = {
    "default": dict(sizes=[10_000, 100_000, 1_000_000], ks=[64, 256, 1024], clusters=2000, query_db=400,
                    extract_images=[2000, 10_000, 50_000], plain_images=256, matmul_n=2048, steps_per_epoch=50,
                    forward_batches=20),
    "quick": dict(sizes=[400, 800], ks=[4, 8], clusters=20, query_db=40, extract_images=[32],
                  plain_images=4, matmul_n=512, steps_per_epoch=2, forward_batches=2),
}


# --------------------------------------------------------------------------- measuring a child process


def _children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def _tree_memory_mb(pid: int) -> tuple[float, float]:
    """(PSS, anonymous PSS) of ``pid`` and its descendants, MB: proportional set sizes, so pages shared
    between them (forked DataLoader workers) or with other processes count once; the anonymous part
    is the data the processes hold, without the mapped library code."""
    tree, todo, pss, anon = _children_of(), [pid], 0, 0
    while todo:
        p = todo.pop()
        todo += tree.get(p, [])
        try:
            with open(f"/proc/{p}/smaps_rollup") as fh:
                for line in fh:
                    if line.startswith("Pss:"):
                        pss += int(line.split()[1])
                    elif line.startswith("Pss_Anon:"):
                        anon += int(line.split()[1])
        except OSError:
            pass
    return pss / 1024, anon / 1024


# Runs the step and reports its rusage. A process's ru_maxrss starts from the memory of the process it
# was forked from (Linux keeps the pre-exec high-water mark), so the step is forked from this small
# launcher, not from the benchmark (~1 GB with torch loaded).
LAUNCHER = """
import json, os, sys
out, cmd = sys.argv[1], sys.argv[2:]
pid = os.fork()
if pid == 0:
    try:
        os.execvp(cmd[0], cmd)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
with open(out, "w") as fh:
    json.dump({"maxrss_kb": ru.ru_maxrss, "cpu_s": ru.ru_utime + ru.ru_stime,
               "rc": os.waitstatus_to_exitcode(status)}, fh)
sys.exit(min(max(os.waitstatus_to_exitcode(status), 0), 255))
"""


def measure(cmd: list[str], cwd: Path, log: Path, timeout_s: float, env: dict | None = None) -> dict:
    """Wall seconds, CPU seconds, peak RSS (wait4's ru_maxrss) and the peak PSS and anonymous PSS of the
    process tree of ``cmd`` (sampled every 0.1 s for 5 s, then every 0.5 s)."""
    env = {**os.environ, "GRAPPA_TRACKING": "0", "TQDM_MININTERVAL": "30", "PYTHONUNBUFFERED": "1", **(env or {})}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    usage_file = log.with_suffix(".rusage.json")
    usage_file.unlink(missing_ok=True)
    peak, killed = [0.0, 0.0], [False]
    with open(log, "w") as out:
        t0 = time.perf_counter()
        proc = subprocess.Popen([sys.executable, "-S", "-c", LAUNCHER, str(usage_file), *cmd], cwd=cwd,
                                stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        done = threading.Event()

        def sample() -> None:
            while not done.wait(0.1 if time.perf_counter() - t0 < 5 else 0.5):  # short steps: finer
                peak[:] = map(max, peak, _tree_memory_mb(proc.pid))
                if time.perf_counter() - t0 > timeout_s:
                    killed[0] = True
                    os.killpg(proc.pid, signal.SIGKILL)  # the launcher's process group (start_new_session)
                    return

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        rc = proc.wait()
        seconds = time.perf_counter() - t0
        done.set()
        sampler.join()
    try:
        usage = json.loads(usage_file.read_text())
    except (OSError, ValueError):  # the launcher was killed
        usage = {"maxrss_kb": 0, "cpu_s": None, "rc": rc}
    return {"seconds": seconds, "loadavg_1m": round(os.getloadavg()[0], 2),
            "peak_rss_mb": usage["maxrss_kb"] / 1024 or None,
            "tree_peak_pss_mb": peak[0] or None, "tree_peak_anon_mb": peak[1] or None, "cpu_s": usage["cpu_s"],
            "rc": usage["rc"], "timed_out": killed[0]}


def run_verb(verb: str, params_file: Path, ws: Path, timeout_s: float, *extra: str) -> dict:
    name = verb + ("@" + extra[-1].replace("/", "-of-") if extra else "")
    log = ws / "logs" / f"{name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    result = measure([sys.executable, "-m", "grappa", verb, *extra, "--params", str(params_file)], ws, log, timeout_s)
    if result["rc"] != 0:
        tail = log.read_text(errors="replace").strip().splitlines()[-15:]
        result["error"] = "\n".join(tail)
        print(f"   !! {name} exited {result['rc']}{' (timed out)' if result['timed_out'] else ''}; log {log}:\n      "
              + "\n      ".join(tail), flush=True)
    return result


def baseline_rss(work: Path) -> dict:
    """A child that only imports the training steps and builds the tiny backbone: the memory floor."""
    code = ("import pipeline_steps.train_fusion, pipeline_steps.cluster; from grappa.config import BackboneParams; "
            "from grappa.core.backbones import create_backbone; "
            f"create_backbone(BackboneParams(**{TINY!r}))")
    work.mkdir(parents=True, exist_ok=True)
    return measure([sys.executable, "-c", code], work, work / "baseline.log", 600)


# --------------------------------------------------------------------------- the synthetic store


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_synthetic_part(out_dir: Path, n_unlabeled: int, n_query: int, clusters: int, seed: int = 0) -> dict:
    """``extract/parts/0-of-1/`` as ``extract --shard 0/1`` writes it, chunk by chunk: N unlabeled rows
    then ``n_query`` labelled query_db rows; vectors around ``clusters`` random directions, random prefix."""
    from grappa.core.backbones import create_backbone

    backbone, _, fingerprint = create_backbone(BackboneParams(**TINY))
    dim, row_shape = backbone.embed_dim, tuple(backbone.block_shapes[TINY["adapt_from_block"] - 1])
    # the rows per Parquet write (row group) extract uses at the default memory_budget_mb
    chunk = chunk_rows(4 * dim + 2 * int(np.prod(row_shape)), Params.model_fields["memory_budget_mb"].default)
    part = Layout(out_dir).part(Shard(0, 1))
    part.mkdir(parents=True, exist_ok=True)
    total = n_unlabeled + n_query
    rng = np.random.default_rng(seed)
    centres = _unit(rng.standard_normal((clusters, dim), dtype=np.float32))
    noise = np.float32(0.7 / np.sqrt(dim))
    t0 = time.perf_counter()
    prefix = RowFileWriter(part / "prefix.npy", total, row_shape, np.float16)
    writer = None
    by_domain: dict[str, int] = {}
    for start in range(0, total, chunk):
        rows = np.arange(start, min(total, start + chunk))
        centre = rng.integers(0, clusters, len(rows))
        vectors = _unit(centres[centre] + noise * rng.standard_normal((len(rows), dim), dtype=np.float32))
        query = rows >= n_unlabeled
        domains = [f"d{c % 4}" for c in centre]
        for d in domains:
            by_domain[d] = by_domain.get(d, 0) + 1
        table = pa.table({
            "image_id": [f"{d}/{'q' if q else 'u'}{r:08d}.jpg" for d, q, r in zip(domains, query, rows)],
            "uri": [f"/synthetic/{r:08d}.jpg" for r in rows],
            "domain": domains,
            "split": ["query_db" if q else "unlabeled" for q in query],
            "label": pa.array([str(c) if q else None for c, q in zip(centre, query)], pa.string()),
            "content_hash": _hashes(rng, len(rows)),
            "vector": vectors_to_arrow(vectors),
        })
        if writer is None:
            writer = pq.ParquetWriter(part / "features.parquet", table.schema)
        writer.write_table(table)
        prefix.write(rng.standard_normal((len(rows), *row_shape), dtype=np.float32).astype(np.float16))
    writer.close()
    prefix.close()
    seconds = time.perf_counter() - t0
    # no snapshot precedes a synthetic store: a stand-in manifest, whose sha256 the part records
    # (merge-features joins only parts of the current snapshot)
    manifest = Path(out_dir) / "snapshot" / "manifest.parquet"
    manifest.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"synthetic_images": [total]}), manifest)
    report = {"shard": "0/1", "backbone_fingerprint": fingerprint, "cache_dir": None, "images": total,
              "snapshot_sha256": file_sha256(manifest),
              "by_split": {"query_db": n_query, "unlabeled": n_unlabeled} if n_query else {"unlabeled": n_unlabeled},
              "by_domain": dict(sorted(by_domain.items())), "computed": total, "from_cache": 0, "skipped": [],
              "cache_compaction": None, "synthetic": True,
              "timings_s": {"cache_index": 0.0, "forward": seconds, "write": 0.0, "total": seconds},
              "images_per_s": total / max(seconds, 1e-9)}
    write_json(registry.step("extract").report_file(Layout(out_dir), Shard(0, 1)), report)
    return {"seconds": seconds, "rows": total, "dim": dim, "prefix_row_shape": list(row_shape),
            "prefix_gb": total * int(np.prod(row_shape)) * 2 / 1e9}


def _hashes(rng: np.random.Generator, n: int) -> list[str]:
    raw = rng.bytes(32 * n)
    return [raw[i:i + 32].hex() for i in range(0, 32 * n, 32)]


def step_params(ws: Path, ks: list[int], steps_per_epoch: int | None) -> dict:
    """The steps' params.yaml. The training steps run one epoch of at most ``steps_per_epoch`` batches
    at every N (a full epoch at 1M is 7,800 batches, hours on 2 cores): their memory is what grows
    with N, and their time per batch does not."""
    train = {"epochs": 1, "steps_per_epoch": steps_per_epoch}
    return {
        "seed": 0, "out_dir": str(ws / "outputs"),
        "data": {"sources": [str(ws / "no-images")]},  # never read: the store is written directly
        "backbone": dict(TINY),
        "extract": {"batch_size": 64, "num_workers": 0, "cache_dir": str(ws / "cache"), "shards": 1},
        "cluster": {"ks": list(ks), "niter": 25, "nredo": 1},
        "adaptor": dict(train), "fusion": dict(train),
        "tracking": {"enabled": False},
    }  # memory_budget_mb: the default


def _progress(r: dict) -> str:
    return (f"{r['seconds']:8.1f} s (cpu {r['cpu_s'] or 0:.0f} s)  peak RSS {r['peak_rss_mb'] or 0:6.0f} MB  "
            f"anon {r['tree_peak_anon_mb'] or 0:6.0f} MB")


def _per_batch(epoch: dict) -> float | None:
    """Seconds per batch of a training step's (last) epoch."""
    return epoch["seconds"] / epoch["batches"] if epoch.get("batches") else None


def _step_report(step: registry.Step, out: Path, item=None) -> dict:
    """What a row keeps of the step's report."""
    try:
        r = json.loads(step.report_file(Layout(out), item).read_text())
        if step.stage == "merge_features":
            return {"images": r["images"]}
        if step.stage == "cluster":
            return {"sample": r.get("sample"), "timings_s": r.get("timings_s")}
        if step.stage == "train_adaptor":
            return {"images": r["images"], "final": r.get("final"), "s_per_batch": _per_batch(r["final"])}
        if step.stage == "train_fusion":
            return {"images": r["images"], "knn_graph": r.get("knn_graph"), "timings_s": r.get("timings_s"),
                    "final": r.get("final"), "s_per_batch": _per_batch(r["final"])}
    except (OSError, KeyError, ValueError) as err:
        return {"unreadable": str(err)}
    return {}


def bench_steps(args, n: int, rows: list[dict], save) -> None:
    ws = Path(args.work_dir) / f"steps-{n}"
    plan = [(registry.step("merge_features"), None), (registry.step("cluster"), None),
            *[(registry.step("train_adaptor"), k) for k in args.ks], (registry.step("train_fusion"), None)]
    names = [step.stage_name(item) for step, item in plan]
    # --resume: the steps of this N measured by the interrupted run whose outputs are still in its
    # workspace are kept; the run goes on from the first one that is not
    done = {r["step"] for r in rows if r["n"] == n and r["store"] == "synthetic" and r.get("rc", 0) == 0}
    part_report = ws / "outputs" / "extract" / "parts" / "0-of-1" / "report.json"
    keep = 0
    if args.resume and part_report.is_file() and json.loads(part_report.read_text()).get("images") == n + args.query_db:
        while (keep < len(plan) and names[keep] in done
               and plan[keep][0].report_file(Layout(ws / "outputs"), plan[keep][1]).is_file()):
            keep += 1
    if all(name in done for name in names):
        print(f"\n-- N = {n:,}: measured by the interrupted run (--resume), kept", flush=True)
        return
    rows[:] = [r for r in rows if not (r["n"] == n and r["store"] == "synthetic" and
                                       (r["step"] == "knn" or r["step"] in names[keep:]))]
    if keep:
        print(f"\n-- N = {n:,}: resuming in {ws} after {', '.join(names[:keep])} (--resume)", flush=True)
        params_file = ws / "params.yaml"
    else:
        if ws.exists():
            shutil.rmtree(ws)
        ws.mkdir(parents=True)
        params_file = ws / "params.yaml"
        params_file.write_text(yaml.safe_dump(step_params(ws, args.ks, args.steps_per_epoch), sort_keys=False))
        print(f"\n-- N = {n:,}: writing the synthetic store ({n:,} unlabeled + {args.query_db} query_db rows)",
              flush=True)
        store = write_synthetic_part(ws / "outputs", n, args.query_db, args.clusters, seed=n)
        print(f"   {store['rows']:,} rows, vectors {store['dim']}-d, prefix {store['prefix_row_shape']} "
              f"({store['prefix_gb']:.2f} GB) in {store['seconds']:.0f} s", flush=True)
    plan = plan[keep:]
    for step, k in plan:
        extra = ("--k", str(k)) if k is not None else ()
        result = run_verb(step.verb, params_file, ws, args.step_timeout, *extra)
        row = {"step": step.stage_name(k), "n": n, **result, "store": "synthetic",
               "report": _step_report(step, ws / "outputs", k) if result["rc"] == 0 else {}}
        rows.append(row)
        print(f"   {row['step']:<20} {_progress(row)}", flush=True)
        if step.stage == "train_fusion" and result["rc"] == 0:
            knn = row["report"].get("knn_graph") or {}
            seconds = (row["report"].get("timings_s") or {}).get("knn_graph")
            if seconds is not None:
                rows.append({"step": "knn", "n": n, "seconds": float(seconds), "peak_rss_mb": None,
                             "part_of": "train_fusion", "store": "synthetic", "report": knn})
        save()
        if result["rc"] != 0:
            print(f"   the later steps of N = {n:,} need this one: skipped", flush=True)
            break
    if not args.keep:
        shutil.rmtree(ws, ignore_errors=True)


# --------------------------------------------------------------------------- extraction on real images


def _reencode(job: tuple[str, str, int]) -> None:
    from PIL import Image

    src, dst, i = job
    img = Image.open(src).convert("RGB")
    img.putpixel((0, 0), (i % 251, (i // 251) % 251, (i // 63001) % 251))  # a distinct file per copy
    img.save(dst, "JPEG", quality=90)


def _synthetic_image(job: tuple[str, str, int]) -> None:
    from PIL import Image

    _, dst, i = job
    rng = np.random.default_rng(i)
    small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    Image.fromarray(small).resize((96, 96), Image.BILINEAR).save(dst, "JPEG", quality=90)


def make_images(args, count: int) -> tuple[Path, list[tuple[str, str]], str]:
    """``count`` distinct image files under work_dir/images/<domain>/ (real images repeated, each copy
    with one pixel changed and re-encoded; synthetic ones when there are no real images)."""
    root = Path(args.work_dir) / "images"
    files = speed.list_images(args.images) if args.images else []
    kind = f"real ({len(files)} distinct images of {args.images}, repeated, 1 pixel changed per copy)" if files \
        else "synthetic (random 96x96 JPEGs)"
    jobs, listed = [], []
    for i in range(count):
        if files:
            src = files[i % len(files)]
            parts = Path(src).parts
            domain = parts[parts.index("images") - 1] if "images" in parts[:-1] else "default"
        else:
            src, domain = "", f"d{i % 4}"
        rel = f"{domain}/{i:07d}.jpg"
        listed.append((rel, domain))
        if not (root / rel).is_file():
            (root / domain).mkdir(parents=True, exist_ok=True)
            jobs.append((src, str(root / rel), i))
    if jobs:
        t0 = time.perf_counter()
        # fork before any torch work: the workers only run PIL
        with multiprocessing.get_context("fork").Pool(max(1, len(os.sched_getaffinity(0)))) as pool:
            pool.map(_reencode if files else _synthetic_image, jobs, chunksize=64)
        print(f"   wrote {len(jobs):,} images under {root} in {time.perf_counter() - t0:.0f} s", flush=True)
    return root, listed, kind


def matmul_gflops(n: int, repeats: int = 5) -> float:
    """Best fp32 matmul rate of torch on this machine (n x n by n x n), GFLOP/s."""
    import torch

    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(3):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 3)
    return 2 * n ** 3 / best / 1e9


def backbone_gflops(bp: BackboneParams) -> float:
    """FLOPs (multiply and add counted separately) of one image through the backbone, GFLOP."""
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    from grappa.core.backbones import create_backbone

    backbone, _, _ = create_backbone(bp)
    model = backbone.model.eval()
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), counter:
        model(torch.zeros(1, 3, bp.image_size, bp.image_size))
    return counter.get_total_flops() / 1e9


def extract_params(args, ws: Path, manifest: Path, runtime: str | None = None) -> dict:
    shipped = load_params(args.params)
    backbone = dict(TINY) if args.quick else shipped.backbone.model_dump()
    extract = {"batch_size": shipped.extract.batch_size, "num_workers": shipped.extract.num_workers,
               "runtime": shipped.extract.runtime, "cache_dir": str(ws / "cache"),
               "shards": 1}  # a fresh cache: every image is computed
    if args.quick:  # OpenVINO named: auto would choose torch for so few images
        extract.update(batch_size=16, num_workers=0, runtime="openvino")
    extract["runtime"] = runtime or extract["runtime"]
    return {"seed": 0, "out_dir": str(ws / "outputs"), "data": {"sources": [str(manifest)]},
            "backbone": backbone, "extract": extract, "cluster": {"ks": args.ks}, "tracking": {"enabled": False}}


def stage_rates(probe: dict, files: list[Path], runtimes: list[str], batches: int) -> dict:
    """Where extraction's time goes, each stage alone in this process: reading, decoding and cropping
    to 8 bits (the step's dataset and loader, in-process as with OpenVINO: one core; no forward), the
    forward of each runtime (random 8-bit batches, no decoding; compile time apart); images/s."""
    import torch

    from grappa.config import parse_params
    from grappa.core.augment import CentreCrop
    from grappa.core.backbones import create_backbone
    from grappa.core.runtimes import frozen_forward
    from grappa.io.assemble import build_model
    from grappa.io.datasets import ImageDataset, loader

    params = parse_params(probe)
    backbone, preprocess, _ = create_backbone(params.backbone)
    size, batch, crop = params.backbone.image_size, params.extract.batch_size, CentreCrop(preprocess)
    dataset = ImageDataset([str(f) for f in files], crop.pixels, params.data.min_side, params.data.max_pixels)
    t0 = time.perf_counter()
    decoded = sum(len(rows) for rows, _, _ in loader(dataset, batch, num_workers=0))
    out = {"decode_resize": {"images": decoded, "images_per_s": decoded / (time.perf_counter() - t0),
                             "num_workers": 0}}
    x = torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    for runtime in runtimes:
        forward, info = frozen_forward(build_model(params, backbone, ks=[]), crop, runtime, torch.device("cpu"),
                                       batches * batch)
        list(forward([(0, x)]))  # warm-up
        t0 = time.perf_counter()
        for _ in forward((b, x) for b in range(batches)):
            pass
        out[f"forward_{runtime}"] = {"images_per_s": batches * batch / (time.perf_counter() - t0),
                                     "compile_s": info["compile_s"], "version": info["version"]}
    return out


def _min_cosine(a: Path, b: Path) -> tuple[float, int]:
    """Smallest per-image cosine between the merged stores of two extractions of the same images."""
    from grappa.io.artifacts import arrow_to_vectors, read_table

    ta, tb = read_table(a / "extract" / "features.parquet"), read_table(b / "extract" / "features.parquet")
    assert ta.column("image_id").to_pylist() == tb.column("image_id").to_pylist()
    va, vb = arrow_to_vectors(ta.column("vector")), arrow_to_vectors(tb.column("vector"))
    cosine = (va * vb).sum(1) / np.linalg.norm(va, axis=1) / np.linalg.norm(vb, axis=1)
    return float(cosine.min()), len(cosine)


def bench_extraction(args, rows: list[dict], save) -> dict:
    sizes = sorted(args.extract_images)
    print(f"\n-- extraction: {', '.join(f'{s:,}' for s in sizes)} images", flush=True)
    root, listed, kind = make_images(args, max(sizes))
    probe = extract_params(args, Path(args.work_dir), root / "manifest.csv")
    bp = BackboneParams(**probe["backbone"])
    runtime = probe["extract"]["runtime"]
    plain_n = min(args.plain_images, max(sizes))

    matmul_before = matmul_gflops(args.matmul_n)
    gflops = backbone_gflops(bp)
    # speed.py's plain per-image timm loop (and its in-process batched path) on a subset of these images
    subset = Path(args.work_dir) / "plain-subset"
    shutil.rmtree(subset, ignore_errors=True)
    subset.mkdir(parents=True)
    for rel, _ in listed[:plain_n]:
        (subset / rel.replace("/", "_")).symlink_to(root / rel)
    plain = speed.bench_extraction(SimpleNamespace(
        images=str(subset), extract_sizes=[plain_n], backbone=bp.name, weights=bp.weights, image_size=bp.image_size,
        adapt_from_block=bp.adapt_from_block, extract_batch=probe["extract"]["batch_size"],
        num_workers=probe["extract"]["num_workers"], repeats=1), "cpu")["rows"][0]
    stages = stage_rates(probe, [root / rel for rel, _ in listed[:plain_n]], ["torch", "openvino"],
                         args.forward_batches)
    print("   stages alone: " + ", ".join(f"{k} {v['images_per_s']:.1f} img/s" for k, v in stages.items()), flush=True)
    save()

    def extract_run(n: int, rt: str) -> tuple[dict, Path]:
        ws = Path(args.work_dir) / f"extract-{n}-{rt}"
        shutil.rmtree(ws, ignore_errors=True)
        ws.mkdir(parents=True)
        manifest = root / f"manifest_{n}.csv"
        with open(manifest, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["path", "domain", "split"])
            writer.writerows([rel, domain, "unlabeled"] for rel, domain in listed[:n])
        params_file = ws / "params.yaml"
        params_file.write_text(yaml.safe_dump(extract_params(args, ws, manifest, rt), sort_keys=False))
        run = {"n": n, "runtime": rt}
        for stage, extra in (("snapshot", ()), ("extract", ("--shard", "0/1")), ("merge_features", ())):
            result = run_verb(registry.step(stage).verb, params_file, ws, args.step_timeout, *extra)
            run[stage] = result
            print(f"   {stage:<20} n={n:<8,} {rt:<9} {_progress(result)}", flush=True)
            if result["rc"] != 0:
                break
            if stage in ("snapshot", "extract") and rt == runtime:  # torch's side run is kept in its own entry
                rows.append({"step": stage, "n": n, **result, "store": "images", "runtime": rt})
        part = registry.step("extract").report_file(Layout(ws / "outputs"), Shard(0, 1))
        if part.is_file():
            report = json.loads(part.read_text())
            run["part_report"] = {k: report.get(k) for k in ("images", "computed", "from_cache", "timings_s",
                                                            "images_per_s", "skipped", "runtime")}
            run["images_per_s"] = report["images_per_s"]
            run["images_per_s_wall"] = report["computed"] / run["extract"]["seconds"]
        save()
        return run, ws

    # the runtime of the params at every size; PyTorch beside it on the smallest (the same images)
    runs, kept = [], []
    for n in sizes:
        run, ws = extract_run(n, runtime)
        runs.append(run)
        if n == sizes[0]:
            kept.append(ws)  # compared with torch's store below
        elif not args.keep:
            shutil.rmtree(ws, ignore_errors=True)
    side = None
    if runtime != "torch":
        run, ws = extract_run(sizes[0], "torch")
        side = {"n": sizes[0], "runtime": runtime, "images_per_s": runs[0].get("images_per_s"),
                "torch_images_per_s": run.get("images_per_s")}
        if side["images_per_s"] and side["torch_images_per_s"]:
            side["speedup"] = side["images_per_s"] / side["torch_images_per_s"]
            side["min_cosine_vs_torch"], side["images_compared"] = _min_cosine(kept[0] / "outputs", ws / "outputs")
        side["torch_run"] = run
        kept.append(ws)
    if not args.keep:
        for ws in kept:
            shutil.rmtree(ws, ignore_errors=True)
    matmul_after = matmul_gflops(args.matmul_n)
    matmul = max(matmul_before, matmul_after)
    bound = matmul / gflops
    main = next((r for r in reversed(runs) if "images_per_s" in r), None)
    rate = main["images_per_s"] if main else None
    result = {
        "images": kind, "backbone": bp.model_dump(),
        "extract_settings": {k: probe["extract"][k] for k in ("batch_size", "num_workers", "runtime")},
        "runs": runs,
        "n": main["n"] if main else None,
        "images_per_s": rate,
        "runtime": (main or {}).get("part_report", {}).get("runtime"),
        "stages": stages,
        "runtime_vs_torch": side,
        "plain_timm_loop": {"n": plain_n, "images_per_s": plain["plain_img_per_s"], "seconds": plain["plain_s"],
                            "in_process_batched_images_per_s": plain["ours_img_per_s"],
                            "min_cosine_vs_batched": plain["min_cosine_ours_vs_plain"]},
        "ratio_vs_plain_timm_loop": rate / plain["plain_img_per_s"] if rate else None,
        "gflops_per_image": gflops,
        "matmul": {"n": args.matmul_n, "dtype": "float32", "gflops": matmul, "gflops_before": matmul_before,
                   "gflops_after": matmul_after},
        "flop_bound_images_per_s": bound,
        "fraction_of_flop_bound": rate / bound if rate else None,
    }
    if len([r for r in runs if "extract" in r]) >= 2:
        ok = [r for r in runs if r.get("extract", {}).get("rc") == 0]
        result["exponents"] = {key: speed.growth_exponent([r["n"] for r in ok], [r["extract"][key] for r in ok])
                               for key in METRICS}
    return result


# --------------------------------------------------------------------------- growth exponents and report


METRICS = {"seconds": "time", "cpu_s": "cpu", "peak_rss_mb": "RSS", "tree_peak_anon_mb": "anon"}


def exponents(rows: list[dict]) -> dict:
    """Per step: log-log slopes of seconds, peak RSS and anonymous memory against N, between consecutive
    sizes and over all sizes, and whether peak RSS stays flat over the last pair (100k -> 1M)."""
    out = {}
    for step in dict.fromkeys(r["step"] for r in rows):
        mine = sorted((r for r in rows if r["step"] == step and r.get("rc", 0) == 0), key=lambda r: r["n"])
        ns = [r["n"] for r in mine]
        entry = {}
        for key in METRICS:
            values = [r.get(key) for r in mine]
            slopes = {f"{a}-{b}": speed.growth_exponent([a, b], [va, vb])
                      for (a, va), (b, vb) in zip(zip(ns, values), zip(ns[1:], values[1:]))}
            entry[key] = {**slopes, "overall": speed.growth_exponent(ns, values)}
        last = [v for k, v in entry["peak_rss_mb"].items() if k != "overall"]
        entry["flat_memory"] = None if not last or last[-1] is None else bool(last[-1] < FLAT_EXPONENT)
        if len(ns) >= 2:
            entry["flat_memory_between"] = [ns[-2], ns[-1]]
        out[step] = entry
    return out


def print_report(result: dict) -> None:
    rows = result["rows"]
    base = result["baseline"]
    speed.print_table("wall time and peak memory per step (each step a `python -m grappa` child process)",
                      ["step", "n", "seconds", "cpu s", "peak RSS MB", "anon MB", "store", "notes"],
                      [[r["step"], r["n"], r["seconds"], r.get("cpu_s"), r.get("peak_rss_mb"),
                        r.get("tree_peak_anon_mb"), r["store"], _note(r)] for r in rows],
                      [f"baseline (a child that imports the steps and builds the tiny backbone, no data): "
                       f"{base['seconds']:.1f} s, peak RSS {base['peak_rss_mb']:.0f} MB, anon {base['tree_peak_anon_mb'] or 0:.0f} MB",
                       "peak RSS = ru_maxrss of the step's process (largest of it and its descendants; mapped library "
                       "code included); anon = peak anonymous PSS of its process tree, sampled every 0.1-0.5 s"])
    exps = result["exponents"]
    pairs = sorted({k for e in exps.values() for k in e["seconds"] if k != "overall"},
                   key=lambda k: int(k.split("-")[0]))
    for title, keys in (("time", ("seconds", "cpu_s")), ("memory", ("peak_rss_mb", "tree_peak_anon_mb"))):
        headers, cols = ["step"], []
        for key in keys:
            for p in [*pairs, "overall"]:
                headers.append(f"{METRICS[key]} {p if p != 'overall' else 'all'}")
                cols.append((key, p))
        flat = title == "memory"
        speed.print_table(f"growth exponents of {title} (value ~ N^e: log-log slope between two sizes; all = "
                          "least-squares fit over every size)", [*headers, *(["flat RSS"] if flat else [])],
                          [[step, *[e[k].get(p) for k, p in cols],
                            *(["-" if e["flat_memory"] is None else ("yes" if e["flat_memory"] else "NO")] if flat else [])]
                           for step, e in exps.items()],
                          [f"flat RSS: peak RSS exponent over the last pair of sizes below {FLAT_EXPONENT} "
                           "(10x the images, < 26% more memory)"] if flat else
                          ["time = wall seconds, cpu = CPU seconds of the step's processes (less sensitive to other "
                           "jobs on the machine; loadavg_1m in the JSON rows)"])
    ex = result.get("extraction")
    if ex and ex.get("images_per_s"):
        decoding = (ex.get("runtime") or {}).get("loader_workers", ex["extract_settings"]["num_workers"])
        print(f"\n== extraction ({ex['backbone']['name']}, {ex['backbone']['image_size']} px, "
              f"batch {ex['extract_settings']['batch_size']}, {decoding} loader workers), "
              f"{ex['n']:,} images: {ex['images']}")
        plain = ex["plain_timm_loop"]
        print(f"   extract (part report images_per_s): {ex['images_per_s']:.1f} img/s")
        print(f"   plain per-image timm loop ({plain['n']} images): {plain['images_per_s']:.1f} img/s "
              f"-> ratio {ex['ratio_vs_plain_timm_loop']:.2f}x")
        side = ex.get("runtime_vs_torch")
        if side and side.get("speedup"):
            print(f"   runtime {ex['runtime']['name']} {ex['runtime']['version']} vs torch, {side['n']:,} images: "
                  f"{side['images_per_s']:.1f} vs {side['torch_images_per_s']:.1f} img/s -> {side['speedup']:.2f}x; "
                  f"smallest per-image cosine of the embeddings {side['min_cosine_vs_torch']:.7f}")
        if ex.get("stages"):
            print("   each stage alone: " + ", ".join(f"{k} {v['images_per_s']:.1f} img/s" for k, v in ex["stages"].items()))
        print(f"   FLOP bound: {ex['gflops_per_image']:.3f} GFLOP/image at {ex['matmul']['gflops']:.0f} GFLOP/s "
              f"(fp32 matmul {ex['matmul']['n']}^2, best of before/after) = {ex['flop_bound_images_per_s']:.0f} img/s "
              f"-> extract reaches {100 * ex['fraction_of_flop_bound']:.1f}% of it")
        if ex.get("exponents"):
            print(f"   extract growth exponents over {[r['n'] for r in ex['runs']]}: time {ex['exponents']['seconds']}, "
                  f"peak RSS {ex['exponents']['peak_rss_mb']}, anon {ex['exponents']['tree_peak_anon_mb']}")
    sys.stdout.flush()


def markdown_table(result: dict) -> str:
    """README's scale table (README.md, "Scale") from a scale JSON: per step, seconds / peak RSS at each
    N of the synthetic stores, and the peak-RSS exponent over the last pair of sizes."""
    rows = [r for r in result["rows"] if r["store"] == "synthetic" and r.get("rc", 0) == 0]
    sizes = sorted({r["n"] for r in rows})
    cell = {(r["step"], r["n"]): r for r in rows}
    label = {"cluster": f"cluster (k = {', '.join(map(str, result['settings']['ks']))})",
             "knn": "kNN graph (inside train_fusion)"}
    pair = f"{_short(sizes[-2])}→{_short(sizes[-1])}" if len(sizes) > 1 else ""
    lines = [f"| step | {_short(sizes[0])}: s / peak RSS MB | " + " | ".join(_short(n) for n in sizes[1:])
             + f" | RSS exponent {pair} |", "|---" * (len(sizes) + 2) + "|"]
    for step in dict.fromkeys(r["step"] for r in rows):
        if step == "knn":
            values = []
            for n in sizes:
                row = cell.get((step, n))
                if row is None:
                    values.append("-")
                    continue
                method = (row.get("report") or {}).get("method", "")
                kind = "exact" if method == "exact" else ("IVF-PQ" if ",pq" in method else "IVF")
                recall = (row.get("report") or {}).get("recall_vs_exact")
                values.append(f"{row['seconds']:.1f}, {kind}" + (f", recall {recall:.3f}" if recall is not None else ""))
            lines.append(f"| {label[step]} | " + " | ".join(values) + " | |")
            continue
        values = [f"{cell[(step, n)]['seconds']:.1f} / {cell[(step, n)]['peak_rss_mb']:.0f}" if (step, n) in cell
                  else "-" for n in sizes]
        slope = result["exponents"].get(step, {}).get("peak_rss_mb", {}).get(f"{sizes[-2]}-{sizes[-1]}") \
            if len(sizes) > 1 else None
        lines.append(f"| {label.get(step, step)} | " + " | ".join(values)
                     + f" | {'-' if slope is None else f'{slope:.2f}'} |")
    per_batch = {(r["step"], r["n"]): (r.get("report") or {}).get("s_per_batch") for r in rows}
    ratios = []
    for n in sizes:
        adaptor = [v for (step, m), v in per_batch.items() if m == n and step.startswith("train_adaptor") and v]
        fusion = per_batch.get(("train_fusion", n))
        ratios.append(f"{fusion / np.mean(adaptor):.2f}x ({fusion:.3f} / {np.mean(adaptor):.3f} s)"
                      if adaptor and fusion else "-")
    if any(r != "-" for r in ratios):
        lines.append("| a fusion batch / an adaptor batch (s, mean of the ks) | " + " | ".join(ratios) + " | |")
    return "\n".join(lines) + "\n" + (_extraction_markdown(result["extraction"]) if result.get("extraction") else "")


def _extraction_markdown(ex: dict) -> str:
    """The extraction runs of a scale JSON as a table, with the bound and the side runs they are read against."""
    rt, settings = ex.get("runtime") or {}, ex["extract_settings"]
    bound = ex["flop_bound_images_per_s"]
    detail = ""
    if rt.get("streams"):
        n = rt["request_images"]
        detail = f", {rt['streams']} streams, requests of {n} image{'s' if n > 1 else ''}" + \
            (" (the prefix one image at a time, the suffix on all of them)" if rt.get("suffix_batched") else "")
    lines = ["", f"Extraction: real images, `{ex['backbone']['name']}` {ex['backbone']['image_size']} px, batch "
             f"{settings['batch_size']}, runtime {rt.get('name')} {rt.get('version', '').split('-')[0]}{detail}; "
             "images a second of the step's backbone loop, reading, decoding and the model's conversion included:", "",
             "| images | img/s | peak RSS MB | fraction of the FLOP bound |", "|---|---|---|---|"]
    for run in ex["runs"]:
        if "images_per_s" in run:
            lines.append(f"| {run['n']:,} | {run['images_per_s']:.1f} | {run['extract']['peak_rss_mb']:,.0f} | "
                         f"{100 * run['images_per_s'] / bound:.1f}% |")
    mm, side, stages = ex["matmul"], ex.get("runtime_vs_torch") or {}, ex.get("stages") or {}
    lines += ["", f"FLOP bound: {ex['gflops_per_image']:.3f} GFLOP an image at {mm['gflops']:.0f} GFLOP/s (fp32 "
              f"{mm['n']}² matmul, {mm['gflops_before']:.0f} before / {mm['gflops_after']:.0f} after the runs, the "
              f"higher kept) = {bound:.0f} img/s."]
    if side.get("speedup"):
        lines[-1] += (f" The same {side['n']:,} images with PyTorch: {side['torch_images_per_s']:.1f} img/s "
                      f"({rt.get('name')} {side['speedup']:.2f}x faster), smallest per-image cosine between the two "
                      f"{side['min_cosine_vs_torch']:.7f}.")
    if stages:
        alone = ", ".join(f"{k.replace('_', ' ')} {v['images_per_s']:.0f}" for k, v in stages.items())
        lines[-1] += f" Each stage alone (img/s): {alone}."
    return "\n".join(lines) + "\n"


def _short(n: int) -> str:
    return f"{n // 1_000_000}M" if n >= 1_000_000 and n % 1_000_000 == 0 else (
        f"{n // 1000}k" if n >= 1000 and n % 1000 == 0 else str(n))


def _note(row: dict) -> str:
    if row.get("rc", 0) != 0:
        return f"FAILED rc={row['rc']}" + (" (timeout)" if row.get("timed_out") else "")
    rep = row.get("report") or {}
    if row["step"] == "cluster" and rep.get("sample"):
        return "sample " + "/".join(f"{v:,}" for v in rep["sample"].values())
    notes = []
    if rep.get("s_per_batch"):
        notes.append(f"{rep['final']['batches']} batches, {rep['s_per_batch']:.2f} s/batch")
    if row["step"] == "train_fusion" and rep.get("knn_graph"):
        knn = rep["knn_graph"]
        recall = knn.get("recall_vs_exact", knn.get("recall"))
        notes.append(f"knn {knn.get('method')}" + (f" recall {recall:.3f}" if recall is not None else ""))
    if notes:
        return "; ".join(notes)
    if row["step"] == "knn":
        return "inside train_fusion"
    return ""


# --------------------------------------------------------------------------- main


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny sizes and the tiny model everywhere (seconds; tests)")
    p.add_argument("--sizes", type=int, nargs="+", help="unlabeled images of the synthetic stores "
                   "(default 10000 100000 1000000)")
    p.add_argument("--ks", type=int, nargs="+", help="cluster.ks (default 64 256 1024)")
    p.add_argument("--clusters", type=int, help="Gaussian-mixture components of the synthetic vectors (2000)")
    p.add_argument("--query-db", type=int, help="labelled query_db rows added to each store (400)")
    p.add_argument("--extract-images", type=int, nargs="+", help="images extracted, one run each "
                   "(default 2000 10000 50000; 0 skips extraction)")
    p.add_argument("--images", default=DEFAULT_IMAGES, help="real images to repeat for extraction "
                   "(glob of folders; none found: synthetic images)")
    p.add_argument("--plain-images", type=int, help="images of the plain timm loop (256)")
    p.add_argument("--steps-per-epoch", type=int, help="batches of the training steps' one epoch at every N "
                   "(50; 0: a full epoch, N // batch_size)")
    p.add_argument("--matmul-n", type=int, help="matrix side of the matmul rate (2048)")
    p.add_argument("--forward-batches", type=int, help="batches of each runtime's forward alone (20)")
    p.add_argument("--params", default=str(REPO / "params.yaml"), help="extraction settings (backbone, extract)")
    p.add_argument("--work-dir", default="/tmp/grappa-scale", help="workspaces (each removed after it is measured)")
    p.add_argument("--keep", action="store_true", help="keep the workspaces")
    p.add_argument("--step-timeout", type=float, default=7200, help="seconds before a step is killed")
    p.add_argument("--skip-steps", action="store_true", help="extraction only")
    p.add_argument("--resume", action="store_true", help="continue an interrupted run: keep the rows of the existing "
                   "JSON (extraction, every N whose steps all finished, and the finished steps of an N whose workspace "
                   "is still there) and run the rest")
    p.add_argument("--redo-extraction", action="store_true", help="with --resume: measure the extraction again, "
                   "keep the step rows")
    p.add_argument("--redo-steps", action="store_true", help="with --resume: measure the steps again, keep the "
                   "extraction")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="folder of scale_<device>.json")
    p.add_argument("--device-name", default=None, help="override the device name (cpu-<N>core / cuda-<GPU>)")
    p.add_argument("--note", default="", help="free text stored in the JSON")
    p.add_argument("--markdown", action="store_true", help="print README's scale table from the JSON in --out "
                   "(--device-name) and measure nothing")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    preset = PRESETS["quick" if args.quick else "default"]
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.quick and args.work_dir == "/tmp/grappa-scale":
        args.work_dir = "/tmp/grappa-scale-quick"
    args.extract_images = [n for n in args.extract_images if n > 0]
    args.steps_per_epoch = args.steps_per_epoch or None
    info = speed.device_info()
    name = args.device_name or info["name"]
    out = Path(args.out) / f"scale_{name}.json"
    if args.markdown:
        print(markdown_table(json.loads(out.read_text())), end="")
        return {}
    work = Path(args.work_dir)
    work.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    rows: list[dict] = []
    result = {"schema_version": SCHEMA_VERSION, "device": name, "preset": "quick" if args.quick else "default",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": " ".join([Path(sys.executable).name, *sys.argv]), "host": info, "note": args.note,
              "settings": {"sizes": args.sizes, "ks": args.ks, "clusters": args.clusters, "query_db": args.query_db,
                           "steps_backbone": TINY, "step_params": step_params(Path("<ws>"), args.ks, args.steps_per_epoch),
                           "extract_images": args.extract_images, "flat_exponent": FLAT_EXPONENT},
              "rows": rows, "exponents": {}, "extraction": None,
              "notes": ["rows: one per step and N; seconds = wall time of `python -m grappa <verb>` (process start "
                        "and imports included, see baseline); peak_rss_mb = os.wait4 ru_maxrss of that process",
                        "steps run on synthetic stores of N unlabeled rows (+ query_db rows) with the tiny "
                        "test_efficientnet backbone (256-d vectors, prefix (32, 6, 6) float16); extraction on "
                        "real images with the shipped backbone",
                        "train-adaptor and train-fusion: one epoch of settings.step_params.*.steps_per_epoch batches "
                        "(null: N // batch_size) at every N; s_per_batch = the epoch's seconds / its batches"]}

    def save() -> None:
        result["exponents"] = exponents(rows)
        result["benchmark_wall_s"] = time.perf_counter() - t_start
        tmp = out.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(result, indent=2, default=str) + "\n")
        tmp.replace(out)

    print(f"scale benchmark on {name} ({info['cpu_cores']} cores): steps at N = {args.sizes}, ks {args.ks}; "
          f"extraction of {args.extract_images} images; work dir {work}", flush=True)
    previous = json.loads(out.read_text()) if args.resume and out.is_file() else None
    if previous and previous.get("settings", {}).get("ks") == args.ks and previous.get("preset") == result["preset"]:
        rows += previous["rows"]
        result["resumed"] = [*previous.get("resumed", []), {"created": previous["created"],
                                                            "command": previous["command"],
                                                            "benchmark_wall_s": previous.get("benchmark_wall_s")}]
        result["created"], result["baseline"] = previous["created"], previous["baseline"]
        result["note"] = " ".join(filter(None, [previous.get("note"), args.note]))
        if args.redo_steps:
            rows[:] = [r for r in rows if r["store"] != "synthetic"]
        ex = previous.get("extraction")
        if ex and sorted(r["n"] for r in ex["runs"]) == sorted(args.extract_images) and not args.redo_extraction:
            result["extraction"] = ex
        else:
            rows[:] = [r for r in rows if r["store"] != "images"]
        print(f"   --resume: {len(rows)} rows of the run of {previous['created']} kept where their outputs still are",
              flush=True)
    else:
        result["baseline"] = baseline_rss(work)
    if args.extract_images and result["extraction"] is None:  # first: the images are written before any torch work
        result["extraction"] = bench_extraction(args, rows, save)
        save()
    if not args.skip_steps:
        for n in args.sizes:
            bench_steps(args, n, rows, save)
    save()
    print_report(result)
    print(f"\nwrote {out} ({result['benchmark_wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
