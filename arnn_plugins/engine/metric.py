"""The base of the package's metrics: collect per-item results, reduce them once."""

from __future__ import annotations

from typing import Sequence

from mmengine.evaluator import BaseMetric

__all__ = ["CollectMetric"]


class CollectMetric(BaseMetric):
    """A metric whose model already returns one result dict per item (``mode='predict'``).

    :meth:`process` only collects them (mmengine gathers them across ranks);
    subclasses define ``compute_metrics(results) -> dict``.
    """

    def process(self, data_batch, data_samples: Sequence[dict]) -> None:
        self.results.extend(data_samples)
