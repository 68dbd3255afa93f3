"""Embed, index, search: the catalogue index built with the model that serves, grown incrementally."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from conftest import draw_image, make_collection, snapshot_and_extract, tiny_params_dict
from grappa import use
from grappa.cli import run_all
from grappa.config import ConfigError, parse_params
from grappa.io import catalogue, servable
from grappa.io.layout import layout
from pipeline_steps import index
from test_tracking import run_cli


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """The seven steps on a tiny collection plus a folder source (tracking off: the workspace model serves)."""
    root = tmp_path_factory.mktemp("index")
    manifests = make_collection(root / "data")
    (root / "drop" / "shapes").mkdir(parents=True)
    raw = tiny_params_dict(root, [*manifests, root / "drop"], tracking={"enabled": False})
    run_all(parse_params(raw))
    return root, raw


@pytest.fixture
def work(pipeline, tmp_path):
    """A private copy of the pipeline's outputs (the tests change the catalogue, the index and the champion)."""
    root, raw = pipeline
    shutil.copytree(root / "outputs", tmp_path / "outputs")
    shutil.copytree(root / "drop", tmp_path / "drop")
    raw = {**raw, "out_dir": str(tmp_path / "outputs"),
           "data": {**raw["data"], "sources": [*raw["data"]["sources"][:-1], str(tmp_path / "drop")]}}
    return parse_params(raw), raw


def _meta(params) -> dict:
    return json.loads((layout(params).index / catalogue.META_FILE).read_text())


def _other_model(params, folder: Path) -> servable.Servable:
    """The pipeline's model with one fusion weight changed, exported elsewhere: another model."""
    model = servable.load(layout(params).model)
    next(p for name, p in model.model.named_parameters() if name.startswith("fusion.")).data.add_(0.5)
    servable.export(model.model, params, model.preprocess, folder)
    return servable.load(folder)


def test_catalogue_images_find_themselves_first(work):
    params, _ = work
    meta = _meta(params)
    model = servable.load(layout(params).model)
    assert meta["count"] == 64 and meta["model_sha256"] == model.digest and meta["factory"] == "Flat"
    vectors_index, rows, _ = catalogue.read(layout(params).index)
    uris = [rows[i]["uri"] for i in (0, 17, 40, 63)]
    # queries go through the full image path, the index was filled from the cached prefix: same embedding
    scores, ids = catalogue.search(vectors_index, model.embed(uris), top_k=3)
    assert [rows[i]["uri"] for i in ids[:, 0]] == uris
    assert scores[:, 0].min() > 0.999


def test_new_catalogue_images_are_added_not_rebuilt(work):
    params, raw = work
    for i in range(2):
        draw_image("shapes", i, seed=900 + i).save(Path(raw["data"]["sources"][-1]) / "shapes" / f"new{i}.png")
    assert snapshot_and_extract(params)["computed"] == 2
    meta = index.run(params)
    assert (meta["embedded"], meta["count"]) == (2, 66)
    assert meta["action"].startswith("added 2 images")
    assert index.run(params)["embedded"] == 0  # nothing new: nothing embedded


def test_another_champion_rebuilds_and_a_foreign_model_is_refused(work, tmp_path, capsys):
    params, _ = work
    other = _other_model(params, tmp_path / "other")
    with pytest.raises(ConfigError, match="was built by model .* not by"):
        use.search_command(params, [str(tmp_path / "q.png")], 3, None, str(tmp_path / "other"))
    servable.write_champion(params, other.digest, str(tmp_path / "other"))
    meta = index.run(params)
    assert meta["action"].startswith("rebuilt (the index was built by model")
    assert (meta["model_sha256"], meta["embedded"]) == (other.digest, 64)


def test_search_cli_prints_ranked_ids_paths_and_scores(work, tmp_path):
    params, raw = work
    query = raw["data"]["sources"][0].replace("manifest.csv", "images/q_1_0.png")
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    rc, out, err = run_cli(["search", query, "--top-k", "2", "--params", str(tmp_path / "params.yaml")])
    assert rc == 0, err
    lines = out.strip().splitlines()
    assert lines[0] == f"query 1: {query}" and "rank" in lines[1]
    rank, score, image_id, uri = lines[2].split()
    assert (rank, image_id, uri) == ("1", "shapes/images/q_1_0.png", query) and float(score) > 0.999
    rc, _, err = run_cli(["search", str(tmp_path / "absent.png"), "--params", str(tmp_path / "params.yaml")])
    assert rc == 2 and "absent.png" in err and "Traceback" not in err


