"""Optional C++ kernels for CPUs with AVX512-BF16, compiled for this machine on first use;
:mod:`gptkit.model.ops` calls them where they apply.

- ``attention.cpp``: causal attention, with dropout or without, forward and backward, in
  bf16: the fast path of training attention (see ``ops/sdpa.py``'s ``_DropoutAttention``,
  whose Python tiles define the same computation and serve every other case) and of bf16
  inference (the ``gptkit::causal_attention`` op, else SDPA).
- ``keep.h``: dropout's keep mask as a counter-based hash of (seed, position), which the
  attention kernel and ``elementwise.cpp`` (dropout, and dropout fused with the residual
  add, in one pass, bf16 or fp32) make where they need it, in forward and again in
  backward; ``ops.masks.keep_mask`` returns the same mask. ``elementwise.cpp`` also has
  GELU's backward in one pass (``ops.gelu``) and layer norm writing bf16
  (``ops.layer_norm_for_matmul``).
- ``decode.cpp``: inference for a few tokens at a time, where torch's general kernels spend
  more time setting up than computing: RMSNorm in one pass (``ops.rms_norm``), attention
  of a few query rows over a KV cache under a mask, grouped heads read in place
  (``ops.attention``), the rotary embedding with the cache write (``decode_step``), int4
  products for CPUs without AVX-512 (``int4_gemv``, int8 activations: ``quant.Int4Linear``)
  and every block of such an int4 model's decoding step in one call (``int4_blocks``:
  ``decode_step``). It is written on ``vec16.h``'s sixteen lanes
  and AVX2, so it is built twice: inside the AVX-512 module, and alone for CPUs with AVX2
  and FMA only (:func:`decode_kernels` picks).

torch's ``cpp_extension`` compiles them once (about 30 s on 2 cores) into
``~/.cache/gptkit/kernels`` (or ``$GPTKIT_KERNEL_CACHE``); without a C++ compiler gptkit
warns once and uses the Python paths, as it does with ``GPTKIT_KERNELS=0`` (silently).
"""

from __future__ import annotations

import functools
import hashlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

import torch

HERE = Path(__file__).resolve().parent
# -fopenmp: at::parallel_for is an OpenMP loop compiled into the caller; its libgomp.so.1 is
# the one torch has already loaded (same soname), so the kernel shares torch's threads.
FLAGS = ["-O3", "-fopenmp", "-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mfma"]
AVX2_FLAGS = ["-O3", "-fopenmp", "-mavx2", "-mfma", "-DGPTKIT_DECODE_ONLY"]


def kernels_enabled() -> bool:
    return os.environ.get("GPTKIT_KERNELS", "1") != "0"


def cache_dir() -> Path:
    root = os.environ.get("GPTKIT_KERNEL_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "gptkit" / "kernels"


SOURCES = ("attention.cpp", "elementwise.cpp", "decode.cpp")
HEADERS = ("keep.h", "simd.h", "vec16.h")


@functools.cache
def _build(
    name: str, sources: tuple[str, ...] = SOURCES, flags: tuple[str, ...] = tuple(FLAGS)
) -> ModuleType | None:
    from torch.utils import cpp_extension

    files = [HERE / f for f in (*sources, *HEADERS)]
    text = b"".join(f.read_bytes() for f in files) + " ".join(flags).encode()
    tag = hashlib.sha256(text).hexdigest()[:12]
    version = torch.__version__.replace("+", "_").replace(".", "_")
    build = cache_dir() / f"{name}-torch{version}-{tag}"
    try:
        build.mkdir(parents=True, exist_ok=True)
        if not any(build.glob("*.so")):
            print(f"gptkit: compiling its {name} kernels (once, ~30 s)", file=sys.stderr)
        return cpp_extension.load(
            name=f"gptkit_{name}_{tag}",
            sources=[str(HERE / f) for f in sources],
            extra_cflags=list(flags),
            extra_ldflags=["-fopenmp"],
            build_directory=str(build),
            verbose=False,
        )
    except Exception as e:  # no compiler or ninja, an old one without these flags, no cache dir
        lines = str(e).strip().splitlines() or [type(e).__name__]
        why = next((line for line in lines if "error" in line), lines[-1])
        warnings.warn(
            f"gptkit could not compile its {name} kernels ({why.strip()}); using the slower "
            "Python path. Install a C++ compiler (g++) and ninja (or point "
            "GPTKIT_KERNEL_CACHE at a writable directory), or set GPTKIT_KERNELS=0 to "
            "silence this.",
            stacklevel=3,
        )
        return None


@torch.compiler.assume_constant_result  # compiled graphs (fullgraph prefill) take it as given
def cpu_kernels() -> ModuleType | None:
    """The compiled kernels (``attention_forward``, ``attention_backward``, ``dropout``,
    ``keep_mask``), or None where they do not apply (no AVX512-BF16, ``GPTKIT_KERNELS=0``,
    or no compiler)."""
    if not kernels_enabled() or not cpu_supports("avx512"):
        return None
    return _build("cpu")


#: the instruction sets ``decode.cpp`` is built for, fastest first
DECODE_ISAS = ("avx512", "avx2")


@functools.cache  # asked on every call of a kernel: the answer never changes
def cpu_supports(isa: str) -> bool:
    """Whether this CPU runs ``decode.cpp``'s build for ``isa`` (the AVX-512 build comes
    inside :func:`cpu_kernels`, which needs AVX512-BF16)."""
    cpu = torch.cpu
    if isa == "avx512":
        return getattr(cpu, "_is_avx512_bf16_supported", lambda: False)()
    if isa == "avx2":  # every x86 CPU with AVX2 has FMA too (Haswell, Zen)
        return sys.platform.startswith("linux") and getattr(cpu, "_is_avx2_supported", bool)()
    raise ValueError(f"unknown instruction set {isa!r}: one of {DECODE_ISAS}")


@torch.compiler.assume_constant_result
def decode_kernels(isa: str | None = None) -> ModuleType | None:
    """``decode.cpp``'s kernels (``rms_norm``, ``masked_attention``, ``rope_store``) for this
    CPU: the AVX-512 module where it applies, else ``decode.cpp`` built alone for AVX2; None
    without either (or with ``GPTKIT_KERNELS=0`` or no compiler). ``isa`` asks for one build
    (tests run the AVX2 build on AVX-512 CPUs too)."""
    if not kernels_enabled():
        return None
    if isa is None:
        isa = _best_isa()
    if isa is None or not cpu_supports(isa):
        return None
    if isa == "avx512":
        return cpu_kernels()
    return _build("decode_avx2", ("decode.cpp",), tuple(AVX2_FLAGS))


@functools.cache
def _best_isa() -> str | None:
    return next((i for i in DECODE_ISAS if cpu_supports(i)), None)
