"""Step 2b — ``grappa merge-features``: the extracted parts as the one feature table later steps read.

Joins ``extract/parts/<I>-of-<N>/features.parquet`` in shard order into ``extract/features.parquet``
(streamed by row group) and writes ``extract/prefix.json``, which lists the parts' ``prefix.npy``
files in the same order: the activations, by far the larger part, are never copied. Parts of another
shard count (an earlier ``extract.shards``) are removed. Its report sums the parts' reports
(``timings_s.parts``: their seconds; ``timings_s.total``: this step's own).
"""
from __future__ import annotations

import shutil
import time

import pyarrow.parquet as pq

from grappa.config import ConfigError, Params
from grappa.io.artifacts import atomic_path, file_sha256, read_json
from grappa.io.features import RowFile, stream_parquet, write_prefix_index
from grappa.io.layout import PART_FEATURES, PART_PREFIX, PART_REPORT, layout, shards


def run(params: Params) -> dict:
    t0 = time.perf_counter()
    out = layout(params)
    parts = shards(params.extract.shards)
    missing = [str(s) for s in parts if not out.path(PART_FEATURES, shard=s).is_file()]
    if missing:
        raise ConfigError(f"extract parts missing: run 'grappa extract --shard {missing[0]}'"
                          + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    reports = [read_json(out.path(PART_REPORT, shard=s)) for s in parts]
    snapshot = file_sha256(out.manifest)
    stale = [str(s) for s, r in zip(parts, reports) if r.get("snapshot_sha256") != snapshot]
    if stale:  # a part cut from an earlier snapshot holds other images at its rows
        raise ConfigError(f"extract part {stale[0]} was made from another data snapshot; run 'grappa extract "
                          f"--shard {stale[0]}'" + (f" (and {len(stale) - 1} more)" if len(stale) > 1 else ""))
    fingerprints = {r["backbone_fingerprint"] for r in reports}
    if len(fingerprints) > 1:
        raise ConfigError(f"the extract parts come from {len(fingerprints)} backbone setups; rerun 'grappa extract'")

    prefix_files = []
    with atomic_path(out.features) as tmp:
        writer = None
        for shard in parts:
            part = stream_parquet(out.path(PART_FEATURES, shard=shard))
            prefix = out.path(PART_PREFIX, shard=shard)
            if prefix.is_file():
                if len(RowFile(prefix)) != part.metadata.num_rows:
                    raise ConfigError(f"{prefix} and its features.parquet disagree; rerun 'grappa extract --shard {shard}'")
                prefix_files.append(prefix)
            for batch in part.iter_batches(batch_size=8192):
                if writer is None:
                    writer = pq.ParquetWriter(tmp, batch.schema)
                writer.write_batch(batch)
        writer.close()
    if prefix_files and len(prefix_files) != len(parts):
        raise ConfigError("some extract parts have prefix activations and some do not; rerun 'grappa extract'")
    write_prefix_index(out, prefix_files)

    current = {out.part(s).name for s in parts}
    for stale in out.part(parts[0]).parent.iterdir():
        if stale.is_dir() and stale.name not in current:
            shutil.rmtree(stale)

    report = _sum_reports(reports)
    report["timings_s"]["total"] = time.perf_counter() - t0
    return report


def _sum_reports(reports: list[dict]) -> dict:
    def add(key: str) -> dict:
        total: dict[str, int] = {}
        for r in reports:
            for name, n in r[key].items():
                total[name] = total.get(name, 0) + n
        return total

    forward = sum(r["timings_s"]["forward"] for r in reports)
    computed = sum(r["computed"] for r in reports)
    return {
        "shards": len(reports),
        "backbone_fingerprint": reports[0]["backbone_fingerprint"],
        "images": sum(r["images"] for r in reports),
        "by_split": add("by_split"),
        "by_domain": add("by_domain"),
        "computed": computed,
        "from_cache": sum(r["from_cache"] for r in reports),
        "skipped": [s for r in reports for s in r["skipped"]],
        # seconds summed over the shards (the wall time is less when they ran in parallel); run
        # adds this step's own total
        "timings_s": {"forward": forward, "parts": sum(r["timings_s"]["total"] for r in reports)},
        "images_per_s": computed / max(forward, 1e-9),
        "per_shard": [{"shard": r["shard"], "images": r["images"], "computed": r["computed"],
                       "runtime": r.get("runtime")} for r in reports],
    }
