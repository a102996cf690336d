"""What the default test run covers, and what STREAMLINE_FULL_MATRIX=1 adds.

The default run checks every property once, at the cheapest size that checks it: SD1.5's layout at a fifth of
its width (synthetic.NARROW) for the pack's mechanics, the real width where the width is the point. With
STREAMLINE_FULL_MATRIX=1 the mechanics run at SD1.5's real width too, and the heavy matrix points (marked
full_matrix_only) run: the same properties at more sizes, in an hour on a 2-core CPU instead of minutes.
"""
from __future__ import annotations

import os

import pytest

from .synthetic import NARROW, SD15_WIDTH

FULL_MATRIX = bool(os.environ.get("STREAMLINE_FULL_MATRIX"))

# SD1.5's model_channels for the tests of the pack's mechanics
MECHANICS_WIDTH = SD15_WIDTH if FULL_MATRIX else NARROW


def full_matrix_only(covered_by: str):
    """A matrix point the default run leaves out because `covered_by` checks the same property."""
    return pytest.mark.skipif(not FULL_MATRIX, reason=f"{covered_by} checks the same; all: STREAMLINE_FULL_MATRIX=1")
