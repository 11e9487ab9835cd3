"""Dropout's random keep masks, and bool masks packed as bits for backward.

On a CPU with the compiled kernels the mask is ``kernels/keep.h``'s counter-based hash of
(seed, row, column), the very mask the attention and dropout kernels make in place; on
other CPUs uniform 16-bit values from numpy's SFC64 on two threads; elsewhere 16-bit
values cut from torch's 64-bit random integers. Every seed comes from torch's global
generator, so ``torch.manual_seed`` (and a checkpoint's saved RNG state) gives the same
masks. References: Srivastava et al. 2014 (dropout); Salmon et al. 2011 (counter-based
random numbers); Wellons' "lowbias32" hash (``keep.h``); numpy's ``SFC64`` (Doty-Humphrey's
small fast chaotic generator).
"""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from gptkit.model.kernels import cpu_kernels


def random_quarters(n: int, device: torch.device) -> Tensor:
    """``n`` uniform int16 values from the global generator: one 64-bit integer per four
    (``bernoulli_`` draws one random number per element and costs about 4x more on a CPU,
    where dropout's random numbers otherwise cost as much as the model's matmuls)."""
    words = torch.randint(-(2**63), 2**63 - 1, ((n + 3) // 4,), dtype=torch.int64, device=device)
    return words.view(torch.int16)[:n]


# the second thread of CPU dropout masks, and the process that started it
_rng_pool: tuple[int, ThreadPoolExecutor] | None = None


def _fill_keep(out: Tensor, seed: int, threshold: int) -> None:
    """``out`` (bool, flat) := 16-bit values of SFC64 seeded with ``seed`` >= threshold.
    numpy alone, which releases the GIL and starts no threads (a torch op here would start
    an OpenMP team for this thread, whose spinning slowed training steps by 7%)."""
    words = np.random.SFC64(seed).random_raw((out.numel() + 3) // 4)
    np.greater_equal(words.view(np.int16)[: out.numel()], threshold, out=out.numpy())


def _cpu_keep_mask(n: int, threshold: int) -> Tensor:
    """The CPU masks of :func:`keep_mask` without the kernels: torch's generator (mt19937)
    is single-threaded and makes 32 random bits in 2.8 ns here, which put dropout's random
    numbers at a tenth of a training step on nanoGPT's Shakespeare config. numpy's SFC64
    makes 64 bits in about 3 ns and releases the GIL, so two threads fill the two halves of
    a large mask, each half from its own stream. Seeded from torch's global generator: a
    seed (and a checkpoint's saved RNG state) gives the same masks, whatever the thread
    timing."""
    global _rng_pool
    seed = _seed()
    mask = torch.empty(n, dtype=torch.bool)
    if n < 2**16:
        _fill_keep(mask, seed, threshold)
        return mask
    half = (n // 2 + 3) // 4 * 4  # on a 64-bit word boundary
    if torch.get_num_threads() < 2:  # the same two streams, one after the other
        _fill_keep(mask[:half], seed, threshold)
        _fill_keep(mask[half:], seed + 1, threshold)
        return mask
    if _rng_pool is None or _rng_pool[0] != os.getpid():  # none yet, or a forked child
        _rng_pool = os.getpid(), ThreadPoolExecutor(1, thread_name_prefix="gptkit-dropout")
    other = _rng_pool[1].submit(_fill_keep, mask[half:], seed + 1, threshold)
    _fill_keep(mask[:half], seed, threshold)
    other.result()
    return mask


def _seed() -> int:
    """A mask's seed, from torch's global generator (so a seed or a checkpoint's saved RNG
    state gives the same masks)."""
    return int(torch.randint(0, 2**63 - 1, (), dtype=torch.int64))


def _threshold32(p: float) -> int:
    """The 32-bit hash value below which ``kernels/keep.h`` drops an element."""
    return min(round(p * 2**32), 2**32 - 1)


def kernel_mask(p: float) -> tuple[int, int]:
    """(seed, threshold) of a fresh ``keep.h`` mask for the kernels; (0, 0), drawing
    nothing, without dropout."""
    return (_seed(), _threshold32(p)) if p > 0.0 else (0, 0)


def keep_mask(shape: tuple[int, ...], p: float, device: torch.device) -> Tensor:
    """A random bool mask, True with probability ``1 - p``. On a CPU with the compiled
    kernels: ``kernels/keep.h``'s hash of (seed, row, column) over the last dimension (to
    2**-32; the very mask the attention and dropout kernels make in place); on other CPUs
    uniform 16-bit values from numpy's SFC64 (see :func:`_cpu_keep_mask`; to 1/65536), and
    elsewhere from :func:`random_quarters`."""
    if device.type == "cpu":
        kernels = cpu_kernels()
        if kernels is not None:
            cols = shape[-1] if shape else 1
            rows = math.prod(shape) // cols if cols else 0
            return kernels.keep_mask(_seed(), _threshold32(p), rows, cols).view(shape)
    threshold = round(p * 65536) - 32768  # the values are uniform in [-32768, 32767]
    if device.type == "cpu":
        return _cpu_keep_mask(math.prod(shape), threshold).view(shape)
    return (random_quarters(math.prod(shape), device) >= threshold).view(shape)


def _int64(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


_PACK = _int64(0x0102040810204080)  # byte i of a word (0 or 1) -> bit 56 + i of the product
_SPREAD = _int64(0x0101010101010101)  # a byte copied into all eight bytes of a word
_BIT_I = _int64(0x8040201008040201)  # bit i of byte i


def pack_bits(mask: Tensor) -> Tensor:
    """A bool tensor as uint8 bits (element 8j + i is bit i of byte j): the eighth of the
    memory that saving the bool mask for backward would take. On a CPU numpy's packbits
    (7x faster than the torch arithmetic below, which serves other devices)."""
    if mask.device.type == "cpu":
        return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))
    flat = mask.reshape(-1).view(torch.uint8)
    if flat.numel() % 8:
        flat = F.pad(flat, (0, 8 - flat.numel() % 8))
    words = flat.contiguous().view(torch.int64)  # eight 0/1 bytes per word
    return ((words * _PACK) >> 56).bitwise_and_(0xFF).to(torch.uint8)


def unpack_bits(bits: Tensor, shape: tuple[int, ...]) -> Tensor:
    """Inverse of :func:`pack_bits`: the bool tensor of ``shape``."""
    if bits.device.type == "cpu":
        flat = np.unpackbits(bits.numpy(), count=math.prod(shape), bitorder="little")
        return torch.from_numpy(flat.view(np.bool_)).view(shape)
    words = (bits.to(torch.int64) * _SPREAD).bitwise_and_(_BIT_I)  # byte i: bit i alone
    words = ((words + 0x7F7F7F7F7F7F7F7F) >> 7).bitwise_and_(_SPREAD)  # byte i: 0 or 1
    return words.view(torch.uint8)[: math.prod(shape)].view(torch.bool).view(shape)
