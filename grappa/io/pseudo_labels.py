"""The cluster step's pseudo-labels, read back for training (both stages) and analysis."""
from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from grappa.config import ConfigError, Params
from grappa.io.artifacts import read_table
from grappa.io.layout import layout


def pseudo_labels_for(params: Params, k: int, image_ids: pa.Array) -> np.ndarray:
    """The k-level pseudo-label of each image id (an Arrow join: no Python object per image)."""
    table = read_table(layout(params).pseudo_labels(k))
    where = pc.index_in(pa.array(image_ids) if isinstance(image_ids, list) else image_ids,
                        value_set=table.column("image_id").combine_chunks())
    if where.null_count:
        raise ConfigError(f"cluster output for k={k} is stale ({where.null_count} images unassigned); rerun 'grappa cluster'")
    return table.column("pseudo_label").to_numpy()[where.to_numpy()].astype(np.int64)
