"""Results store, tables and figures (orchestration layer: may use matplotlib)."""

from .store import ResultStore
from .tables import markdown, plain, summary

__all__ = ["ResultStore", "summary", "markdown", "plain"]
