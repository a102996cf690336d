"""MiniMax H3 (ComfyUI 0.33's MiniMaxH3Model): its DiT blocks sliced over the packed tokens (block.py, patch.py),
its laws (laws.py), Step Rehash's split (families/dit/rehash.py); the adapter (adapter.py)."""
