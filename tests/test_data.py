"""Sources, manifests and image decoding: bad records are skipped with a reason, never a crash."""
from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from grappa.io.sources import (
    ImageDecodeError,
    ImageRecord,
    SourceError,
    cap_per_domain,
    decode_image,
    resolve_sources,
)


def encode(image: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    image.save(buf, fmt, **kw)
    return buf.getvalue()


def rgb_image(size: int = 32, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8))


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims width x height (no pixel data): what a decompression bomb looks like to open()."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + chunk(b"IEND", b"")


def write_manifest(path: Path, rows: list[dict]) -> Path:
    columns = sorted({k for row in rows for k in row})
    lines = [",".join(columns)] + [",".join(str(row.get(c, "")) for c in columns) for row in rows]
    path.write_text("\n".join(lines) + "\n")
    return path


# --------------------------------------------------------------------------- decoding


def test_decode_valid_rgb_roundtrip():
    img = rgb_image(24)
    out = decode_image(encode(img, "PNG"), min_side=16, max_pixels=10_000)
    assert out.mode == "RGB" and out.size == (24, 24)
    assert np.array_equal(np.asarray(out), np.asarray(img))


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", "empty file"),
        (b"this is a text file, not an image\n" * 10, "undecodable"),
        (b"\xff\xd8\xff\xe0" + bytes(range(256)) * 4, "undecodable"),  # JPEG magic + garbage
        (b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 40, "undecodable"),  # PNG magic + garbage
        (png_header_only(100_000, 100_000), "too large"),  # 1e10 pixels: PIL's bomb guard
    ],
    ids=["zero-byte", "text", "corrupt-jpeg", "corrupt-png", "bomb-header"],
)
def test_decode_bad_bytes_raise_decode_error_with_reason(data, reason):
    with pytest.raises(ImageDecodeError) as info:
        decode_image(data, min_side=16, max_pixels=64_000_000)
    assert reason in str(info.value)


