"""Benchmark harness (timing, ceilings, memory checks, results) and the CLI."""

from .ceilings import Ceilings, measure_ceilings
from .harness import Row, make_inputs, run_point
from .memory import InsufficientMemoryError, check_fits
from .timing import Timing, time_call

__all__ = ["Ceilings", "measure_ceilings", "Row", "make_inputs", "run_point", "InsufficientMemoryError",
           "check_fits", "Timing", "time_call"]
