"""Memory laws of a MiniMax H3 call (the packed sequence's blocks), for Memory Budget."""
from __future__ import annotations

# Memory Budget's answer until the laws are written: Streamline Model Patch slices the model regardless
PLAN_REASON = ("the pack has no memory laws for MiniMaxH3Model yet, so Memory Budget cannot plan it (Streamline Model "
               "Patch slices it)")
