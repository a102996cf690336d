"""LTX (LTXVModel) and LTX-2 (LTXAVModel): their transformer blocks sliced over video tokens."""