def test_search_html_is_a_self_contained_page_of_the_queries_and_their_neighbours(work, tmp_path):
    import re

    params, raw = work
    queries = [raw["data"]["sources"][0].replace("manifest.csv", f"images/q_{c}_0.png") for c in (1, 2)]
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    page = tmp_path / "out" / "search.html"
    rc, out, err = run_cli(["search", *queries, "--top-k", "3", "--html", str(page),
                            "--params", str(tmp_path / "params.yaml")])
    assert rc == 0, err
    assert f"page of the queries and their neighbours -> {page}" in out
    text = page.read_text(encoding="utf-8")
    assert text.count("<section>") == 2 and text.count('class="query"') == 2
    images = re.findall(r'<img src="([^"]+)"', text)
    assert len(images) == 2 * (1 + 3) and all(src.startswith("data:image/jpeg;base64,") for src in images)
    assert "http" not in text  # nothing the page would fetch
    assert text.count('<span class="score">#1 · ') == 2 and "shapes/images/q_1_0.png" in text
    labels = re.findall(r'<span class="muted">([^<]+)</span>', text)
    # each neighbour's domain, and its class where the catalogue has one (unlabeled images have none)
    assert len(labels) == 6 and all(label.split(" / ")[0] in ("shapes", "stripes") for label in labels), labels
    assert labels[0] == "shapes / 1" and labels[3] == "shapes / 2"  # the first hit of each query is itself
    _looks_like_a_page_in_chromium(page, tmp_path / "search.png")


def test_serve_answers_an_upload_in_a_browser_and_over_the_json_api(work, tmp_path):
    """`grappa serve` on loopback: a real browser chooses an image on the upload page and sees its
    neighbours as thumbnails; the JSON API answers the same hits; user mistakes are one line."""
    import re
    import subprocess
    import sys
    import time

    import requests

    from browser import Browser

    params, raw = work
    limit = 200_000  # data.max_file_bytes: the test images are a few kB
    (tmp_path / "params.yaml").write_text(json.dumps({**raw, "data": {**raw["data"], "max_file_bytes": limit}}))
    query = raw["data"]["sources"][0].replace("manifest.csv", "images/q_2_0.png")
    # --port 0: the server takes a free port and says which in its first line
    server = subprocess.Popen([sys.executable, "-m", "grappa", "--params", str(tmp_path / "params.yaml"), "serve",
                               "--port", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    browser = None
    try:
        first = server.stdout.readline()  # printed once the index and model are loaded ('' if it died)
        found = re.match(r"grappa serve: (http://127\.0\.0\.1:(\d+))/ ", first)
        assert found and int(found.group(2)) > 0, first + server.communicate()[1][-2000:]
        url = found.group(1)
        deadline = time.monotonic() + 180
        while True:
            try:
                health = requests.get(f"{url}/api/health", timeout=5).json()
                break
            except requests.ConnectionError:
                assert server.poll() is None and time.monotonic() < deadline, server.communicate()[1][-2000:]
                time.sleep(0.5)
        assert health["images"] == 64 and health["model_sha256"] == _meta(params)["model_sha256"]
        with open(query, "rb") as image:
            hits = requests.post(f"{url}/api/search", files={"image": image}, data={"top_k": "3"}, timeout=60).json()["hits"]
        assert [h["rank"] for h in hits] == [1, 2, 3] and hits[0]["uri"] == query and hits[0]["score"] > 0.999
        assert hits[0]["label"] == "2" and hits[0]["domain"] == "shapes"
        not_image = requests.post(f"{url}/api/search", files={"image": ("notes.txt", b"hello")}, timeout=60)
        assert not_image.status_code == 400 and not_image.json() == {
            "error": "notes.txt is not an image that can be read (JPEG, PNG, WebP, ...)"}
        too_many = requests.post(f"{url}/api/search", files={"image": open(query, "rb")}, data={"top_k": "101"}, timeout=60)
        assert too_many.status_code == 400 and "top_k must be from 1 to 100" in too_many.json()["error"]
        too_big = requests.post(f"{url}/api/search", files={"image": ("big.png", b"\0" * (2 * limit))}, timeout=60)
        assert too_big.status_code == 413 and "larger than data.max_file_bytes (200,000 bytes)" in too_big.json()["error"]
        # on loopback only loopback names are answered: a rebound DNS name gets nothing
        assert requests.get(f"{url}/api/health", headers={"Host": "attacker.example"}, timeout=30).status_code == 400

        browser = Browser(tmp_path / "profile")
        browser.open(url)
        assert browser.evaluate("document.title") == "grappa search"
        browser.choose_file("input[type=file]", Path(query))
        browser.click_and_wait("button[type=submit]")
        text = browser.evaluate("document.body.innerText")
        assert "q_2_0.png: the 5 nearest catalogue images" in text and "#1 · 1.000" in text, text
        assert browser.evaluate("document.querySelectorAll('figure').length") == 1 + 5
        loaded = browser.evaluate("[...document.images].filter(i => i.complete && i.naturalWidth > 0).length")
        assert loaded == 1 + 5  # the query and every neighbour shown as a picture
        shot = browser.screenshot(tmp_path / "serve.png")
        _has_pictures(shot, at_least=0.002)  # six 48-pixel images on a 1280x760 page
    finally:
        if browser is not None:
            browser.close()
        server.terminate()
        server.wait(timeout=30)


def _has_pictures(shot: Path, at_least: float = 0.005) -> None:
    import numpy as np
    from PIL import Image

    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    colourful = (pixels.max(axis=2) - pixels.min(axis=2)) > 60  # the thumbnails; the page itself is grey on white
    assert colourful.mean() > at_least, colourful.mean()


def _looks_like_a_page_in_chromium(page: Path, shot: Path) -> None:
    """Headless Chromium renders ``page`` offline into a screenshot with pictures on it (skipped, with the
    reason, where Debian's chromium is not installed)."""
    import shutil
    import subprocess

    import numpy as np
    from PIL import Image

    browser = shutil.which("chromium")
    if browser is None:
        pytest.skip("no headless browser: apt-get install chromium")
    done = subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
                           "--window-size=1100,700", f"--screenshot={shot}", page.as_uri()],
                          capture_output=True, text=True, timeout=120, cwd=shot.parent)
    assert done.returncode == 0 and shot.is_file(), done.stderr[-2000:]
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=np.float32)
    assert pixels.shape[:2] == (700, 1100)
    _has_pictures(shot)


