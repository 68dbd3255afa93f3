"""The HTML pages (report.html, search pages): what they show, and that data never becomes markup."""
import numpy as np
import pytest

from grappa.core.evaluation import embedding_map
from grappa.io import pages


def test_query_row_marks_right_and_wrong_and_escapes_the_data():
    query = {"thumb": None, "caption": ["class <b>cat</b>"]}
    hits = [{"rank": 1, "score": 0.91, "thumb": "data:image/jpeg;base64,AAAA", "image_id": "a.jpg", "label": "cat",
             "correct": True},
            {"rank": 2, "score": 0.5, "thumb": None, "image_id": "<img src=x onerror=alert(1)>", "label": "dog",
             "correct": False},
            {"rank": 3, "score": 0.4, "thumb": None, "image_id": "c.jpg"}]  # a search hit: no right/wrong
    row = pages.query_row(query, hits)
    assert row.count('<figure class="right">') == 1 and row.count('<figure class="wrong">') == 1
    assert "✓" in row and "✗" in row and "#1 · 0.910" in row and "could not be read" in row
    assert "<img src=x" not in row and "&lt;img src=x" in row and "&lt;b&gt;cat&lt;/b&gt;" in row


def test_embedding_map_draws_one_dot_per_point_and_keeps_captions_out_of_markup():
    xy = np.array([[0.0, 0.0], [1.0, 2.0], [3.0, 1.0]])
    html = pages.embedding_map(xy, ["a", "b", "a"], ["a / x", 'b / "><script>alert(1)</script>', "a / z"],
                               ["data:image/jpeg;base64,AAAA", None, None], width=200, height=100)
    assert html.count("<circle ") == 3 and html.count('class="key"') == 2
    assert "<script>alert" not in html and "&lt;script&gt;" in html
    assert "textContent" in html and "innerHTML" not in html  # the tooltip writes the caption as text
    xs = [float(part.split('"')[1]) for part in html.split('cx=')[1:]]
    assert min(xs) >= 0 and max(xs) <= 200  # inside the picture


def test_embedding_map_samples_at_most_max_points_and_is_seeded():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((60, 8)).astype(np.float32)
    rows, xy = embedding_map(vectors, 40, seed=3)
    assert len(rows) == 40 == len(np.unique(rows)) and xy.shape == (40, 2) and np.isfinite(xy).all()
    again_rows, again = embedding_map(vectors, 40, seed=3)
    assert (again_rows == rows).all() and np.allclose(again, xy)
    all_rows, _ = embedding_map(vectors[:5], 40, seed=3)  # fewer points than asked: all of them
    assert list(all_rows) == [0, 1, 2, 3, 4]


def test_a_thumbnail_that_could_not_be_read_is_tried_again(tmp_path):
    """grappa serve caches thumbnails, but not a failed read (an S3 blip must not blank an image for good)."""
    from conftest import draw_image
    from grappa import use

    late = tmp_path / "late.png"
    with pytest.raises(use._Unreadable):
        use._thumbnail(str(late), 1, 1 << 30, 1 << 20)
    draw_image("shapes", 0, seed=1).save(late)
    assert use._thumbnail(str(late), 1, 1 << 30, 1 << 20).startswith("data:image/jpeg;base64,")
