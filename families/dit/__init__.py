"""What the DiT families share: ComfyUI's per-block replacement hook."""