def test_decode_truncated_jpeg():
    data = encode(rgb_image(64), "JPEG", quality=90)
    with pytest.raises(ImageDecodeError, match="undecodable"):
        decode_image(data[: len(data) // 2], min_side=16, max_pixels=10**8)
    assert decode_image(data, min_side=16, max_pixels=10**8).size == (64, 64)  # the full file is fine


def test_decode_too_small_and_max_pixels():
    tiny = encode(rgb_image(8), "PNG")
    with pytest.raises(ImageDecodeError, match="too small"):
        decode_image(tiny, min_side=16, max_pixels=10**8)
    assert decode_image(tiny, min_side=8, max_pixels=10**8).size == (8, 8)
    big = encode(rgb_image(64), "PNG")  # 4096 pixels
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(big, min_side=16, max_pixels=4095)
    assert decode_image(big, min_side=16, max_pixels=4096).size == (64, 64)


def test_decode_header_bomb_within_pil_limit_is_refused_by_max_pixels():
    # 12000 x 10000 = 1.2e8 pixels: above PIL's warning threshold, below its hard error; our limit decides.
    with pytest.raises(ImageDecodeError, match="too large"):
        decode_image(png_header_only(12_000, 10_000), min_side=16, max_pixels=64_000_000)


def test_decode_16bit_png_is_rescaled_not_clipped():
    arr = (np.arange(32 * 32, dtype=np.uint32).reshape(32, 32) * 60).astype(np.uint16)  # 0 .. 61380
    img = Image.fromarray(arr)
    assert img.mode == "I;16"
    out = decode_image(encode(img, "PNG"), min_side=16, max_pixels=10**6)
    rgb = np.asarray(out)
    assert out.mode == "RGB" and rgb.shape == (32, 32, 3)
    assert rgb[..., 0].min() == 0 and rgb[..., 0].max() == 255
    assert len(np.unique(rgb[..., 0])) > 200, "16-bit gradient collapsed (clipped instead of rescaled)"
    assert np.array_equal(rgb[..., 0], rgb[..., 1])
    assert np.all(np.diff(rgb[..., 0].reshape(-1).astype(int)) >= 0), "order of intensities not kept"


def test_decode_palette_png():
    img = rgb_image(32).convert("P", palette=Image.Palette.ADAPTIVE, colors=8)
    data = encode(img, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "P"
    out = decode_image(data, min_side=16, max_pixels=10**6)
    assert out.mode == "RGB"
    assert np.array_equal(np.asarray(out), np.asarray(img.convert("RGB")))


def test_decode_rgba_composited_on_white():
    arr = np.zeros((32, 32, 4), dtype=np.uint8)
    arr[..., 0] = 200  # red
    arr[:16, :, 3] = 0  # top half fully transparent
    arr[16:, :, 3] = 255  # bottom half opaque
    out = np.asarray(decode_image(encode(Image.fromarray(arr, "RGBA"), "PNG"), min_side=16, max_pixels=10**6))
    assert out.shape == (32, 32, 3)
    assert np.all(out[:16] == 255), "transparent pixels must become white"
    assert np.all(out[16:] == (200, 0, 0))


def test_decode_cmyk_jpeg_and_grayscale():
    cmyk = Image.new("RGB", (32, 32), (10, 200, 30)).convert("CMYK")
    data = encode(cmyk, "JPEG", quality=95)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    out = decode_image(data, min_side=16, max_pixels=10**6)
    assert out.mode == "RGB"
    assert np.allclose(np.asarray(out)[16, 16], (10, 200, 30), atol=12)

    gray = Image.new("L", (32, 32), 77)
    for fmt in ("JPEG", "PNG"):
        out = decode_image(encode(gray, fmt), min_side=16, max_pixels=10**6)
        assert out.mode == "RGB"
        assert np.allclose(np.asarray(out), 77, atol=2)


@pytest.mark.parametrize("mode, fmt", [("LA", "PNG"), ("1", "PNG"), ("I", "TIFF"), ("F", "TIFF"), ("LAB", "TIFF")])
def test_decode_other_modes_become_rgb(mode, fmt):
    img = Image.new("RGB", (20, 20), (90, 120, 150)).convert("L").convert(mode) if mode != "LAB" \
        else Image.new("LAB", (20, 20), (50, 0, 0))
    out = decode_image(encode(img, fmt), min_side=16, max_pixels=10**6)
    assert out.mode == "RGB" and out.size == (20, 20)


# --------------------------------------------------------------------------- manifests


def test_manifest_labels_of_unlabeled_split_are_never_read(tmp_path):
    (tmp_path / "img").mkdir()
    for name in ("a.png", "b.png", "c.png"):
        rgb_image(20).save(tmp_path / "img" / name)
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"path": "img/a.png", "domain": "d1", "class_id": 7, "split": "unlabeled"},
        {"path": "img/b.png", "domain": "d1", "class_id": 3, "split": "query_db"},
        {"path": "img/c.png", "domain": "d1", "class_id": 5, "split": "unlabeled"},
    ])
    records, skipped = resolve_sources([str(manifest)])
    assert skipped == []
    by_id = {r.image_id: r for r in records}
    assert set(by_id) == {"d1/img/a.png", "d1/img/b.png", "d1/img/c.png"}
    assert by_id["d1/img/a.png"].label is None and by_id["d1/img/a.png"].split == "unlabeled"
    assert by_id["d1/img/c.png"].label is None
    assert by_id["d1/img/b.png"].label == "3" and by_id["d1/img/b.png"].split == "query_db"
    assert Path(by_id["d1/img/b.png"].uri) == (tmp_path / "img" / "b.png").resolve()


def test_parquet_manifest_with_label_column_and_default_domain(tmp_path):
    root = tmp_path / "mydomain"
    root.mkdir()
    rgb_image(20).save(root / "x.png")
    rgb_image(20).save(root / "y.png")
    pq.write_table(pa.table({"path": ["x.png", "y.png"], "label": ["cat", "dog"],
                             "split": ["query_db", "unlabeled"]}), root / "m.parquet")
    records, skipped = resolve_sources([str(root / "m.parquet")])
    assert skipped == []
    assert [(r.image_id, r.domain, r.split, r.label) for r in records] == [
        ("mydomain/x.png", "mydomain", "query_db", "cat"),
        ("mydomain/y.png", "mydomain", "unlabeled", None),
    ]


