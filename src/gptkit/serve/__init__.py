"""Serving: an OpenAI-compatible HTTP API and a web chat page over a batching engine.

Three parts (vLLM's ``entrypoints/openai/`` layout): :mod:`~gptkit.serve.protocol` holds the
pydantic schemas of requests and responses, :mod:`~gptkit.serve.engine` turns token ids into
streamed text for many requests at once and knows no HTTP, and :mod:`~gptkit.serve.app` maps
HTTP to the engine (thin routes, Server-Sent Events) and runs it with uvicorn. ``static/``
holds the chat page. Start it with ``gptkit serve --model SOURCE`` or :func:`serve`.
"""

from __future__ import annotations

from typing import Any

__all__ = ["create_app", "serve"]


def __getattr__(name: str) -> Any:
    # The web stack (fastapi, uvicorn) loads only when it is used, not on `import gptkit`.
    if name in __all__:
        from gptkit.serve import app

        return getattr(app, name)
    raise AttributeError(f"module 'gptkit.serve' has no attribute {name!r}")
