"""Revisited Oxford / Paris (ROxford5k, RParis6k) evaluation protocol.

Reproduces the official evaluation of Radenovic et al., "Revisiting Oxford and Paris: Large-Scale
Image Retrieval Benchmarking", CVPR 2018 (github.com/filipradenovic/revisitop,
``python/evaluate.py`` and ``python/example_evaluate.py``):

* AP uses the official trapezoidal interpolation of the precision-recall curve, after deleting
  junk images from the ranked list;
* mP@k uses the official definition, whose denominator shrinks to the rank of the last positive
  when that comes before k;
* queries with no positive under a protocol are excluded from the means;
* Easy / Medium / Hard are evaluated from the same ranking, only the positive / junk sets change.

All scores are returned as fractions in [0, 1] (the official script prints them x 100).

The datasets are not bundled: the user downloads the images and ``gnd_<name>.pkl`` to a local
directory laid out as ``<root>/<name>/jpg/*.jpg`` and ``<root>/<name>/gnd_<name>.pkl``.
"""
import pickle
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence, Tuple, Union

import numpy as np
from PIL import Image

__all__ = [
    'load_ground_truth', 'crop_query', 'compute_ap', 'compute_map', 'protocol_gnd',
    'evaluate_revisited', 'format_revisited', 'find_dataset', 'PROTOCOLS', 'KNOWN_DATASETS',
]

KNOWN_DATASETS = ('roxford5k', 'rparis6k')
PROTOCOLS = ('easy', 'medium', 'hard')
_GND_KEYS = ('imlist', 'qimlist', 'gnd')
_QUERY_KEYS = ('easy', 'hard', 'junk', 'bbx')


def find_dataset(root: Union[str, Path], name: str) -> Tuple[Path, Path]:
    """Locate a user-downloaded revisited dataset: returns ``(images_dir, gnd_pkl_path)``.

    Expects ``<root>/<name>/jpg/`` and ``<root>/<name>/gnd_<name>.pkl`` (revisitop layout).
    """
    name = name.lower()
    data_dir = Path(root) / name
    images_dir = data_dir / 'jpg'
    gnd_path = data_dir / f'gnd_{name}.pkl'
    missing = [str(p) for p in (images_dir, gnd_path) if not p.exists()]
    if missing:
        raise FileNotFoundError(
            f'{name} not found (missing: {", ".join(missing)}). The dataset is not bundled: '
            f'download the images and gnd_{name}.pkl (see github.com/filipradenovic/revisitop) '
            f'to a local directory laid out as <root>/{name}/jpg/ and <root>/{name}/gnd_{name}.pkl '
            f'and pass that root.'
        )
    return images_dir, gnd_path


def _validate_ground_truth(cfg: Any, source: str) -> None:
    if not isinstance(cfg, Mapping):
        raise ValueError(f'{source}: ground truth must be a dict, got {type(cfg).__name__}')
    missing = [k for k in _GND_KEYS if k not in cfg]
    if missing:
        raise ValueError(f'{source}: ground truth is missing key(s) {missing}')
    if not isinstance(cfg['gnd'], (list, tuple)):
        raise ValueError(f'{source}: "gnd" must be a list of per-query dicts')
    if len(cfg['gnd']) != len(cfg['qimlist']):
        raise ValueError(f'{source}: len(gnd)={len(cfg["gnd"])} != len(qimlist)={len(cfg["qimlist"])}')
    n_db = len(cfg['imlist'])
    for i, q in enumerate(cfg['gnd']):
        if not isinstance(q, Mapping):
            raise ValueError(f'{source}: gnd[{i}] must be a dict, got {type(q).__name__}')
        missing = [k for k in _QUERY_KEYS if k not in q]
        if missing:
            raise ValueError(f'{source}: gnd[{i}] is missing key(s) {missing}')
        for key in ('easy', 'hard', 'junk'):
            idx = np.asarray(q[key]).ravel()
            if idx.size and (not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= n_db):
                raise ValueError(f'{source}: gnd[{i}]["{key}"] must hold integer indices into imlist [0, {n_db})')
        if np.asarray(q['bbx']).size != 4:
            raise ValueError(f'{source}: gnd[{i}]["bbx"] must be [x1, y1, x2, y2]')


def load_ground_truth(path: Union[str, Path]) -> Dict[str, Any]:
    """Load and validate an official ``gnd_<dataset>.pkl``.

    Returns the dict ``{'imlist': [...], 'qimlist': [...], 'gnd': [{'easy', 'hard', 'junk',
    'bbx'}, ...]}`` with indices 0-based into ``imlist``. Raises ``ValueError`` on a malformed file.
    """
    path = Path(path)
    with path.open('rb') as f:
        try:
            cfg = _GroundTruthUnpickler(f).load()
        except pickle.UnpicklingError as err:
            raise ValueError(f'{path}: {err}') from None
    _validate_ground_truth(cfg, str(path))
    return cfg


