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
from grappa.cli import run_step
from grappa.config import ConfigError, parse_params
from grappa.io import artifacts
from grappa.io.artifacts import arrow_to_vectors, atomic_path, read_table, write_json
from grappa.io.features import FeatureCache, RowFile, RowFileWriter, open_prefix
from grappa.io.layout import Layout, Shard
from grappa.io.layout import layout as layout_of
from pipeline_steps import extract
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


def _pool(tmp_path: Path, n: int) -> Path:
    """A folder source of ``n`` valid images ``a<i>.png`` in the domain folder ``dom``; returns that folder."""
    folder = tmp_path / "data" / "dom"
    folder.mkdir(parents=True)
    for i in range(n):
        _valid(i).save(folder / f"a{i}.png")
    return folder


def _params(tmp_path: Path, sources, **sections):
    return parse_params(tiny_params_dict(tmp_path, sources, **sections))


def _prefix(params) -> np.ndarray:
    """Every row of the merged store's prefix activations."""
    prefix = open_prefix(Layout(params.out_dir))
    return prefix.take(np.arange(len(prefix)))


def _tmp_files(*roots: Path) -> list[Path]:
    return [p for root in roots if root.exists() for p in root.rglob("*.tmp")]


@pytest.fixture
def messy(tmp_path):
    return build_messy_source(tmp_path / "data")


def test_extract_skips_bad_files_with_reasons_and_keeps_the_rest(tmp_path, messy):
    folder, manifest, good, bad = messy
    params = _params(tmp_path, [folder, manifest], extract={"num_workers": 2})
    snapshot_report = run_step("snapshot", params)
    run_step("extract", params, Shard(0, 1))
    report = run_step("merge-features", params)

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

    prefix = _prefix(params)  # adapt_from_block=3 in the tiny params
    assert prefix.shape[0] == len(ids) and prefix.dtype == np.float16
    assert np.array_equal(prefix[row["dom/dom/v0.png"]], prefix[row["dom/dom/dup_of_v0.png"]])
    assert json.loads((out / "report.json").read_text())["computed"] == report["computed"]
    assert _tmp_files(tmp_path) == []


def test_extract_cache_computes_only_new_images(tmp_path):
    folder = _pool(tmp_path, 5)
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


def test_a_file_rewritten_after_the_snapshot_never_puts_its_features_under_the_old_hash(tmp_path):
    folder = _pool(tmp_path, 4)
    params = _params(tmp_path, [folder.parent])
    run_step("snapshot", params)
    _valid(9).save(folder / "a1.png")  # replaced between snapshot and extract (same name, other image)
    report = run_step("extract", params, Shard(0, 1))
    assert [(s["image_id"], s["reason"]) for s in report["skipped"]] == [
        ("dom/dom/a1.png", "changed since the snapshot (its bytes no longer have the snapshot's hash)")]
    # the next snapshot sees the new bytes: extracted under their own hash, equal to a clean run's
    second = snapshot_and_extract(params)
    assert second["skipped"] == [] and second["images"] == 4
    fresh = _params(tmp_path / "clean", [folder.parent])
    snapshot_and_extract(fresh)
    ours, clean = (read_table(Path(p.out_dir) / "extract" / "features.parquet") for p in (params, fresh))
    assert ours.column("content_hash").to_pylist() == clean.column("content_hash").to_pylist()
    assert np.allclose(arrow_to_vectors(ours.column("vector")), arrow_to_vectors(clean.column("vector")), atol=1e-6)


