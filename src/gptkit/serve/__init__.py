"""Serving: an OpenAI-compatible HTTP API and a web chat page over a batching engine.

Three parts (vLLM's ``entrypoints/openai/`` layout): :mod:`~gptkit.serve.protocol` holds the
pydantic schemas of requests and responses; :mod:`~gptkit.serve.serving` turns a request
into token ids and :class:`~gptkit.config.SampleConfig` s, submits them and builds the
response objects, with no HTTP; :mod:`~gptkit.serve.engine` schedules the submissions over
the decoding core (continuous batching, the KV cache pool, cancel); and
:mod:`~gptkit.serve.app` holds the thin routes (errors to statuses, Server-Sent Events) and
runs them with uvicorn. ``static/`` holds the chat page. Start it with
``gptkit serve --model SOURCE`` or :func:`serve`.
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
