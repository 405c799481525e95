"""Benchmark harness shared by every op: cases and providers come from each op folder's
``bench.py`` (a :class:`BenchSpec`); timing, floors, reports and the CLI live here."""
from .spec import BenchSpec, Case, Inputs

__all__ = ["BenchSpec", "Case", "Inputs"]