def test_extract_crash_while_writing_keeps_previous_artifacts(tmp_path, monkeypatch):
    folder = _pool(tmp_path, 4)
    params = _params(tmp_path, [folder.parent])
    snapshot_and_extract(params)
    out = Path(params.out_dir) / "extract"
    names = ("features.parquet", "prefix.json", "report.json", "parts/0-of-1/features.parquet",
             "parts/0-of-1/prefix.npy", "parts/0-of-1/report.json")
    before = {name: (out / name).read_bytes() for name in names}

    for i in (4, 5):  # the next run would change every output
        _valid(i).save(folder / f"a{i}.png")

    real_write = pq.ParquetWriter.write_table

    def crashing_write(self, *args, **kwargs):
        if "parts" in str(self.where):  # the cache shard is written; the part is not
            raise OSError("simulated crash: disk full")
        return real_write(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetWriter, "write_table", crashing_write)  # mid-way through the part
    with pytest.raises(OSError, match="simulated crash"):
        snapshot_and_extract(params)
    monkeypatch.undo()

    for name, data in before.items():
        assert (out / name).read_bytes() == data, f"{name} changed by a failed run"
    assert read_table(out / "features.parquet").num_rows == 4
    assert _tmp_files(tmp_path) == [] and not list(out.glob("parts/.*"))

    # the cache shard of the crashed run was complete: the rerun computes nothing new
    report = snapshot_and_extract(params)
    assert (report["computed"], report["from_cache"], report["images"]) == (0, 6, 6)
    assert len(_prefix(params)) == read_table(out / "features.parquet").num_rows == 6


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
    folder = _pool(tmp_path, 6)
    params = _params(tmp_path, [folder.parent])
    monkeypatch.setattr(extract, "FLUSH_EVERY", 2)
    appended = []
    real_append = extract.FeatureCache.append

    def append_then_crash(self, hashes, vectors, prefixes, reindex=True):
        real_append(self, hashes, vectors, prefixes, reindex)
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
    prefix = torch.from_numpy(_prefix(params).astype(np.float32))
    backbone, _, _ = create_backbone(params.backbone)
    model = GrappaModel(backbone, params.backbone.adapt_from_block, [2], reduction=4).eval()
    assert model.channels_last  # a CNN computes in NHWC
    with torch.no_grad():
        again = model.forward_suffix(prefix, ZERO_SHOT)[0].numpy()
    cosine = (again * vectors).sum(axis=1)
    assert cosine.min() > 0.999, cosine.min()  # float16 cache: equal up to its rounding


