"""Results store, tables and figures (orchestration layer: may use matplotlib)."""

from .store import ResultStore
from .tables import (
    SEG_COLUMNS,
    class_iou_summary,
    markdown,
    ood_summary,
    plain,
    shift_summary,
    summary,
)

__all__ = [
    "ResultStore",
    "summary",
    "shift_summary",
    "ood_summary",
    "class_iou_summary",
    "SEG_COLUMNS",
    "markdown",
    "plain",
]