def test_an_upload_is_decoded_once_for_its_thumbnail_and_its_query(work, monkeypatch):
    """The server decodes an upload one time, then shrinks and embeds that image; the hits are those
    of the same bytes searched from the CLI's path."""
    from fastapi.testclient import TestClient

    from grappa import serve
    from grappa.io import pages, sources

    params, raw = work
    searcher = use.Searcher(params)
    query = Path(raw["data"]["sources"][0].replace("manifest.csv", "images/q_2_0.png"))
    expected = [hit["image_id"] for hit in searcher.search([query.read_bytes()], 3)[0]]
    upload, decode, calls = query.read_bytes(), sources.decode_image, []
    for module in (sources, pages):  # every decode of the upload, wherever it is called from
        monkeypatch.setattr(module, "decode_image",
                            lambda data, *a, **k: calls.append(data == upload) or decode(data, *a, **k))
    client = TestClient(serve.create_app(searcher), base_url="http://127.0.0.1")
    form = {"files": {"image": ("q.png", upload, "image/png")}, "data": {"top_k": "3"}}
    answer = client.post("/api/search", **form).json()
    assert calls.count(True) == 1 and [hit["image_id"] for hit in answer["hits"]] == expected
    client.post("/", **form)  # the page: the hits' thumbnails (the query is one of them) are read once, then kept
    calls.clear()
    page = client.post("/", **form)
    assert page.status_code == 200 and "the 3 nearest catalogue images" in page.text, page.text[-500:]
    assert calls.count(True) == 1  # the upload, once for its thumbnail and its query


def test_a_mixed_or_foreign_index_set_is_refused_then_rebuilt(work, tmp_path):
    """A catalogue.faiss that is not the one index.json was published with (a writer stopped between
    renames, a file copied in) is never parsed by faiss: search refuses it in one line, index rebuilds."""
    params, raw = work
    folder = layout(params).index
    (tmp_path / "params.yaml").write_text(json.dumps(raw))
    query = raw["data"]["sources"][0].replace("manifest.csv", "images/q_1_0.png")
    for damage in (lambda f: f.write_bytes(b"\x00" * 64), lambda f: f.write_bytes(f.read_bytes()[:-8])):
        damage(catalogue.version_folder(folder, json.loads((folder / catalogue.META_FILE).read_text()))
               / catalogue.INDEX_FILE)
        rc, _, err = run_cli(["search", query, "--params", str(tmp_path / "params.yaml")])
        assert rc == 2 and "is not one set: catalogue.faiss does not match index.json" in err, err
        assert "Traceback" not in err
        meta = index.run(params)
        assert meta["action"].startswith("rebuilt") and meta["count"] == 64
        assert catalogue.read(folder)[0].ntotal == 64
    # index.json itself truncated or replaced: one line from search, and index publishes a new set over it
    for text in ('{"version": "v-', "[]"):
        (folder / catalogue.META_FILE).write_text(text)
        rc, _, err = run_cli(["search", query, "--params", str(tmp_path / "params.yaml")])
        assert rc == 2 and "is not one set: index.json" in err and "Traceback" not in err, err
        meta = index.run(params)
        assert meta["action"].startswith("rebuilt") and catalogue.read(folder)[0].ntotal == 64


