"""The optional C extension: byte-level BPE with GPT-2's pre-tokenizer (see
src/gptkit/tokenizer/_fastbpe.c). Everything else about the package lives in pyproject.toml.
Without a C compiler the build skips it and gptkit.tokenizer.bpe falls back to the
``tokenizers`` library, which gives the same ids more slowly."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gptkit.tokenizer._fastbpe",
            sources=["src/gptkit/tokenizer/_fastbpe.c"],
            optional=True,
        )
    ]
)
