"""Image collections: manifests, folders and s3 prefixes in; decoded RGB images out.

Policy for bad input: a record that cannot be used (missing file, undecodable or truncated bytes,
an image too small or too large, a manifest path escaping its data root) is *skipped* and listed
with a reason in the step's report; every decodable image is converted to RGB. Nothing here raises
for a single bad image.

Labels of the ``unlabeled`` split are never read: the method must not see them.
"""
from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from PIL import Image, ImageFile, ImageOps

from grappa.io.storage import StorageError, is_s3, list_s3, read_bytes

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MANIFEST_EXTENSIONS = {".csv", ".parquet"}
SPLITS = {"unlabeled", "query_db"}
MANIFEST_COLUMNS = ("path", "domain", "split", "label", "class_id")  # what a manifest may hold

ImageFile.LOAD_TRUNCATED_IMAGES = False  # a truncated file is broken, not "mostly fine"


@dataclass(frozen=True)
class ImageRecord:
    image_id: str  # stable across runs: "<domain>/<path relative to its source>"
    uri: str
    domain: str
    split: str
    label: str | None = None


@dataclass(frozen=True)
class Skipped:
    image_id: str
    reason: str


class SourceError(ValueError):
    """A source as a whole is unusable (not found, unreadable manifest, bad columns)."""


# --------------------------------------------------------------------------- sources


def resolve_sources(sources: list[str], select: Callable[[list[ImageRecord]], list[ImageRecord]] | None = None
                    ) -> tuple[list[ImageRecord], list[Skipped]]:
    """Records of every source (``select`` applied to each source's own records), without repeats."""
    records: list[ImageRecord] = []
    skipped: list[Skipped] = []
    for source in sources:
        suffix = PurePosixPath(source).suffix.lower()
        if suffix in MANIFEST_EXTENSIONS:
            got, bad = _read_manifest(source)
        else:
            got, bad = _list_folder(source)
        records += select(got) if select else got
        skipped += bad
    seen: set[str] = set()
    unique = []
    for rec in records:
        if rec.image_id in seen:
            skipped.append(Skipped(rec.image_id, "listed twice"))
            continue
        seen.add(rec.image_id)
        unique.append(rec)
    return unique, skipped


def _folder_files(root: Path) -> tuple[list[Path], list[Skipped]]:
    """The files under ``root`` in sorted order, and what cannot be an image of the snapshot: a
    name that is not UTF-8 (no manifest, table or JSON can hold it), a dangling symlink or a symlink
    loop, an entry that vanished or cannot be read while the folder was listed. Skipped with the
    reason, never an error: the folder is written by others while we read it."""
    files, skipped = [], []

    def shown(path: Path) -> str:
        return os.fsencode(path.relative_to(root)).decode("utf-8", "backslashreplace")

    def unreadable_folder(err: OSError) -> None:  # a sub-folder removed or closed to us mid-walk
        skipped.append(Skipped(shown(Path(err.filename)), f"folder not listed ({err.strerror})"))

    for folder, dirnames, filenames in os.walk(root, onerror=unreadable_folder):  # symlinked folders not followed
        dirnames.sort()
        for name in filenames:
            path = Path(folder, name)
            try:
                str(path.relative_to(root)).encode("utf-8")
            except UnicodeEncodeError:
                skipped.append(Skipped(shown(path), "file name is not valid UTF-8"))
                continue
            try:
                if stat.S_ISREG(path.stat().st_mode):  # follows a symlink
                    files.append(path)
            except FileNotFoundError:
                skipped.append(Skipped(shown(path), "dangling symlink" if path.is_symlink()
                                       else "removed while the folder was listed"))
            except OSError as err:  # a symlink loop, no permission
                skipped.append(Skipped(shown(path), f"cannot be read ({err.strerror})"))
    return sorted(files), skipped


def _list_folder(source: str) -> tuple[list[ImageRecord], list[Skipped]]:
    """Every image under a folder or s3 prefix is unlabeled; its domain is the first sub-folder.

    Hidden files and folders are ignored; a symlink resolving outside the folder is skipped.
    """
    inside: list[bool]
    if is_s3(source):
        prefix = source.rstrip("/") + "/"
        uris = list(list_s3(prefix))
        rel_paths = [u[len(prefix):] for u in uris]
        inside = [True] * len(uris)
        unlisted: list[Skipped] = []
    else:
        root = Path(source)
        if not root.is_dir():
            raise SourceError(f"source not found (expected a manifest, folder or s3:// prefix): {source}")
        real_root = root.resolve()
        paths, unlisted = _folder_files(root)
        uris = [str(p) for p in paths]
        rel_paths = [str(PurePosixPath(p.relative_to(root))) for p in paths]
        inside = [p.resolve().is_relative_to(real_root) for p in paths]
        prefix = str(root.resolve())
    fallback_domain = PurePosixPath(prefix.rstrip("/")).name or "default"
    records, skipped = [], unlisted
    for uri, rel, ok in zip(uris, rel_paths, inside):
        parts = PurePosixPath(rel).parts
        if PurePosixPath(rel).suffix.lower() not in IMAGE_EXTENSIONS or any(p.startswith(".") for p in parts):
            continue
        domain = parts[0] if len(parts) > 1 else fallback_domain
        image_id = f"{domain}/{rel}"
        if not ok:
            skipped.append(Skipped(image_id, "symlink points outside the source folder"))
            continue
        records.append(ImageRecord(image_id, uri, domain, "unlabeled"))
    return records, skipped