class _GroundTruthUnpickler(pickle.Unpickler):
    """Unpickles plain containers, numbers, strings and numpy arrays, nothing else: a plain
    ``pickle.load`` runs whatever callable a file names, and the file is one the user placed."""

    ALLOWED = {
        ('numpy', 'ndarray'), ('numpy', 'dtype'),
        ('numpy.core.multiarray', '_reconstruct'), ('numpy._core.multiarray', '_reconstruct'),
        ('numpy.core.multiarray', 'scalar'), ('numpy._core.multiarray', 'scalar'),
        ('numpy.core.numeric', '_frombuffer'), ('numpy._core.numeric', '_frombuffer'),  # protocol 5 arrays
        ('_codecs', 'encode'),  # how protocol 2 (Python 2 compatible) spells an array's bytes
        # plain values that protocols 0-2 spell as calls: empty bytes (an empty array), sets
        ('builtins', 'bytes'), ('builtins', 'set'), ('builtins', 'frozenset'),
        ('__builtin__', 'bytes'), ('__builtin__', 'set'), ('__builtin__', 'frozenset'),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self.ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f'a ground-truth file may hold lists, dicts, numbers, strings and numpy '
                                     f'arrays; it names {module}.{name}')


def crop_query(image: Image.Image, bbx: Sequence[float]) -> Image.Image:
    """Crop a query image to its ground-truth box ``[x1, y1, x2, y2]`` (mandatory in the protocol).

    Same as the official ``image.crop(bbx)``, except that the box is clipped to the image (as the
    official MATLAB ``crop_qim``) so that an out-of-bounds box never adds black padding.
    """
    if len(bbx) != 4:
        raise ValueError(f'bbx must be [x1, y1, x2, y2], got {bbx!r}')
    w, h = image.size
    x1, y1, x2, y2 = (float(v) for v in bbx)
    x1, y1 = max(x1, 0.0), max(y1, 0.0)
    x2, y2 = min(x2, float(w)), min(y2, float(h))
    if x2 <= x1 or y2 <= y1:
        raise ValueError(f'empty crop: bbx {list(bbx)} on a {w}x{h} image')
    return image.crop((x1, y1, x2, y2))


def compute_ap(ranks: np.ndarray, nres: int) -> float:
    """Official trapezoidal AP from the sorted 0-based (junk-adjusted) ranks of the positives.

    For the j-th positive at rank r: precision before it p0 = j / r (1 if r == 0), precision
    including it p1 = (j + 1) / (r + 1); AP = sum_j (p0 + p1) / 2 / nres. ``nres`` is the total
    number of positives, so positives missing from a truncated ranking count as zero recall.
    """
    ap = 0.0
    recall_step = 1.0 / nres
    for j, rank in enumerate(ranks):
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def compute_map(
        ranks: np.ndarray,
        gnd: Sequence[Mapping[str, Any]],
        kappas: Sequence[int] = (1, 5, 10),
) -> Tuple[float, np.ndarray, np.ndarray, np.ndarray]:
    """Mean AP and mean precision@k, same semantics as the official revisitop ``compute_map``.

    Args:
        ranks: (n_db, n_queries) 0-based database indices, each column sorted by decreasing
            similarity (``np.argsort(-sim, axis=0)`` with ``sim`` = (n_db, n_queries)).
        gnd: per query a dict with ``'ok'`` (positive indices) and optionally ``'junk'``
            (ignored indices); see :func:`protocol_gnd`.
        kappas: the k of P@k.

    Returns:
        ``(map, aps, pr, prs)``: mAP, per-query AP (n_queries,), mP@k (len(kappas),) and
        per-query P@k (n_queries, len(kappas)). Queries without positives get NaN and are left out
        of the means (divided by n_queries - n_empty). Deviations from the official code, which
        would crash instead: mAP / mP@k are NaN if every query is empty, and a query none of whose
        positives occurs in a truncated ranking gets AP = P@k = 0.
    """
    ranks = np.asarray(ranks)
    if ranks.ndim != 2 or ranks.shape[1] != len(gnd):
        raise ValueError(f'ranks must be (n_db, n_queries={len(gnd)}), got shape {ranks.shape}')
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    pr = np.zeros(len(kappas))
    total_ap = 0.0
    nempty = 0
    positions = np.arange(ranks.shape[0])

    for i in range(nq):
        qgnd = np.asarray(gnd[i]['ok']).ravel()
        if qgnd.shape[0] == 0:  # no positives: excluded from the average
            aps[i] = float('nan')
            prs[i, :] = float('nan')
            nempty += 1
            continue
        qgndj = np.asarray(gnd[i].get('junk', np.empty(0))).ravel()

        # Sorted 0-based positions of positives and junk in this query's ranking. np.isin replaces
        # the official np.in1d (removed in NumPy 2.4); same semantics.
        pos = positions[np.isin(ranks[:, i], qgnd)]
        junk = positions[np.isin(ranks[:, i], qgndj)]
        # Delete junk from the list: shift each positive up by the number of junk images ranked
        # strictly before it (the official two-pointer loop, vectorised).
        pos = pos - np.searchsorted(junk, pos, side='left')

        ap = compute_ap(pos, len(qgnd))
        total_ap += ap
        aps[i] = ap

        if pos.size == 0:  # truncated ranking without any positive
            prs[i, :] = 0.0
            continue
        pos = pos + 1  # 1-based
        for j, k in enumerate(kappas):
            # Official quirk: k shrinks to the rank of the last positive if that is smaller.
            kq = min(max(pos), k)
            prs[i, j] = (pos <= kq).sum() / kq
        pr = pr + prs[i, :]

    n_valid = nq - nempty
    if n_valid == 0:
        return float('nan'), aps, np.full(len(kappas), np.nan), prs
    return total_ap / n_valid, aps, pr / n_valid, prs