def test_manifest_paths_escaping_the_root_are_skipped_with_reason(tmp_path):
    root = tmp_path / "dom"
    (root / "img").mkdir(parents=True)
    outside = tmp_path / "secret.png"
    rgb_image(20).save(outside)
    rgb_image(20).save(root / "img" / "ok.png")
    os.symlink(outside, root / "img" / "link.png")  # inside by name, outside by target
    os.symlink(root / "img" / "ok.png", root / "img" / "inner_link.png")  # a symlink within the root is fine
    manifest = write_manifest(root / "manifest.csv", [
        {"path": "img/ok.png", "split": "unlabeled"},
        {"path": "../secret.png", "split": "unlabeled"},
        {"path": str(outside), "split": "unlabeled"},
        {"path": "img/link.png", "split": "unlabeled"},
        {"path": "img/inner_link.png", "split": "unlabeled"},
        {"path": "img/../../secret.png", "split": "unlabeled"},
    ])
    records, skipped = resolve_sources([str(manifest)])
    assert sorted(r.image_id for r in records) == ["dom/img/inner_link.png", "dom/img/ok.png"]
    reasons = {s.image_id: s.reason for s in skipped}
    assert set(reasons) == {"dom/../secret.png", f"dom/{outside}", "dom/img/link.png", "dom/img/../../secret.png"}
    assert all("escapes" in r for r in reasons.values())


def test_manifest_row_problems_are_skipped_not_fatal(tmp_path):
    manifest = write_manifest(tmp_path / "manifest.csv", [
        {"path": "a.png", "split": "unlabeled", "class_id": ""},
        {"path": "b.png", "split": "train", "class_id": 1},
        {"path": "c.png", "split": "query_db", "class_id": ""},
        {"path": "", "split": "unlabeled", "class_id": 1},
    ])
    records, skipped = resolve_sources([str(manifest)])
    assert [r.image_id.rsplit("/", 1)[-1] for r in records] == ["a.png"]  # a missing file is the hash step's job
    reasons = sorted(s.reason for s in skipped)
    assert any("unknown split 'train'" in r for r in reasons)
    assert any("without a label" in r for r in reasons)
    assert any("empty path" in r for r in reasons)


def test_same_image_listed_twice_is_kept_once(tmp_path):
    rgb_image(20).save(tmp_path / "a.png")
    manifest = write_manifest(tmp_path / "m.csv", [{"path": "a.png", "domain": "d", "split": "unlabeled"}])
    records, skipped = resolve_sources([str(manifest), str(manifest)])
    assert len(records) == 1
    assert [s.reason for s in skipped] == ["listed twice"]


