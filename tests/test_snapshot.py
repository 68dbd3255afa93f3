"""Step 1, the data snapshot: what changed at the sources, read as little as possible, stable caps."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import draw_image, make_collection, tiny_params_dict
from grappa.config import ConfigError, parse_params
from grappa.io import manifests
from grappa.io.artifacts import read_table
from grappa.io.layout import layout
from grappa.io.sources import ImageRecord, cap_per_domain
from pipeline_steps import snapshot


@pytest.fixture
def reads(monkeypatch) -> list[str]:
    """Every file the snapshot step reads (to hash it)."""
    seen: list[str] = []
    for name in ("read_bytes", "file_sha256"):  # s3 objects are read whole, local files streamed
        real = getattr(manifests, name)
        monkeypatch.setattr(manifests, name, lambda uri, real=real: seen.append(uri) or real(uri))
    return seen


def _folder(root: Path, n: int) -> Path:
    (root / "dom").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        draw_image("shapes", i % 4, seed=i).save(root / "dom" / f"a{i}.png")
    return root


def test_unchanged_files_are_not_read_again_and_give_the_same_manifest(tmp_path, reads):
    folder = _folder(tmp_path / "pool", 5)
    params = parse_params(tiny_params_dict(tmp_path, [folder]))
    first = snapshot.run(params)
    assert (first["images"], first["files_read"], len(reads)) == (5, 5, 5)
    assert first["since_previous"] == {"new": 5, "changed": 0, "removed": 0, "unchanged": 0}
    manifest = layout(params).manifest.read_bytes()

    reads.clear()
    second = snapshot.run(params)
    assert (second["files_read"], reads) == (0, [])
    assert layout(params).manifest.read_bytes() == manifest  # nothing downstream reruns
    assert second["digest"] == first["digest"]

    # a touched file (same bytes, new mtime) is read again, and only it; its content is unchanged
    target = folder / "dom" / "a2.png"
    os.utime(target, ns=(1_000_000_000, 1_000_000_000))
    third = snapshot.run(params)
    assert reads == [str(target)]
    assert third["since_previous"]["unchanged"] == 5 and third["digest"] == first["digest"]


def test_a_rewrite_that_keeps_size_and_mtime_is_still_read_again(tmp_path, reads):
    folder = _folder(tmp_path / "pool", 3)
    params = parse_params(tiny_params_dict(tmp_path, [folder]))
    first = snapshot.run(params)
    target = folder / "dom" / "a1.png"
    before = target.stat()
    data = bytearray(target.read_bytes())
    data[-20] ^= 0xFF  # other bytes, same size
    target.write_bytes(bytes(data))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))  # the mtime set back
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)
    reads.clear()
    second = snapshot.run(params)
    assert reads == [str(target)]
    assert second["since_previous"]["changed"] == 1 and second["digest"] != first["digest"]


def test_new_changed_and_removed_images(tmp_path, reads):
    folder = _folder(tmp_path / "pool", 4)
    params = parse_params(tiny_params_dict(tmp_path, [folder]))
    snapshot.run(params)
    reads.clear()
    draw_image("stripes", 1, seed=99).save(folder / "dom" / "a0.png")  # changed content
    draw_image("stripes", 2, seed=98).save(folder / "dom" / "new.png")
    (folder / "dom" / "a3.png").unlink()
    report = snapshot.run(params)
    assert report["since_previous"] == {"new": 1, "changed": 1, "removed": 1, "unchanged": 2}
    assert sorted(Path(uri).name for uri in reads) == ["a0.png", "new.png"]
    rows = read_table(layout(params).manifest).to_pylist()
    assert [r["image_id"] for r in rows] == sorted(r["image_id"] for r in rows)
    assert all(r["mtime_ns"] and r["size"] and r["etag"] is None and len(r["content_hash"]) == 64 for r in rows)


def test_missing_listed_file_is_skipped_with_a_reason(tmp_path):
    (manifest,) = make_collection(tmp_path / "data", domains=("shapes",), classes=2, per_class=2, unlabeled=2)
    (manifest.parent / "images" / "u_0.png").unlink()
    report = snapshot.run(parse_params(tiny_params_dict(tmp_path, [manifest])))
    assert report["images"] == 5
    [(image_id, reason)] = [(s["image_id"], s["reason"]) for s in report["skipped"]]
    assert image_id == "shapes/images/u_0.png" and reason.startswith("missing file")


def test_empty_sources_are_one_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no images found"):
        snapshot.run(parse_params(tiny_params_dict(tmp_path, [tmp_path / "empty"])))


def test_caps_apply_per_source_so_dropped_images_always_count(tmp_path):
    """A capped manifest domain does not displace images dropped into another source of that domain."""
    (manifest,) = make_collection(tmp_path / "data", domains=("shapes",), classes=2, per_class=2, unlabeled=10)
    drop = tmp_path / "incoming"
    (drop / "shapes").mkdir(parents=True)
    for i in range(3):
        draw_image("shapes", i, seed=500 + i).save(drop / "shapes" / f"d{i}.png")
    raw = tiny_params_dict(tmp_path, [manifest, drop], data={"max_unlabeled_per_domain": 4})
    report = snapshot.run(parse_params(raw))
    ids = [r["image_id"] for r in read_table(layout(parse_params(raw)).manifest).to_pylist()]
    assert report["by_split"]["unlabeled"] == 4 + 3
    assert {f"shapes/shapes/d{i}.png" for i in range(3)} <= set(ids)


def test_capped_sample_changes_by_at_most_as_many_images_as_arrive():
    records = [ImageRecord(f"d/u{i}", "x", "d", "unlabeled") for i in range(200)]
    kept = {r.image_id for r in cap_per_domain(records, 50, None, seed=0)}
    grown = records + [ImageRecord(f"d/new{i}", "x", "d", "unlabeled") for i in range(10)]
    kept_after = {r.image_id for r in cap_per_domain(grown, 50, None, seed=0)}
    assert len(kept_after) == 50
    assert len(kept - kept_after) == len(kept_after - kept) <= 10  # a random re-sample would replace ~37


def test_a_file_above_the_byte_cap_is_skipped_by_its_size_never_read(tmp_path, reads):
    folder = _folder(tmp_path / "pool", 3)
    (folder / "dom" / "huge.png").write_bytes(b"\x89PNG" + b"\x00" * 5000)
    params = parse_params({**tiny_params_dict(tmp_path, [folder]),
                           "data": {"sources": [str(folder)], "max_file_bytes": 4096}})
    report = snapshot.run(params)
    assert report["images"] == 3 and str(folder / "dom" / "huge.png") not in reads
    [(image_id, reason)] = [(s["image_id"], s["reason"]) for s in report["skipped"]]
    assert image_id == "dom/dom/huge.png" and reason == "5004 bytes, above data.max_file_bytes (4096)"