@pytest.mark.parametrize("backbone", ["tiny", "lite0"])
def test_openvino_extraction_gives_the_embeddings_and_prefix_of_torch(tmp_path, messy, backbone):
    """extract.runtime only moves the forward: per image, the OpenVINO embedding is the PyTorch one
    to cosine 0.9999 (the issue's bar; it measures > 0.99999) and the float16 prefix agrees too.
    lite0: the shipped backbone (ImageNet weights) on real images of each domain."""
    import shutil

    from conftest import SHARED_DATA

    sections = {}
    if backbone == "lite0":
        if not SHARED_DATA.is_dir():
            pytest.skip(f"the multidomain images are not at {SHARED_DATA}")
        folder = tmp_path / "real"
        for domain in sorted(p.name for p in SHARED_DATA.iterdir() if p.is_dir()):
            (folder / domain).mkdir(parents=True)
            for image in sorted((SHARED_DATA / domain).rglob("*.jpg"))[:6]:
                shutil.copy(image, folder / domain / f"{image.parent.name}_{image.name}")
        sources = [folder]
        sections["backbone"] = {"name": "tf_efficientnet_lite0", "weights": "auto", "image_size": 224,
                                "adapt_from_block": 11}
    else:
        sources = [messy[0], messy[1]]
    features = {}
    for runtime in ("torch", "openvino"):
        params = _params(tmp_path / runtime, sources, extract={"runtime": runtime}, **sections)
        report = snapshot_and_extract(params)
        assert report["computed"] >= 12 and report["per_shard"][0]["runtime"]["name"] == runtime  # noqa: PLR2004
        table = read_table(Path(params.out_dir) / "extract" / "features.parquet")
        features[runtime] = (table.column("image_id").to_pylist(), arrow_to_vectors(table.column("vector")),
                             _prefix(params).astype(np.float32))
    (ids, emb, acts), (ids_ov, emb_ov, acts_ov) = features["torch"], features["openvino"]
    assert ids == ids_ov
    assert _cosine(emb, emb_ov).min() > 0.9999, _cosine(emb, emb_ov).min()
    scale = np.abs(acts).max()
    assert np.abs(acts - acts_ov).max() < 1e-2 * scale  # float16 rounding apart
    if backbone == "lite0":  # and the embeddings before the one-resample transform: timm's, on torch
        reference = _timm_transform_embeddings(params, ids)
        assert _cosine(reference, emb_ov).min() > 0.9999, _cosine(reference, emb_ov).min()


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(axis=1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def _timm_transform_embeddings(params, ids: list[str]) -> np.ndarray:
    """Zero-shot embeddings of the images ``ids`` with timm's evaluation transform and the torch forward."""
    import torch
    from timm.data import create_transform

    from grappa.core.backbones import create_backbone
    from grappa.core.model import ZERO_SHOT
    from grappa.io.assemble import build_model

    backbone, pre, _ = create_backbone(params.backbone)
    model = build_model(params, backbone, ks=[]).eval()
    transform = create_transform((3, pre.image_size, pre.image_size), is_training=False, mean=pre.mean,
                                 std=pre.std, interpolation=pre.interpolation, crop_pct=pre.crop_pct)
    uris = dict(zip(*(read_table(Path(params.out_dir) / "extract" / "features.parquet")
                      .select(["image_id", "uri"]).to_pydict().values())))
    x = torch.stack([transform(Image.open(uris[i]).convert("RGB")) for i in ids])
    with torch.no_grad():
        return model.forward_suffix(model.forward_prefix(x), ZERO_SHOT)[0].numpy()


def test_auto_runtime_is_openvino_on_the_cpu_for_enough_images_else_torch():
    import torch

    from grappa.core.runtimes import AUTO_MIN_IMAGES, resolve_runtime

    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_runtime("auto", cpu, AUTO_MIN_IMAGES) == "openvino"
    assert resolve_runtime("auto", cpu, AUTO_MIN_IMAGES - 1) == "torch"  # the conversion would cost more
    assert resolve_runtime("auto", cuda, 10**6) == "torch"
    assert resolve_runtime("openvino", cpu, 1) == "openvino" and resolve_runtime("torch", cpu, 10**6) == "torch"
    with pytest.raises(ValueError, match="unknown runtime"):
        resolve_runtime("onnx", cpu, 1)


@pytest.mark.parametrize("block", [3, 4])
def test_openvino_requests_give_torch_outputs_in_order_whatever_the_batch_sizes(tmp_path, block):
    """From a block on a map of at most 1/16 of the input's side (4 here, Lite0's 11) a request holds
    REQUEST_IMAGES images, the prefix run on each alone and the suffix on all; before it, one image.
    Batches of 8, 3 and 13 images (the last request padded) come back in order, each under its key,
    with the outputs of the torch runtime (the activations in float16)."""
    import torch

    from grappa.core.augment import CentreCrop
    from grappa.core.backbones import create_backbone
    from grappa.core.runtimes import REQUEST_IMAGES, frozen_forward
    from grappa.io.assemble import build_model

    params = parse_params(tiny_params_dict(tmp_path, [tmp_path], backbone={"adapt_from_block": block}))
    backbone, preprocess, _ = create_backbone(params.backbone)
    crop, size = CentreCrop(preprocess), params.backbone.image_size
    generator = torch.Generator().manual_seed(0)
    batches = [(f"b{i}", torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=generator))
               for i, n in enumerate([8, 3, 13])]
    outputs = {}
    for runtime in ("torch", "openvino"):
        forward, info = frozen_forward(build_model(params, backbone, ks=[]).eval(), crop, runtime,
                                       torch.device("cpu"), 24)
        outputs[runtime] = list(forward(iter(batches)))
    assert info["request_images"] == (REQUEST_IMAGES if block == 4 else 1)  # noqa: PLR2004
    assert info["suffix_batched"] == (block == 4)  # noqa: PLR2004
    for (key, acts, emb), (key_ov, acts_ov, emb_ov), (name, x) in zip(outputs["torch"], outputs["openvino"], batches):
        assert key == key_ov == name and len(emb_ov) == len(acts_ov) == len(x)
        assert _cosine(emb.numpy(), emb_ov.numpy()).min() > 0.9999  # noqa: PLR2004
        assert acts_ov.dtype == torch.float16  # as the cache keeps them
        assert torch.allclose(acts.half().float(), acts_ov.float(), atol=1e-3 * float(acts.abs().max()))


# --------------------------------------------------------------------------- the feature store


