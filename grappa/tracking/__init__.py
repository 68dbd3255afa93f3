"""MLflow tracking around the pure steps: a parent run per pipeline run (runs), a child run per
step logged from its outputs (step_logger), the fused model registered and promoted (publisher).
Off with ``tracking.enabled: false`` or ``GRAPPA_TRACKING=0``.
"""
from __future__ import annotations

from grappa.config import TRACKING_SWITCH, Params, tracking_enabled
from grappa.tracking import lineage, publisher, step_logger
from grappa.tracking.runs import (ENV_ARTIFACT_LOCATION, ENV_PARENT, ENV_RUN_KEY, RUN_KEY_TAG, RunTree,
                                  TrackingError, artifact_location, flatten, one_line, pipeline_run_key, step_params,
                                  tracking_uri)
from grappa.tracking.step_logger import numeric_metrics

# the surface callers use as tracking.X (cli, tests, dags)
__all__ = ["ENV_ARTIFACT_LOCATION", "ENV_PARENT", "ENV_RUN_KEY", "ENV_SWITCH", "RUN_KEY_TAG",
           "Tracker", "TrackingError", "artifact_location", "enabled", "flatten", "from_params",
           "numeric_metrics", "pipeline_run_key", "step_params", "tracking_uri"]

ENV_SWITCH = TRACKING_SWITCH


class Tracker(RunTree):
    """One process's view of the tracking server for one params file: the run tree and its step runs."""

    def log_step(self, step: str, params: Params, item, start_s: float,
                 error: BaseException | None = None) -> publisher.Decision | None:
        """Record one finished (or failed) step as a child run (``item``: its k or shard, if mapped);
        returns what publishing decided, for the step that publishes its model."""
        return step_logger.log_step(self, step, params, item, start_s, error)


def enabled(params: Params) -> bool:
    return tracking_enabled(params)


def from_params(params: Params) -> Tracker | None:
    """The tracker for this process, or None when tracking is off."""
    if not enabled(params):
        return None
    try:
        return Tracker(params)
    except Exception as err:
        raise TrackingError(f"tracking: cannot set up MLflow at {lineage.redact_uri(tracking_uri())}: "
                            f"{one_line(err)}") from None