def test_index_factories(work):
    params, raw = work
    hnsw = parse_params({**raw, "index": {"factory": "HNSW16", "search_params": "efSearch=32"}})
    meta = index.run(hnsw)
    assert meta["action"].startswith("rebuilt (index.factory changed") and meta["count"] == 64
    searcher, rows, _ = catalogue.read(layout(hnsw).index)
    model = servable.load(layout(hnsw).model)
    _, ids = catalogue.search(searcher, model.embed([rows[5]["uri"]]), 1, "efSearch=32")
    assert ids[0, 0] == 5
    with pytest.raises(ConfigError, match="index.factory: faiss cannot build 'IVF256,Flat' over 64 vectors"):
        index.run(parse_params({**raw, "index": {"factory": "IVF256,Flat"}}))
    with pytest.raises(ConfigError, match="index.factory"):
        index.run(parse_params({**raw, "index": {"factory": "NoSuchIndex"}}))


def test_embed_writes_one_row_per_readable_image(work, tmp_path, capsys):
    params, raw = work
    folder = Path(raw["data"]["sources"][0]).parent / "images"
    (tmp_path / "broken").mkdir()
    shutil.copy(next(folder.glob("q_0_0.png")), tmp_path / "broken" / "ok.png")
    (tmp_path / "broken" / "bad.png").write_bytes(b"not a png")
    out = tmp_path / "emb.parquet"
    use.embed_command(params, [str(tmp_path / "broken")], str(out), None)
    table = pq.read_table(out)
    assert table.column("image_id").to_pylist() == ["broken/ok.png"]
    assert len(table.column("embedding")[0].as_py()) == 256
    sha = table.schema.metadata[b"grappa.model_sha256"].decode()
    assert sha == servable.load(layout(params).model).digest
    assert "skipped broken/bad.png" in capsys.readouterr().out


def test_catalogue_given_as_its_own_sources(work, tmp_path):
    params, raw = work
    shop = tmp_path / "catalogue" / "shop"
    shop.mkdir(parents=True)
    for i in range(3):
        draw_image("stripes", i, seed=800 + i).save(shop / f"item{i}.png")
    catalogue = parse_params({**raw, "index": {"sources": [str(shop.parent)]}})
    meta = index.run(catalogue)
    assert meta["action"] == "rebuilt (catalogue images were removed or changed)"  # the snapshot's 64 are not in it
    assert (meta["count"], meta["embedded"]) == (3, 3)  # read and embedded from the images themselves
    draw_image("stripes", 3, seed=803).save(shop / "item3.png")
    meta = index.run(catalogue)
    assert meta["action"].startswith("added 1 images") and meta["count"] == 4


def test_the_index_is_switched_in_one_rename_and_a_reader_of_the_previous_set_still_finds_it(work):
    """Each publish is a new version folder, then index.json replaced: a search that read the old
    index.json keeps a whole set, and versions older than the previous one are removed."""
    params, _ = work
    folder = layout(params).index
    before = json.loads((folder / catalogue.META_FILE).read_text())
    searcher, rows, _ = catalogue.read(folder)
    catalogue.write(folder, searcher, rows[::-1], {**before, "action": "reordered"})  # other rows: another set
    after = json.loads((folder / catalogue.META_FILE).read_text())
    assert after["version"] != before["version"]
    old_base = catalogue.version_folder(folder, before)
    assert old_base.is_dir() and catalogue.file_sha256(old_base / catalogue.CATALOGUE_FILE) == before["files"][catalogue.CATALOGUE_FILE]
    assert catalogue.read(folder)[1] == rows[::-1]
    catalogue.write(folder, searcher, rows, before)  # a third publish: the first set's files again
    # the current and the previous set, and the index step's report.json beside them
    assert sorted(p.name for p in folder.iterdir()) == sorted([catalogue.META_FILE, "report.json", before["version"],
                                                               after["version"]])
    catalogue.write(folder, searcher, rows[1:] + rows[:1], before)
    assert after["version"] not in {p.name for p in folder.iterdir()}  # two back: removed
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no staging left behind
