"""Developer tools (synthetic models, benchmark). They need a ComfyUI host on sys.path."""
