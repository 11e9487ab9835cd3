"""The model: one GPT class for every family, plus its KV cache."""

from gptkit.model.gpt import GPT
from gptkit.model.kv_cache import KVCache

__all__ = ["GPT", "KVCache"]
