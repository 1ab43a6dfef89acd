"""litellm, imported once and only when a litellm model is configured."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import logging
import os
from types import ModuleType
from typing import Any

LITELLM_LOGGERS = ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy")


# --- the lazy import ----------------------------------------------------------------------

_litellm: ModuleType | None = None


def loaded() -> ModuleType | None:
    """litellm if it was imported (load_litellm), else None."""
    return _litellm


async def load_litellm() -> ModuleType:
    """litellm, imported once (in a thread: the event loop keeps running) and quietened."""
    global _litellm
    if _litellm is None:
        os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")  # no fetch at import
        # Any: litellm sets its switches as module attributes, which a ModuleType lacks
        module: Any = await asyncio.to_thread(importlib.import_module, "litellm")
        module.suppress_debug_info = True  # no "Give Feedback / Get Help" banners
        if hasattr(module, "telemetry"):  # gone from recent versions; off in older ones
            module.telemetry = False
        if "LITELLM_LOG" not in os.environ:  # an operator who asks for its logs gets them
            for name in LITELLM_LOGGERS:
                logging.getLogger(name).setLevel(logging.ERROR)
        _litellm = module
    return _litellm
