"""Results store, tables and figures (orchestration layer: may use matplotlib)."""

from .store import ResultStore
from .tables import markdown, ood_summary, plain, shift_summary, summary

__all__ = ["ResultStore", "summary", "shift_summary", "ood_summary", "markdown", "plain"]