def test_bad_manifests_are_source_errors(tmp_path):
    with pytest.raises(SourceError, match="missing file"):
        resolve_sources([str(tmp_path / "absent.csv")])
    (tmp_path / "nopath.csv").write_text("file,split\na.png,unlabeled\n")
    with pytest.raises(SourceError, match="no 'path' column"):
        resolve_sources([str(tmp_path / "nopath.csv")])
    (tmp_path / "broken.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(SourceError, match="cannot parse"):
        resolve_sources([str(tmp_path / "broken.parquet")])
    with pytest.raises(SourceError, match="source not found"):
        resolve_sources([str(tmp_path / "no_such_folder")])


# --------------------------------------------------------------------------- folders


def test_folder_source_domains_from_subfolders(tmp_path):
    root = tmp_path / "pool"
    for rel in ("birds/a.jpg", "birds/sub/b.png", "cars/c.JPG", "top.png"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        rgb_image(20).save(root / rel, "PNG" if rel.endswith("png") else "JPEG")
    (root / "cars" / "notes.txt").write_text("not an image")
    (root / "cars" / ".hidden.jpg").write_bytes(b"x")
    (root / ".cache").mkdir()
    rgb_image(20).save(root / ".cache" / "thumb.png")
    records, skipped = resolve_sources([str(root)])
    got = {(r.image_id, r.domain, r.split, r.label) for r in records}
    assert got == {
        ("birds/birds/a.jpg", "birds", "unlabeled", None),
        ("birds/birds/sub/b.png", "birds", "unlabeled", None),
        ("cars/cars/c.JPG", "cars", "unlabeled", None),
        ("pool/top.png", "pool", "unlabeled", None),  # no sub-folder: the folder's own name
    }
    assert skipped == []


def test_folder_symlink_pointing_outside_is_skipped(tmp_path):
    root = tmp_path / "pool" / "dom"
    root.mkdir(parents=True)
    rgb_image(20).save(root / "ok.png")
    rgb_image(20).save(tmp_path / "outside.png")
    os.symlink(tmp_path / "outside.png", root / "evil.png")
    records, skipped = resolve_sources([str(tmp_path / "pool")])
    assert [r.image_id for r in records] == ["dom/dom/ok.png"]
    assert [(s.image_id, "outside" in s.reason) for s in skipped] == [("dom/dom/evil.png", True)]


def test_empty_folder_gives_no_records(tmp_path):
    (tmp_path / "empty").mkdir()
    assert resolve_sources([str(tmp_path / "empty")]) == ([], [])


# --------------------------------------------------------------------------- capping


def _records(domain: str, split: str, n: int, classes: int | None = None) -> list[ImageRecord]:
    return [ImageRecord(f"{domain}/{split}/{i:03d}", f"/x/{domain}/{i}", domain, split,
                        None if classes is None else str(i % classes)) for i in range(n)]


def test_cap_per_domain_keeps_whole_query_classes_and_is_deterministic():
    records = (_records("a", "query_db", 30, classes=6)  # 6 classes x 5 images
               + _records("b", "query_db", 8, classes=2)
               + _records("a", "unlabeled", 50) + _records("b", "unlabeled", 10))
    kept = cap_per_domain(records, max_unlabeled=20, max_query_db=12, seed=3)
    assert kept == cap_per_domain(list(reversed(records)), max_unlabeled=20, max_query_db=12, seed=3)

    query_a = [r for r in kept if r.domain == "a" and r.split == "query_db"]
    assert sorted({r.label for r in query_a}) == ["0", "1"]  # 5 + 5 = 10 <= 12; a third class would exceed
    assert len(query_a) == 10
    assert len([r for r in kept if r.domain == "b" and r.split == "query_db"]) == 8  # under the cap: untouched
    unl_a = [r.image_id for r in kept if r.domain == "a" and r.split == "unlabeled"]
    assert len(unl_a) == 20 and len(set(unl_a)) == 20
    assert len([r for r in kept if r.domain == "b" and r.split == "unlabeled"]) == 10

    other_seed = cap_per_domain(records, max_unlabeled=20, max_query_db=12, seed=4)
    assert [r.image_id for r in other_seed if r.domain == "a" and r.split == "unlabeled"] != unl_a
    uncapped = cap_per_domain(records, None, None, seed=0)
    assert len(uncapped) == len(records) and set(uncapped) == set(records)


def test_cap_per_domain_natural_class_order_and_oversized_first_class():
    records = [ImageRecord(f"d/{c}/{i}", "u", "d", "query_db", c) for c in ("10", "2", "9") for i in range(3)]
    kept = cap_per_domain(records, None, max_query_db=6, seed=0)
    assert [r.label for r in kept] == ["2"] * 3 + ["9"] * 3  # 2 < 9 < 10 numerically
    big = [ImageRecord(f"d/0/{i}", "u", "d", "query_db", "0") for i in range(5)]
    assert len(cap_per_domain(big + records, None, max_query_db=4, seed=0)) == 5  # a whole class, never a part


def test_manifest_fields_are_read_as_written_and_one_file_is_one_image(tmp_path):
    """A domain '001' stays '001' (not the number 1); 'a//x.png', './a/x.png' and 'a/x.png' are one image."""
    (tmp_path / "a").mkdir()
    rgb_image(20).save(tmp_path / "a" / "x.png")
    rgb_image(20).save(tmp_path / "0007", format="PNG")
    (tmp_path / "m.csv").write_text("path,domain,split,label\na//x.png,001,query_db,007\n./a/x.png,001,query_db,007\n"
                                    "a/x.png,001,query_db,007\n0007,001,unlabeled,\n")
    records, skipped = resolve_sources([str(tmp_path / "m.csv")])
    assert [(r.image_id, r.domain, r.label) for r in records] == [("001/a/x.png", "001", "007"),
                                                                ("001/0007", "001", None)]
    assert [s.reason for s in skipped] == ["listed twice", "listed twice"]


def test_folder_listing_skips_odd_names_dangling_links_and_vanishing_files(tmp_path, monkeypatch):
    root = tmp_path / "pool"
    (root / "d").mkdir(parents=True)
    rgb_image(20).save(root / "d" / "ok.png")
    rgb_image(20).save(root / "d" / os.fsdecode(b"caf\xe9.png"), format="PNG")
    (root / "d" / "link.png").symlink_to(root / "d" / "missing.png")
    rgb_image(20).save(root / "d" / "soon_gone.png")
    real_stat = Path.stat

    def vanishing(self, *args, **kwargs):
        if self.name == "soon_gone.png":
            raise FileNotFoundError(2, "No such file or directory", str(self))  # ENOENT, as the OS says it
        return real_stat(self, *args, **kwargs)

    monkeypatch.setattr(Path, "stat", vanishing)
    records, skipped = resolve_sources([str(root)])
    assert [r.image_id for r in records] == ["d/d/ok.png"]
    assert sorted((s.image_id, s.reason) for s in skipped) == [
        ("d/caf\\xe9.png", "file name is not valid UTF-8"), ("d/link.png", "dangling symlink"),
        ("d/soon_gone.png", "removed while the folder was listed")]


@pytest.mark.parametrize("data, name", [
    (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\n" + b"0 0 moveto\n" * 20, "PostScript/EPS"),
    (b"%PDF-1.7\n" + b"x" * 200, "PDF"),
    (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00" + b"x" * 200, "HEIC"),
    (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00" + b"x" * 200, "AVIF"),
])
def test_formats_outside_the_allow_list_are_skipped_by_name_never_decoded(data, name, monkeypatch):
    """EPS is decoded by running Ghostscript on the file: PIL must never be asked to open one."""
    def no_plugin(*_args, **_kwargs):
        raise AssertionError("PIL was asked to open a format outside the allow-list")

    monkeypatch.setattr(Image, "open", no_plugin)
    with pytest.raises(ImageDecodeError, match=f"unsupported format \\({name}\\)"):
        decode_image(data, min_side=16, max_pixels=64_000_000)


def test_exif_orientation_is_applied():
    wide = Image.new("RGB", (40, 20), (200, 0, 0))
    wide.paste((0, 0, 200), (0, 0, 20, 20))  # left half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buffer = io.BytesIO()
    wide.save(buffer, "JPEG", quality=95, exif=exif.tobytes())
    shown = decode_image(buffer.getvalue(), min_side=16, max_pixels=64_000_000)
    assert shown.size == (20, 40)  # upright, as a viewer shows it
    top = np.asarray(shown)[:10].mean(axis=(0, 1))
    assert top[2] > 150 and top[0] < 60, "the blue left half is on top after a 90 degree clockwise turn"


def test_folder_listing_skips_a_symlink_loop_and_an_unreadable_entry(tmp_path):
    root = tmp_path / "pool"
    (root / "d").mkdir(parents=True)
    rgb_image(20).save(root / "d" / "ok.png")
    (root / "d" / "loop.png").symlink_to(root / "d" / "loop.png")  # points at itself
    records, skipped = resolve_sources([str(root)])
    assert [r.image_id for r in records] == ["d/d/ok.png"]
    [(image_id, reason)] = [(s.image_id, s.reason) for s in skipped]
    assert image_id == "d/loop.png" and reason.startswith("cannot be read (Too many levels of symbolic links")


def test_decode_16bit_image_converts_in_bounded_memory_with_the_same_pixels():
    import tracemalloc

    side = 2400  # 5.8M pixels: float64 of the whole image would be 46 MB
    arr = (np.random.default_rng(0).integers(0, 40_000, size=(side, side))).astype(np.uint16)
    data = encode(Image.fromarray(arr), "PNG")
    tracemalloc.start()
    out = decode_image(data, min_side=16, max_pixels=10**8)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    expected = (np.clip(arr.astype(np.float64), 0, None) / arr.max() * 255.0).astype(np.uint8)  # the rescale, whole
    assert np.array_equal(np.asarray(out)[..., 0], expected)
    assert peak < 6 * side * side, f"{peak / side / side:.1f} bytes a pixel"  # whole-image float64: 17
