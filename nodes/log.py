import logging

logger = logging.getLogger("ComfyUI-Streamline")
