import math
import pickle

import numpy as np
import pytest
from PIL import Image

from grappa.core.revisited import (
    compute_ap,
    compute_map,
    crop_query,
    evaluate_revisited,
    find_dataset,
    format_revisited,
    load_ground_truth,
    protocol_gnd,
)


def _single(ranking, ok, junk=()):
    """compute_map on one query given as a ranking of database ids."""
    ranks = np.asarray(ranking)[:, None]
    return compute_map(ranks, [{'ok': np.asarray(ok), 'junk': np.asarray(junk, dtype=np.int64)}])


# Research note §3.8 test vectors (database ids 0-9).
@pytest.mark.parametrize('ranking, ok, junk, adjusted, ap, prk', [
    ([3, 5, 7, 0, 1, 2, 4, 6, 8, 9], [3, 7], [], [0, 2], 0.791667, [1.0, 2 / 3, 2 / 3]),
    ([3, 5, 7, 0, 1, 2, 4, 6, 8, 9], [3, 7], [5], [0, 1], 1.0, [1.0, 1.0, 1.0]),
    ([1, 3, 0, 2, 4, 5, 6, 7, 8, 9], [3, 9], [0], [1, 8], 0.211806, [0.0, 0.2, 2 / 9]),
])
def test_note_test_vectors(ranking, ok, junk, adjusted, ap, prk):
    assert compute_ap(np.asarray(adjusted), len(ok)) == pytest.approx(ap, abs=1e-6)
    m, aps, pr, prs = _single(ranking, ok, junk)
    assert m == pytest.approx(ap, abs=1e-6)
    assert aps[0] == pytest.approx(ap, abs=1e-6)
    np.testing.assert_allclose(pr, prk, atol=1e-12)
    np.testing.assert_allclose(prs[0], prk, atol=1e-12)


def test_trapezoid_differs_from_textbook_ap():
    # Positives at ranks {0, 2}: textbook AP = (1 + 2/3) / 2 = 0.8333, trapezoid = 0.79167.
    assert compute_ap(np.array([0, 2]), 2) == pytest.approx((1 + 1 + 0.5 + 2 / 3) / 4)
    # Positives absent from a (truncated) ranking still count in the recall denominator.
    assert compute_ap(np.array([0]), 2) == pytest.approx(0.5)


def test_empty_queries_excluded_from_means():
    ranks = np.tile(np.arange(5)[:, None], (1, 2))
    gnd = [{'ok': np.array([0]), 'junk': np.array([], dtype=np.int64)},
           {'ok': np.array([], dtype=np.int64), 'junk': np.array([1])}]
    m, aps, pr, prs = compute_map(ranks, gnd)
    assert m == 1.0 and math.isnan(aps[1]) and np.isnan(prs[1]).all()
    np.testing.assert_allclose(pr, [1.0, 1.0, 1.0])
    m_all_empty, _, pr_all_empty, _ = compute_map(ranks[:, 1:], gnd[1:])
    assert math.isnan(m_all_empty) and np.isnan(pr_all_empty).all()


def _toy_gnd():
    return {
        'imlist': [f'db_{i}' for i in range(10)],
        'qimlist': ['q_0', 'q_1'],
        'gnd': [
            {'easy': [2, 5], 'hard': [7], 'junk': [1], 'bbx': [1.0, 2.0, 11.0, 7.0]},
            {'easy': [0], 'hard': [], 'junk': [], 'bbx': [0.0, 0.0, 5.0, 5.0]},
        ],
    }


def _toy_similarity():
    sim = np.zeros((2, 10), dtype=np.float32)
    ranking0 = [1, 2, 7, 0, 5, 3, 4, 6, 8, 9]
    sim[0, ranking0] = 1.0 - 0.1 * np.arange(10)
    sim[1] = np.arange(10)  # query 1 ranks db 9 first and its only positive (db 0) last
    return sim


def test_protocol_membership():
    gnd = _toy_gnd()['gnd']
    e, m, h = (protocol_gnd(gnd, p)[0] for p in ('easy', 'medium', 'hard'))
    assert sorted(e['ok']) == [2, 5] and sorted(e['junk']) == [1, 7]  # hard ignored in Easy
    assert sorted(m['ok']) == [2, 5, 7] and sorted(m['junk']) == [1]
    assert sorted(h['ok']) == [7] and sorted(h['junk']) == [1, 2, 5]  # easy ignored in Hard
    with pytest.raises(ValueError):
        protocol_gnd(gnd, 'extreme')


