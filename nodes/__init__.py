"""ComfyUI side of the pack: nodes, wrappers, and the adapters that map ComfyUI/ADE layers to roles."""