def test_sharded_extraction_gives_the_features_of_an_unsharded_one(tmp_path, messy):
    """Three parts joined by merge-features: the same rows, in the same order, with the same vectors
    and activations as one part; the prefix stays in the parts (prefix.json lists them)."""
    folder, manifest, good, _ = messy
    one = _params(tmp_path / "one", [folder, manifest])
    three = _params(tmp_path / "three", [folder, manifest], extract={"shards": 3})
    reports = [snapshot_and_extract(p) for p in (one, three)]
    tables = [read_table(Path(p.out_dir) / "extract" / "features.parquet") for p in (one, three)]
    meta = [t.drop(["vector"]) for t in tables]
    assert meta[0].equals(meta[1]) and set(tables[0].column("image_id").to_pylist()) == good
    # other batches, other float summation order in the conv kernels: equal to float32 rounding
    vectors = [arrow_to_vectors(t.column("vector")) for t in tables]
    assert np.abs(vectors[0] - vectors[1]).max() < 1e-6
    assert np.array_equal(_prefix(one), _prefix(three))
    index = json.loads((Path(three.out_dir) / "extract" / "prefix.json").read_text())
    assert [part["path"] for part in index["parts"]] == [f"parts/{i}-of-3/prefix.npy" for i in range(3)]
    assert sum(part["rows"] for part in index["parts"]) == tables[0].num_rows
    assert reports[1]["shards"] == 3 and reports[1]["images"] == reports[0]["images"]
    assert sorted(s["image_id"] for s in reports[1]["skipped"]) == sorted(s["image_id"] for s in reports[0]["skipped"])

    # fewer shards next time: the stale parts go, the table is the same
    two = three.model_copy(update={"extract": three.extract.model_copy(update={"shards": 2})})
    snapshot_and_extract(two)
    parts = sorted(p.name for p in (Path(two.out_dir) / "extract" / "parts").iterdir())
    assert parts == ["0-of-2", "1-of-2"]
    assert read_table(Path(two.out_dir) / "extract" / "features.parquet").drop(["vector"]).equals(meta[0])


def test_shard_arguments_are_checked_against_the_params(tmp_path, messy):
    folder, manifest, _, _ = messy
    params = _params(tmp_path, [folder, manifest], extract={"shards": 2})
    run_step("snapshot", params)
    with pytest.raises(ConfigError, match="extract.shards is 2"):
        run_step("extract", params, Shard(0, 3))
    run_step("extract", params, Shard(1, 2))
    with pytest.raises(ConfigError, match=r"extract parts missing: run 'grappa extract --shard 0/2'"):
        run_step("merge-features", params)
    # a new snapshot (an image arrived) after part 1 was cut: part 1's rows are other images now
    run_step("extract", params, Shard(0, 2))
    run_step("merge-features", params)
    _valid(77).save(folder / "late.png")
    run_step("snapshot", params)
    run_step("extract", params, Shard(0, 2))
    with pytest.raises(ConfigError, match=r"extract part 1/2 was made from another data snapshot; "
                                          r"run 'grappa extract --shard 1/2'"):
        run_step("merge-features", params)
    run_step("extract", params, Shard(1, 2))
    run_step("merge-features", params)
    ids = read_table(layout_of(params).features).column("image_id").to_pylist()
    assert any(i.endswith("/late.png") for i in ids) and len(ids) == len(set(ids))
    with pytest.raises(ValueError):
        Shard.parse("2/2")


def test_row_files_are_written_in_chunks_and_read_by_rows(tmp_path):
    x = np.random.default_rng(0).standard_normal((50, 3, 2)).astype(np.float16)
    writer = RowFileWriter(tmp_path / "a.npy", 50, (3, 2), np.float16)
    for start in range(0, 50, 7):
        writer.write(x[start:start + 7])
    writer.close()
    assert np.array_equal(np.load(tmp_path / "a.npy"), x)  # a plain .npy
    rows = RowFile(tmp_path / "a.npy")
    picks = np.array([49, 3, 4, 5, 0, 3])
    assert np.array_equal(rows.take(picks), x[picks]) and np.array_equal(rows.read(10, 20), x[10:20])
    short = RowFileWriter(tmp_path / "b.npy", 5, (3, 2), np.float16)
    short.write(x[:2])
    with pytest.raises(ValueError, match="2 of 5 rows"):
        short.close()  # an incomplete file is never published
    assert not (tmp_path / "b.npy").exists() and not list(tmp_path.glob(".*tmp"))


