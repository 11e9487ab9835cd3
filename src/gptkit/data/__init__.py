"""Data: corpus -> token shards (prepare), and batches from them (loader)."""

from __future__ import annotations

from gptkit.data.loader import BatchSampler, TokenShards, read_meta
from gptkit.data.prepare import iter_documents, list_files, prepare

__all__ = ["BatchSampler", "TokenShards", "iter_documents", "list_files", "prepare", "read_meta"]