def _read_manifest(source: str) -> tuple[list[ImageRecord], list[Skipped]]:
    try:
        raw = read_bytes(source)
    except StorageError as err:
        raise SourceError(str(err)) from None
    try:
        if source.lower().endswith(".parquet"):
            table = pq.read_table(io.BytesIO(raw))
        else:
            # every field as written: a domain "001" or a path "0001" must not become the number 1
            table = pacsv.read_csv(
                io.BytesIO(raw), convert_options=pacsv.ConvertOptions(
                    strings_can_be_null=True, column_types={name: pa.string() for name in MANIFEST_COLUMNS}))
    except (pa.ArrowInvalid, OSError) as err:
        raise SourceError(f"cannot parse manifest {source}: {str(err).splitlines()[0]}") from None
    if "path" not in table.column_names:
        raise SourceError(f"manifest {source} has no 'path' column (found: {', '.join(table.column_names)})")
    rows = table.to_pylist()
    root = PurePosixPath(source).parent if is_s3(source) else Path(source).resolve().parent
    default_domain = PurePosixPath(str(root)).name or "default"
    label_key = "label" if "label" in table.column_names else "class_id"
    records, skipped = [], []
    for row in rows:
        rel = row.get("path")
        domain = str(row.get("domain") or default_domain)
        split = str(row.get("split") or "unlabeled")
        if not rel:
            skipped.append(Skipped(f"{domain}/{rel}", "empty path in manifest"))
            continue
        rel = PurePosixPath(str(rel)).as_posix()  # "a//b.jpg" and "a/./b.jpg" are the file "a/b.jpg"
        image_id = f"{domain}/{rel}"
        if split not in SPLITS:
            skipped.append(Skipped(image_id, f"unknown split '{split}' (expected one of {sorted(SPLITS)})"))
            continue
        uri = _join_inside(root, rel)
        if uri is None:
            skipped.append(Skipped(image_id, "path escapes the manifest's data root"))
            continue
        # The adaptation pool is unlabeled by contract: its label column is never read.
        label = None if split == "unlabeled" else row.get(label_key)
        if split == "query_db" and label is None:
            skipped.append(Skipped(image_id, "query_db image without a label"))
            continue
        records.append(ImageRecord(image_id, uri, domain, split, None if label is None else str(label)))
    return records, skipped


def _join_inside(root: Path | PurePosixPath, rel: str) -> str | None:
    """Join a manifest path onto its root; None if it is absolute or escapes the root via '..'."""
    rel_path = PurePosixPath(rel)
    if rel_path.is_absolute() or ".." in rel_path.parts:
        return None
    if isinstance(root, PurePosixPath) and str(root).startswith("s3:"):
        return f"{str(root).replace('s3:/', 's3://', 1)}/{rel_path}"
    joined = (Path(root) / rel_path).resolve()
    if not joined.is_relative_to(Path(root)):
        return None  # a symlink pointing outside
    return str(joined)


def cap_per_domain(
    records: list[ImageRecord], max_unlabeled: int | None, max_query_db: int | None, seed: int
) -> list[ImageRecord]:
    """Deterministic subsample per domain: random unlabeled images, whole query_db classes.

    The result depends only on the set of records (not on their order in a manifest or listing):
    every (domain, split) group comes out sorted by image_id. The unlabeled sample keeps the images
    with the smallest seeded hash of their id (a bottom-k sample), so new images landing in a capped
    domain displace at most as many kept images as arrive, instead of reshuffling the whole sample.
    """
    by_key: dict[tuple[str, str], list[ImageRecord]] = defaultdict(list)
    for rec in records:
        by_key[(rec.domain, rec.split)].append(rec)
    kept: list[ImageRecord] = []
    for (domain, split), group in sorted(by_key.items()):
        group = sorted(group, key=lambda r: r.image_id)
        if split == "unlabeled":
            if max_unlabeled is not None and len(group) > max_unlabeled:
                rank = {r.image_id: hashlib.sha256(f"{seed}/{r.image_id}".encode()).digest() for r in group}
                group = sorted(sorted(group, key=lambda r: rank[r.image_id])[:max_unlabeled], key=lambda r: r.image_id)
        elif max_query_db is not None and len(group) > max_query_db:
            by_class: dict[str, list[ImageRecord]] = defaultdict(list)
            for rec in group:
                by_class[rec.label].append(rec)
            classes = sorted(by_class, key=_natural_key)
            group = []
            for cls in classes:
                if len(group) + len(by_class[cls]) > max_query_db and group:
                    break
                group += by_class[cls]
        kept += group
    return kept


