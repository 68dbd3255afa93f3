"""Step 1 on messy inputs: bad files are skipped with reasons, the content-hash cache, atomic outputs."""
from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from conftest import draw_image, snapshot_and_extract, tiny_params_dict
from grappa.config import ConfigError, parse_params
from grappa.io import artifacts
from grappa.io.artifacts import arrow_to_vectors, atomic_path, read_table, write_json
from grappa.steps import extract
from grappa.steps import snapshot
from test_data import encode, png_header_only


def _valid(i: int, size: int = 40) -> Image.Image:
    return draw_image("shapes" if i % 2 else "stripes", i % 4, seed=100 + i, size=size)


def build_messy_source(root: Path) -> tuple[Path, Path, set[str], set[str]]:
    """A folder (domain 'dom') and a manifest (domain 'man'); returns them, the usable ids and the bad ids."""
    dom = root / "pool" / "dom"
    dom.mkdir(parents=True)
    good = set()
    for i in range(6):
        _valid(i).save(dom / f"v{i}.png")
        good.add(f"dom/dom/v{i}.png")
    (dom / "dup_of_v0.png").write_bytes((dom / "v0.png").read_bytes())  # same bytes, another name
    arr16 = (np.arange(40 * 40).reshape(40, 40) * 37).astype(np.uint16)
    Image.fromarray(arr16).save(dom / "sixteen.png")
    _valid(7).convert("P", palette=Image.Palette.ADAPTIVE, colors=16).save(dom / "palette.png")
    _valid(8).convert("RGBA").save(dom / "rgba.png")
    _valid(9).convert("CMYK").save(dom / "cmyk.jpg")
    _valid(10).convert("L").save(dom / "gray.jpg")
    good |= {f"dom/dom/{n}" for n in ("dup_of_v0.png", "sixteen.png", "palette.png", "rgba.png", "cmyk.jpg", "gray.jpg")}

    jpeg = encode(_valid(11, size=64), "JPEG", quality=90)
    bad_bytes = {
        "empty.jpg": b"",
        "text.jpg": b"hello, I am a text file\n" * 20,
        "corrupt.jpg": b"\xff\xd8\xff\xe0" + bytes(range(256)) * 3,
        "corrupt.png": b"\x89PNG\r\n\x1a\n" + b"\x01\x02garbage" * 30,
        "truncated.jpg": jpeg[: len(jpeg) // 2],
        "tiny.png": encode(_valid(12, size=8), "PNG"),
        "bomb.png": png_header_only(50_000, 50_000),
    }
    for name, data in bad_bytes.items():
        (dom / name).write_bytes(data)
    bad = {f"dom/dom/{n}" for n in bad_bytes}
    _valid(13).save(root / "outside.png")
    os.symlink(root / "outside.png", dom / "escape_link.png")
    bad.add("dom/dom/escape_link.png")

    man = root / "man"
    (man / "img").mkdir(parents=True)
    for c in range(2):
        for i in range(2):
            _valid(20 + 2 * c + i).save(man / "img" / f"q{c}{i}.png")
            good.add(f"man/img/q{c}{i}.png")
    rows = ["path,domain,class_id,split"]
    rows += [f"img/q{c}{i}.png,man,{c},query_db" for c in range(2) for i in range(2)]
    rows += ["img/missing.png,man,0,query_db", "../outside.png,man,,unlabeled"]
    (man / "manifest.csv").write_text("\n".join(rows) + "\n")
    bad |= {"man/img/missing.png", "man/../outside.png"}
    return root / "pool", man / "manifest.csv", good, bad


def _params(tmp_path: Path, sources, **sections):
    return parse_params(tiny_params_dict(tmp_path, sources, **sections))


def _tmp_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*.tmp")]


@pytest.fixture
def messy(tmp_path):
    return build_messy_source(tmp_path / "data")


def test_extract_skips_bad_files_with_reasons_and_keeps_the_rest(tmp_path, messy):
    folder, manifest, good, bad = messy
    params = _params(tmp_path, [folder, manifest], extract={"num_workers": 2})
    snapshot_report = snapshot.run(params)
    report = extract.run(params)

    out = Path(params.out_dir) / "extract"
    table = read_table(out / "features.parquet")
    ids = table.column("image_id").to_pylist()
    assert set(ids) == good and len(ids) == len(good)
    # the snapshot leaves out what it cannot use as a record, extract what it cannot decode
    skipped = {s["image_id"]: s["reason"] for s in snapshot_report["skipped"] + report["skipped"]}
    assert set(skipped) == bad
    assert {s["image_id"] for s in snapshot_report["skipped"]} == {
        "dom/dom/escape_link.png", "man/img/missing.png", "man/../outside.png"}
    assert "empty" in skipped["dom/dom/empty.jpg"]
    assert "undecodable" in skipped["dom/dom/text.jpg"]
    assert "undecodable" in skipped["dom/dom/truncated.jpg"]
    assert "too small" in skipped["dom/dom/tiny.png"]
    assert "too large" in skipped["dom/dom/bomb.png"]
    assert "outside" in skipped["dom/dom/escape_link.png"]
    assert "missing file" in skipped["man/img/missing.png"]
    assert "escapes" in skipped["man/../outside.png"]

    vectors = arrow_to_vectors(table.column("vector"))
    assert np.allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    row = {i: n for n, i in enumerate(ids)}
    assert np.array_equal(vectors[row["dom/dom/v0.png"]], vectors[row["dom/dom/dup_of_v0.png"]])
    assert not np.allclose(vectors[row["dom/dom/v0.png"]], vectors[row["dom/dom/v1.png"]])
    labels = dict(zip(ids, table.column("label").to_pylist()))
    splits = dict(zip(ids, table.column("split").to_pylist()))
    assert all(labels[i] is None and splits[i] == "unlabeled" for i in ids if i.startswith("dom/"))
    assert labels["man/img/q10.png"] == "1" and splits["man/img/q10.png"] == "query_db"

    # duplicate bytes: both rows kept, one forward pass
    assert report["images"] == len(good)
    assert report["computed"] == len(good) - 1
    assert report["from_cache"] == 0
    assert report["by_split"] == {"query_db": 4, "unlabeled": len(good) - 4}

    prefix = np.load(out / "prefix.npy")  # adapt_from_block=3 in the tiny params
    assert prefix.shape[0] == len(ids) and prefix.dtype == np.float16
    assert np.array_equal(prefix[row["dom/dom/v0.png"]], prefix[row["dom/dom/dup_of_v0.png"]])
    assert json.loads((out / "report.json").read_text())["computed"] == report["computed"]
    assert _tmp_files(tmp_path) == []


def test_extract_cache_computes_only_new_images(tmp_path):
    folder = tmp_path / "data" / "dom"
    folder.mkdir(parents=True)
    for i in range(5):
        _valid(i).save(folder / f"a{i}.png")
    params = _params(tmp_path, [folder.parent])
    first = snapshot_and_extract(params)
    assert (first["computed"], first["from_cache"]) == (5, 0)
    vectors_before = arrow_to_vectors(read_table(Path(params.out_dir) / "extract" / "features.parquet").column("vector"))

    for i in (5, 6):
        _valid(i).save(folder / f"a{i}.png")
    second = snapshot_and_extract(params)
    assert second["computed"] == 2
    assert second["from_cache"] == first["computed"]
    assert second["images"] == 7
    table = read_table(Path(params.out_dir) / "extract" / "features.parquet")
    ids = table.column("image_id").to_pylist()
    vectors = arrow_to_vectors(table.column("vector"))
    # cached vectors are exactly the ones computed the first time
    assert np.array_equal(vectors[[ids.index(f"dom/dom/a{i}.png") for i in range(5)]], vectors_before)

    third = snapshot_and_extract(params)
    assert (third["computed"], third["from_cache"]) == (0, 7)

    # another backbone setup must not reuse these vectors
    other = _params(tmp_path, [folder.parent], backbone={"pooling": "mac"})
    assert snapshot_and_extract(other)["computed"] == 7
    assert _tmp_files(tmp_path) == []


def test_extract_crash_while_writing_keeps_previous_artifacts(tmp_path, monkeypatch):
    folder = tmp_path / "data" / "dom"
    folder.mkdir(parents=True)
    for i in range(4):
        _valid(i).save(folder / f"a{i}.png")
    params = _params(tmp_path, [folder.parent])
    snapshot_and_extract(params)
    out = Path(params.out_dir) / "extract"
    before = {name: (out / name).read_bytes() for name in ("features.parquet", "prefix.npy", "report.json")}

    for i in (4, 5):  # the next run would change every output
        _valid(i).save(folder / f"a{i}.png")
    real_write_table = pq.write_table

    def crashing_write_table(table, where, *args, **kwargs):
        if "features" in str(where):
            Path(where).write_bytes(b"PAR1 half a file")  # mid-way
            raise OSError("simulated crash: disk full")
        return real_write_table(table, where, *args, **kwargs)

    monkeypatch.setattr(pq, "write_table", crashing_write_table)
    with pytest.raises(OSError, match="simulated crash"):
        snapshot_and_extract(params)
    monkeypatch.undo()

    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} changed by a failed run"
    assert read_table(out / "features.parquet").num_rows == 4
    assert _tmp_files(tmp_path) == []

    # the cache shard of the crashed run was complete: the rerun computes nothing new
    report = snapshot_and_extract(params)
    assert (report["computed"], report["from_cache"], report["images"]) == (0, 6, 6)
    assert np.load(out / "prefix.npy").shape[0] == read_table(out / "features.parquet").num_rows == 6


