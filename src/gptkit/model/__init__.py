"""The model: one GPT class for every family, plus its KV cache."""

from gptkit.model.gpt import GPT, KVCache

__all__ = ["GPT", "KVCache"]