def counts(values: Iterable[str]) -> dict[str, int]:
    """How many of each value (a split, a domain), sorted by value: the reports' ``by_*`` fields."""
    return dict(sorted(Counter(values).items()))


def _natural_key(label: str) -> tuple:
    return (0, int(label), "") if label.isdigit() else (1, 0, label)


# --------------------------------------------------------------------------- decoding


class ImageDecodeError(ValueError):
    pass


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# The decoders PIL may use: the formats of IMAGE_EXTENSIONS. Never PostScript/EPS (it runs Ghostscript
# on the file), PDF or any other plugin PIL would otherwise try on unknown bytes.
DECODERS = ("JPEG", "PNG", "BMP", "GIF", "WEBP", "TIFF")  # JPEG includes its MPO variant
# Formats we do not decode, told by their first bytes, so the skip reason names them.
_UNSUPPORTED = ((b"%!PS", "PostScript/EPS"), (b"\xc5\xd0\xd3\xc6", "EPS"), (b"%PDF", "PDF"),
                (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"), (b"\xff\x0a", "JPEG XL"), (b"8BPS", "Photoshop"))
_UNSUPPORTED_FTYP = {b"heic": "HEIC", b"heix": "HEIC", b"mif1": "HEIF", b"msf1": "HEIF", b"avif": "AVIF",
                     b"avis": "AVIF", b"jxl ": "JPEG XL"}


def unsupported_format(data: bytes) -> str | None:
    """The name of a known image format we do not decode, from the file's first bytes."""
    for magic, name in _UNSUPPORTED:
        if data.startswith(magic):
            return name
    if data[4:8] == b"ftyp":  # ISO base media (HEIF family)
        return _UNSUPPORTED_FTYP.get(data[8:12], None)
    return None


# The version of what decode_image returns for the same bytes; part of the feature cache's key, so a
# change (2: EXIF orientation applied) recomputes cached features instead of serving the old ones.
DECODE_VERSION = 2


def decode_image(data: bytes, min_side: int, max_pixels: int) -> Image.Image:
    """Bytes -> RGB PIL image (EXIF orientation applied), or ImageDecodeError with a short reason."""
    if not data:
        raise ImageDecodeError("empty file")
    other = unsupported_format(data)
    if other:
        raise ImageDecodeError(f"unsupported format ({other}); supported: {', '.join(DECODERS)}")
    try:
        with warnings.catch_warnings():
            # ``max_pixels`` is the limit; PIL's own DecompressionBombError (2x its default) still applies.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            Image.init()  # registers every plugin, so each of DECODERS is known (a no-op after the first call)
            image = Image.open(io.BytesIO(data), formats=DECODERS)
            width, height = image.size
            if width * height > max_pixels:
                raise ImageDecodeError(f"too large ({width}x{height} > {max_pixels} pixels)")
            if min(width, height) < min_side:
                raise ImageDecodeError(f"too small ({width}x{height}, min side {min_side})")
            if image.format == "JPEG":
                image.draft("RGB", (width, height))  # no-op at full size; keeps decoding in RGB
            image.load()
            # a phone photo stored sideways with an EXIF rotation is seen the way its viewer shows it
            return to_rgb(ImageOps.exif_transpose(image))
    except ImageDecodeError:
        raise
    except Image.DecompressionBombError as err:
        raise ImageDecodeError(f"too large (decompression bomb guard: {err})") from None
    except Exception as err:  # PIL raises OSError, SyntaxError, ValueError... for broken files
        raise ImageDecodeError(f"undecodable image ({type(err).__name__}: {str(err)[:120]})") from None


def to_rgb(image: Image.Image) -> Image.Image:
    """Any PIL mode -> RGB. Alpha is composited on white; 16-bit is rescaled, not clipped."""
    if image.mode == "RGB":
        return image
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        import numpy as np

        arr = np.asarray(image)  # 2 or 4 bytes a pixel, as decoded
        hi = float(max(arr.max(), 0)) or 1.0
        out = np.empty(arr.shape, np.uint8)
        # in blocks of ~256k pixels: float64 of the whole image would be 8 bytes a pixel (512 MB at max_pixels)
        rows = max(1, (1 << 18) // max(arr.shape[1], 1))
        for start in range(0, arr.shape[0], rows):
            block = np.clip(arr[start:start + rows].astype(np.float64), 0.0, None)
            out[start:start + rows] = (block / hi * 255.0).astype(np.uint8)
        return Image.fromarray(out, "L").convert("RGB")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")  # L, 1, CMYK, YCbCr, F, ...