def test_cache_compaction_merges_small_shards_and_reads_the_previous_format(tmp_path):
    rng = np.random.default_rng(0)
    cache = FeatureCache(tmp_path / "cache", row_shape=(2, 2))
    hashes = [f"{i:064x}" for i in range(40)]
    vectors = rng.standard_normal((40, 3)).astype(np.float32)
    prefixes = rng.standard_normal((40, 2, 2)).astype(np.float16)
    for start in range(0, 36, 4):  # nine small shards, as nine incremental runs leave
        cache.append(hashes[start:start + 4], vectors[start:start + 4], prefixes[start:start + 4])
    # one shard of the previous format: prefix bytes in a Parquet column
    import pyarrow as pa
    pq.write_table(pa.table({"content_hash": hashes[36:], "vector": artifacts.vectors_to_arrow(vectors[36:]),
                             "prefix": pa.array([p.tobytes() for p in prefixes[36:]], type=pa.binary())}),
                   tmp_path / "cache" / "shard-00000000000000-legacy.parquet")
    cache.append(hashes[:4], vectors[:4], prefixes[:4])  # a duplicate shard (two extractions raced)
    assert cache.index() == 40 and cache.needs_compaction(rows_per_shard=16)
    before = cache.gather(hashes[::-1])

    report = cache.compact(rows_per_shard=16)
    assert report == {"shards_before": 11, "shards_after": 3, "images": 40}
    assert len(list((tmp_path / "cache").glob("shard-*.npy"))) == 3
    assert not cache.needs_compaction(rows_per_shard=16)
    after = cache.gather(hashes[::-1])
    assert np.array_equal(after[0], vectors[::-1]) and np.array_equal(after[1], prefixes[::-1])
    assert np.array_equal(before[1], after[1])

    with cache.shared():  # an extraction holds the cache: compaction waits for another run
        assert "skipped" in FeatureCache(tmp_path / "cache").compact(rows_per_shard=4)


@pytest.mark.parametrize("damage", ["zero-byte table", "truncated table", "missing array", "short array"])
def test_a_damaged_cache_shard_is_quarantined_and_recomputed_never_read(tmp_path, damage):
    folder = _pool(tmp_path, 6)
    params = _params(tmp_path, [folder.parent])
    clean = snapshot_and_extract(params)
    before = read_table(Path(params.out_dir) / "extract" / "features.parquet")
    (shard,) = Path(params.extract.cache_dir).glob("*/shard-*.parquet")
    npy = shard.with_suffix(".npy")
    if damage == "zero-byte table":
        shard.write_bytes(b"")
    elif damage == "truncated table":
        shard.write_bytes(shard.read_bytes()[:-100])
    elif damage == "missing array":
        npy.unlink()
    else:  # a compaction or an append killed while writing the array
        npy.write_bytes(npy.read_bytes()[:-64])
    for part in (Path(params.out_dir) / "extract" / "parts").iterdir():  # make extract read the cache again
        for file in part.iterdir():
            file.unlink()
        part.rmdir()
    with pytest.warns(UserWarning, match="feature cache: shard-.* is damaged"):
        again = snapshot_and_extract(params)
    assert (again["computed"], again["from_cache"]) == (clean["computed"], 0)  # recomputed, none read
    assert (shard.parent / "quarantine" / shard.name).exists()
    after = read_table(Path(params.out_dir) / "extract" / "features.parquet")
    assert after.column("content_hash").equals(before.column("content_hash"))
    assert np.allclose(arrow_to_vectors(after.column("vector")), arrow_to_vectors(before.column("vector")), atol=1e-6)
    assert np.isfinite(_prefix(params)).all()


def test_a_file_grown_past_the_cap_after_the_snapshot_is_skipped_without_reading_it_whole(tmp_path, monkeypatch):
    folder = _pool(tmp_path, 3)
    params = _params(tmp_path, [folder.parent], data={"sources": [str(folder.parent)], "max_file_bytes": 50_000})
    run_step("snapshot", params)
    with open(folder / "a1.png", "ab") as f:  # grows past the cap between snapshot and extract
        f.write(b"\0" * 60_000)
    reads = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if str(path).endswith("a1.png") and "b" in mode:
            real_read = handle.read
            handle.read = lambda n=-1: reads.append(n) or real_read(n)
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    report = run_step("extract", params, Shard(0, 1))
    assert reads == [50_001]  # at most one byte past the cap is ever read
    assert [(s["image_id"], s["reason"]) for s in report["skipped"]] == [
        ("dom/dom/a1.png", f"{folder / 'a1.png'} is larger than 50000 bytes (data.max_file_bytes); skipped")]


def test_prefetched_keeps_the_order_raises_the_producers_error_and_stops_with_the_caller():
    import threading

    from grappa.io.datasets import prefetched

    assert list(prefetched(iter(range(50)), depth=2)) == list(range(50))

    def broken():
        yield 1
        raise OSError("disk gone")

    got = []
    with pytest.raises(OSError, match="disk gone"):
        for item in prefetched(broken()):
            got.append(item)
    assert got == [1]

    produced = []

    def endless():
        while True:
            produced.append(len(produced))
            yield produced[-1]

    for item in prefetched(endless(), depth=2):
        if item == 3:
            break
    assert not [t for t in threading.enumerate() if t.name == "prefetch"]  # the thread ended with the loop
    assert len(produced) <= 3 + 1 + 2 + 1  # never more than depth items ahead of the caller