def protocol_gnd(gnd: Sequence[Mapping[str, Any]], protocol: str) -> List[Dict[str, np.ndarray]]:
    """Per-query ``{'ok', 'junk'}`` for a protocol, as in the official ``example_evaluate.py``.

    easy: ok = easy, junk = junk + hard; medium: ok = easy + hard, junk = junk;
    hard: ok = hard, junk = junk + easy.
    """
    def cat(q, keys):
        return np.concatenate([np.asarray(q[k], dtype=np.int64).ravel() for k in keys])

    spec = {
        'easy': (('easy',), ('junk', 'hard')),
        'medium': (('easy', 'hard'), ('junk',)),
        'hard': (('hard',), ('junk', 'easy')),
    }
    if protocol not in spec:
        raise ValueError(f'Unknown protocol {protocol!r}; expected one of {PROTOCOLS}')
    ok_keys, junk_keys = spec[protocol]
    return [{'ok': cat(q, ok_keys), 'junk': cat(q, junk_keys)} for q in gnd]


def evaluate_revisited(
        similarity: np.ndarray,
        gnd: Union[Mapping[str, Any], Sequence[Mapping[str, Any]]],
        kappas: Sequence[int] = (1, 5, 10),
) -> Dict[str, Dict[str, float]]:
    """Easy / Medium / Hard mAP and mP@k from a query-by-database similarity matrix.

    Args:
        similarity: (n_queries, n_db), higher = more similar (e.g. Q @ X.T of L2-normalised
            descriptors). Query images must not be in the database (revisited protocol).
        gnd: the dict from :func:`load_ground_truth`, or its ``'gnd'`` list.

    Returns:
        ``{'easy': {'map', 'mp@1', 'mp@5', 'mp@10'}, 'medium': {...}, 'hard': {...}}`` as
        fractions in [0, 1] (the official script reports them x 100).
    """
    if isinstance(gnd, Mapping):
        gnd = gnd['gnd']
    sim = np.asarray(similarity)
    if sim.ndim != 2 or sim.shape[0] != len(gnd):
        raise ValueError(f'similarity must be (n_queries={len(gnd)}, n_db), got shape {sim.shape}')
    # Full ranking of the database, exactly as the official example (default argsort, so ties
    # are ordered as in the official script).
    ranks = np.argsort(-sim.T, axis=0)
    results = {}
    for protocol in PROTOCOLS:
        m, _, mpr, _ = compute_map(ranks, protocol_gnd(gnd, protocol), kappas)
        results[protocol] = {'map': float(m), **{f'mp@{k}': float(v) for k, v in zip(kappas, mpr)}}
    return results


def format_revisited(name: str, results: Mapping[str, Mapping[str, float]]) -> str:
    """One-line summary in percent, like the official script's printout."""
    def pct(v):
        return f'{100.0 * v:.2f}'

    maps = ', '.join(f'{p[0].upper()}: {pct(results[p]["map"])}' for p in PROTOCOLS)
    ks = [k for k in results['medium'] if k.startswith('mp@')]
    mpk = ', '.join(
        f'{p[0].upper()}: [{" ".join(pct(results[p][k]) for k in ks)}]' for p in PROTOCOLS)
    return f'{name}: mAP {maps}; mP@[{",".join(k[3:] for k in ks)}] {mpk}'
