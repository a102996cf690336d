"""The pack's logger, and notices said once per run."""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

logger = logging.getLogger("ComfyUI-Streamline")


@dataclass
class LogOnce:
    """Remembers which notices were already logged for one patched model."""

    seen: set[str] = field(default_factory=set)

    def warn(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            logger.warning(message)

    def info(self, key: str, message: str) -> None:
        if key not in self.seen:
            self.seen.add(key)
            logger.info(message)