def test_extract_empty_or_all_bad_folder_is_a_clear_error(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        snapshot_and_extract(_params(tmp_path, [empty]))
    bad = tmp_path / "bad" / "dom"
    bad.mkdir(parents=True)
    (bad / "x.jpg").write_bytes(b"")
    (bad / "y.png").write_bytes(b"nope")
    with pytest.raises(ConfigError, match="none of the images could be decoded"):
        snapshot_and_extract(_params(tmp_path, [bad.parent]))
    assert not (tmp_path / "outputs" / "extract" / "features.parquet").exists()


# --------------------------------------------------------------------------- artifacts


def test_atomic_path_replaces_only_on_success(tmp_path):
    target = tmp_path / "sub" / "a.json"
    write_json(target, {"v": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text('{"v": 2, "trunc')
            raise RuntimeError("killed")
    assert json.loads(target.read_text()) == {"v": 1}
    assert _tmp_files(tmp_path) == []
    write_json(target, {"v": 3})
    assert json.loads(target.read_text()) == {"v": 3}
    old_umask = os.umask(0o022)
    try:
        write_json(tmp_path / "perm.json", {})
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE((tmp_path / "perm.json").stat().st_mode) == 0o644, "artifacts must not be private (0600)"


def test_atomic_paths_publish_together(tmp_path):
    a, b = tmp_path / "a.bin", tmp_path / "b.bin"
    a.write_bytes(b"old a")
    b.write_bytes(b"old b")
    with pytest.raises(ValueError):
        with artifacts.atomic_paths(a, b) as (ta, tb):
            ta.write_bytes(b"new a")
            raise ValueError("crash before b was written")
    assert (a.read_bytes(), b.read_bytes()) == (b"old a", b"old b")
    with artifacts.atomic_paths(a, b) as (ta, tb):
        ta.write_bytes(b"new a")
        tb.write_bytes(b"new b")
    assert (a.read_bytes(), b.read_bytes()) == (b"new a", b"new b")
    assert _tmp_files(tmp_path) == []


def test_vectors_arrow_roundtrip():
    x = np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)
    assert np.array_equal(arrow_to_vectors(artifacts.vectors_to_arrow(x)), x)


def test_killed_extraction_keeps_the_features_it_flushed(tmp_path, monkeypatch):
    """Features reach the cache every FLUSH_EVERY images, so a rerun after a crash starts where it stopped."""
    folder = tmp_path / "data" / "dom"
    folder.mkdir(parents=True)
    for i in range(6):
        _valid(i).save(folder / f"a{i}.png")
    params = _params(tmp_path, [folder.parent])
    monkeypatch.setattr(extract, "FLUSH_EVERY", 2)
    appended = []
    real_append = extract.FeatureCache.append

    def append_then_crash(self, hashes, vectors, prefixes):
        real_append(self, hashes, vectors, prefixes)
        appended.extend(hashes)
        if len(appended) >= 4:
            raise KeyboardInterrupt  # killed after the second flush

    monkeypatch.setattr(extract.FeatureCache, "append", append_then_crash)
    with pytest.raises(KeyboardInterrupt):
        snapshot_and_extract(params.model_copy(update={"extract": params.extract.model_copy(update={"batch_size": 2})}))
    assert not (Path(params.out_dir) / "extract" / "features.parquet").exists()  # nothing half-published
    monkeypatch.setattr(extract.FeatureCache, "append", real_append)
    report = snapshot_and_extract(params)
    assert (report["computed"], report["from_cache"]) == (2, 4)


def test_cached_prefix_through_the_adapted_blocks_gives_the_extracted_features(tmp_path, messy):
    """The prefix cache holds NCHW activations, whatever memory layout the model computes in."""
    import torch

    from grappa.core.backbones import create_backbone
    from grappa.core.model import ZERO_SHOT, GrappaModel

    folder, manifest, _, _ = messy
    params = _params(tmp_path, [folder, manifest])
    snapshot_and_extract(params)
    out = Path(params.out_dir) / "extract"
    vectors = arrow_to_vectors(read_table(out / "features.parquet").column("vector"))
    prefix = torch.from_numpy(np.load(out / "prefix.npy").astype(np.float32))
    backbone, _, _ = create_backbone(params.backbone)
    model = GrappaModel(backbone, params.backbone.adapt_from_block, [2], reduction=4).eval()
    assert model.channels_last  # a CNN computes in NHWC
    with torch.no_grad():
        again = model.forward_suffix(prefix, ZERO_SHOT)[0].numpy()
    cosine = (again * vectors).sum(axis=1)
    assert cosine.min() > 0.999, cosine.min()  # float16 cache: equal up to its rounding