def test_evaluate_revisited_by_hand():
    res = evaluate_revisited(_toy_similarity(), _toy_gnd())
    # Query 0, ranking [1, 2, 7, 0, 5, ...]; query 1 has its single easy positive at rank 9.
    q1 = (0.0 + 0.1) / 2  # trapezoid AP of one positive at 0-based rank 9
    # Easy: ok {2, 5}, junk {1, 7} -> adjusted ranks [0, 2].
    assert res['easy']['map'] == pytest.approx((0.791667 + q1) / 2, abs=1e-6)
    assert res['easy']['mp@1'] == pytest.approx((1.0 + 0.0) / 2)
    assert res['easy']['mp@5'] == pytest.approx((2 / 3 + 0.0) / 2)
    assert res['easy']['mp@10'] == pytest.approx((2 / 3 + 0.1) / 2)
    # Medium: ok {2, 5, 7}, junk {1} -> adjusted ranks [0, 1, 3].
    ap_m = (1.0 + 1.0 + (2 / 3 + 3 / 4) / 2) / 3
    assert res['medium']['map'] == pytest.approx((ap_m + q1) / 2)
    assert res['medium']['mp@5'] == pytest.approx((3 / 4 + 0.0) / 2)
    # Hard: ok {7}, junk {1, 2, 5} -> adjusted rank [0]; query 1 has no hard image -> excluded.
    assert res['hard'] == {'map': 1.0, 'mp@1': 1.0, 'mp@5': 1.0, 'mp@10': 1.0}
    # The bare per-query list is accepted too, and the summary line is in percent.
    assert evaluate_revisited(_toy_similarity(), _toy_gnd()['gnd']) == res
    assert 'H: 100.00' in format_revisited('toy', res)
    with pytest.raises(ValueError):
        evaluate_revisited(_toy_similarity()[:1], _toy_gnd())


def test_fixture_pkl_loads_and_evaluates(tmp_path):
    data_dir = tmp_path / 'roxford5k'
    (data_dir / 'jpg').mkdir(parents=True)
    with open(data_dir / 'gnd_roxford5k.pkl', 'wb') as f:
        pickle.dump(_toy_gnd(), f)
    images_dir, gnd_path = find_dataset(tmp_path, 'roxford5k')
    assert images_dir == data_dir / 'jpg' and gnd_path == data_dir / 'gnd_roxford5k.pkl'
    cfg = load_ground_truth(gnd_path)
    assert cfg['qimlist'] == ['q_0', 'q_1'] and len(cfg['imlist']) == 10
    assert evaluate_revisited(_toy_similarity(), cfg)['hard']['map'] == 1.0


def test_find_dataset_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match='not bundled'):
        find_dataset(tmp_path, 'rparis6k')


@pytest.mark.parametrize('mutate, message', [
    (lambda g: g.pop('qimlist'), 'qimlist'),
    (lambda g: g['gnd'][1].pop('junk'), r'gnd\[1\].*junk'),
    (lambda g: g['gnd'][0].pop('bbx'), r'gnd\[0\].*bbx'),
    (lambda g: g['gnd'].pop(), 'len'),
    (lambda g: g['gnd'][0].update(easy=[10]), 'indices'),
])
def test_malformed_ground_truth(tmp_path, mutate, message):
    gnd = _toy_gnd()
    mutate(gnd)
    path = tmp_path / 'gnd_bad.pkl'
    with open(path, 'wb') as f:
        pickle.dump(gnd, f)
    with pytest.raises(ValueError, match=message):
        load_ground_truth(path)


def test_crop_query():
    pixels = np.arange(10 * 20 * 3, dtype=np.uint8).reshape(10, 20, 3)
    image = Image.fromarray(pixels)
    crop = crop_query(image, [2, 3, 12, 8])
    assert crop.size == (10, 5)
    np.testing.assert_array_equal(np.asarray(crop), pixels[3:8, 2:12])
    # Boxes running off the image are clipped, not padded.
    assert crop_query(image, [15, 6, 25, 14]).size == (5, 4)
    with pytest.raises(ValueError):
        crop_query(image, [5, 5, 5, 9])


class _RunsCode:
    """A pickle that calls a function when loaded, as a hostile ground-truth file would."""

    def __reduce__(self):
        return (print, ('pwned',))


def test_ground_truth_with_numpy_arrays_loads_and_one_that_runs_code_is_refused(tmp_path, capsys):
    gnd = _toy_gnd()
    for q in gnd['gnd']:  # the official files hold numpy arrays
        q.update(easy=np.asarray(q['easy'], dtype=np.int64), bbx=np.asarray(q['bbx'], dtype=np.float64))
    path = tmp_path / 'gnd_np.pkl'
    gnd['gnd'][1]['junk'] = np.zeros(0, dtype=np.int64)  # an empty array: pickled through bytes()
    for protocol in (0, 2, 4, 5):
        path.write_bytes(pickle.dumps(gnd, protocol=protocol))
        assert evaluate_revisited(_toy_similarity(), load_ground_truth(path))['hard']['map'] == 1.0
    hostile = tmp_path / 'gnd_hostile.pkl'
    hostile.write_bytes(pickle.dumps({**_toy_gnd(), 'imlist': _RunsCode()}))
    with pytest.raises(ValueError, match='it names builtins.print'):
        load_ground_truth(hostile)
    assert 'pwned' not in capsys.readouterr().out
