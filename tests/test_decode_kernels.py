"""The decoding kernels (kernels/decode.cpp) against the torch expressions they stand for:
RMSNorm against ``F.rms_norm``, few-row masked attention against
``F.scaled_dot_product_attention`` (grouped heads, odd lengths and head sizes, bf16 caches,
cache slices read in place), and where the ops call them: eager inference only, never under
autograd or while torch.compile traces; a model decodes the same tokens with them and
without them. Every test runs once per build the CPU can run (AVX-512 and AVX2 on an
AVX-512 machine, AVX2 alone on others), the ops and the fused step calling that build."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from gptkit.config import SampleConfig
from gptkit.generate import generate_ids
from gptkit.model import decode_step, ops
from gptkit.model.kernels import DECODE_ISAS, cpu_supports, decode_kernels
from gptkit.model.ops import elementwise, sdpa
from tests.conftest import FAMILIES, tiny_model

ISAS = [
    pytest.param(i, marks=pytest.mark.skipif(not cpu_supports(i), reason=f"this CPU lacks {i}"))
    for i in DECODE_ISAS
]


@pytest.fixture(params=ISAS, autouse=True)
def isa(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """The build under test, for direct calls and for the ops and the step that call it."""
    isa = request.param
    for module in (elementwise, decode_step):
        monkeypatch.setattr(module, "decode_kernels", lambda: decode_kernels(isa))
    return isa


@pytest.fixture
def kernels(isa: str):
    k = decode_kernels(isa)
    assert k is not None, f"the {isa} kernels did not compile"
    return k


@pytest.mark.parametrize("C", [16, 37, 576])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rms_norm_equals_torch(kernels, C: int, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    x, w = torch.randn(3, 5, C).to(dtype), torch.randn(C)
    got = kernels.rms_norm(x, w, 1e-5, dtype)
    want = F.rms_norm(x.float(), (C,), w, 1e-5)
    assert got.dtype == dtype and got.shape == x.shape
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(got.float(), want, atol=tol, rtol=tol)


def attention_case(B: int, H: int, Hkv: int, T: int, S: int, d: int, kv: torch.dtype):
    """q, k and v (k, v as slices of a longer cache) and a random mask with one visible key
    or more per row."""
    torch.manual_seed(B * 1000 + T * 10 + S)
    q = torch.randn(B, H, T, d)
    k = torch.randn(B, Hkv, S + 7, d).to(kv)[:, :, :S]
    v = torch.randn(B, Hkv, S + 7, d).to(kv)[:, :, :S]
    mask = torch.rand(B, 1, T, S) > 0.4
    mask[..., 0] = True
    return q, k, v, mask


@pytest.mark.parametrize(
    ("B", "H", "Hkv", "T", "S", "d"),
    [
        (1, 9, 3, 1, 201, 64),
        (2, 4, 4, 3, 77, 24),
        (3, 6, 2, 16, 130, 32),
        (1, 2, 1, 5, 1, 80),
        (1, 9, 3, 1, 2500, 64),  # a long cache: ranges of keys combined
        (2, 4, 2, 2, 1100, 128),
    ],
)
@pytest.mark.parametrize("kv", [torch.float32, torch.bfloat16])
def test_masked_attention_equals_sdpa(kernels, B, H, Hkv, T, S, d, kv) -> None:
    q, k, v, mask = attention_case(B, H, Hkv, T, S, d, kv)
    got = kernels.masked_attention(q, k, v, mask, q.dtype)
    want = F.scaled_dot_product_attention(
        q, k.float(), v.float(), attn_mask=mask, enable_gqa=Hkv != H
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    one_mask = mask[:1]  # one mask row shared by the batch
    got = kernels.masked_attention(q, k, v, one_mask, q.dtype)
    want = F.scaled_dot_product_attention(
        q, k.float(), v.float(), attn_mask=one_mask, enable_gqa=Hkv != H
    )
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_a_long_cache_whose_first_ranges_are_masked(kernels) -> None:
    """Key ranges that a query cannot see at all (left padding of 1,500 slots) drop out of
    the combination."""
    q, k, v, mask = attention_case(1, 4, 2, 1, 2100, 32, torch.float32)
    mask[..., :1500] = False
    got = kernels.masked_attention(q, k, v, mask, q.dtype)
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # a cache longer than the mask is read up to the mask's length, in place
    longer = [torch.cat([t, torch.full_like(t[:, :, :50], float("nan"))], 2) for t in (k, v)]
    assert torch.equal(kernels.masked_attention(q, *longer, mask, q.dtype), got)
    with pytest.raises(RuntimeError, match="S, d"):
        kernels.masked_attention(q, k[:, :, :-1], v[:, :, :-1], mask, q.dtype)


def test_masked_attention_bf16_queries_and_a_row_that_sees_nothing(kernels) -> None:
    q, k, v, mask = attention_case(1, 4, 2, 2, 40, 32, torch.bfloat16)
    mask[0, 0, 1] = False  # the second query sees no key: zeros (SDPA would give NaN)
    got = kernels.masked_attention(q.bfloat16(), k, v, mask, torch.bfloat16)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:, :, 1], torch.zeros_like(got[:, :, 1]))
    want = F.scaled_dot_product_attention(
        q.bfloat16().float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True
    )
    torch.testing.assert_close(got[:, :, 0].float(), want[:, :, 0], atol=2e-2, rtol=2e-2)


def test_the_ops_call_the_kernels_at_inference_only(monkeypatch) -> None:
    q, k, v, mask = attention_case(1, 4, 2, 1, 30, 16, torch.float32)
    calls = []
    real = sdpa._few_rows_kernel

    def spy(*args):
        found = real(*args)
        calls.append(found is not None)
        return found

    monkeypatch.setattr(sdpa, "_few_rows_kernel", spy)
    with torch.inference_mode():
        fast = ops.attention(q, k, v, mask=mask)
    assert calls == [True]
    q.requires_grad_(True)
    slow = ops.attention(q, k, v, mask=mask)  # autograd: SDPA, differentiable
    assert calls == [True, False] and slow.requires_grad
    torch.testing.assert_close(fast, slow.detach(), atol=1e-5, rtol=1e-5)
    x, w = torch.randn(2, 576, requires_grad=True), torch.randn(576)
    y = ops.rms_norm(x, w, 1e-6)
    y.sum().backward()  # the torch path, with its gradient
    assert x.grad is not None
    monkeypatch.setenv("GPTKIT_KERNELS", "0")
    with torch.inference_mode():
        assert sdpa._few_rows_kernel(q, k, v, mask) is None


@pytest.mark.parametrize("family", ["llama", "gpt3"])
def test_decoding_with_and_without_the_kernels_gives_the_same_tokens(monkeypatch, family) -> None:
    model = tiny_model(64, **FAMILIES[family])
    cfg = SampleConfig(temperature=0.0, max_new_tokens=12, stop_at_eos=False)
    prompts = [[1, 2, 3, 4, 5], [7, 8]]

    def tokens() -> list[list[int]]:
        decoder = generate_ids(model, prompts, cfg, compile=False)
        rows: list[list[int]] = [[] for _ in prompts]
        for events in decoder:
            for i, e in enumerate(events):
                rows[i].append(e.token)
        return rows

    used = []
    real = sdpa._few_rows_kernel
    monkeypatch.setattr(sdpa, "_few_rows_kernel", lambda *a: used.append(1) or real(*a))
    fast = tokens()
    assert used, "decoding never reached the few-rows attention"
    monkeypatch.setenv("GPTKIT_KERNELS", "0")
    assert tokens() == fast


@pytest.mark.parametrize(
    ("family", "quant", "plan", "rows"),
    [
        ("gpt2", None, "modules", 2),
        ("sinusoidal", None, "modules", 2),
        ("llama", None, "modules", 2),
        ("llama", "int4", "bf16", 2),
        ("llama", "int4", "int4", 2),
        ("llama", "int4", "int4", 5),  # more rows than int4_gemv takes: block by block
        ("llama", "int8", "bf16", 2),
        ("llama", "bf16", "bf16", 2),
        ("gpt2", "int4", "modules", 2),
    ],
)
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_the_fused_step_equals_the_model(
    monkeypatch, family, quant, plan, rows, cache_dtype
) -> None:
    """decode_hidden against model.hidden, step after step, rows at different positions:
    the same hidden states and the same caches, bit for bit (both attend through the same
    kernel; the rotary embedding and the bf16 hand-offs round as the model does). int4
    layers are made with int4_gemv's row scales ("int4": every block in one call of
    int4_blocks) and without them (torch's int4 kernel), whatever the CPU's own choice."""
    from gptkit.model import KVCache
    from gptkit.model import quant as quantization
    from gptkit.model.decode_step import _plan, decode_hidden

    monkeypatch.setattr(quantization, "INT4_GEMV", plan == "int4")
    model = tiny_model(64, **FAMILIES[family], n_embd=64, n_head=4)
    if quant is not None:
        quantization.quantize(model, quant, lm_head="none")
    assert _plan(model) == plan
    caches = [KVCache(model.config, rows, 24, dtype=cache_dtype) for _ in range(2)]
    prompts = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 0]]).repeat(3, 1)[:rows]
    lengths = [4, 3] * 3
    with torch.no_grad():
        for cache in caches:
            model.hidden(prompts, cache)
            cache.set_pos(lengths[:rows])  # padding is overwritten, never read
        for t in range(6):
            x = torch.arange(rows)[:, None] * 10 + 10 + t
            fast = decode_hidden(model, x, caches[0])
            assert fast is not None
            plain = model.hidden(x, caches[1])
            assert torch.equal(fast, plain)
            assert caches[0].length == caches[1].length
            assert torch.equal(caches[0].pos, caches[1].pos)
        for a, b in zip(caches[0].k + caches[0].v, caches[1].k + caches[1].v, strict=True):
            assert torch.equal(a, b)


def test_the_fused_step_stands_aside(monkeypatch) -> None:
    from gptkit.model import KVCache
    from gptkit.model.decode_step import _plan, _plans, decode_hidden
    from gptkit.model.quant import quantize

    model = tiny_model(64, **FAMILIES["llama"], n_embd=64, n_head=4)
    cache = KVCache(model.config, 1, 24)
    x = torch.tensor([[3]])
    assert decode_hidden(model, x, cache) is None  # autograd on: the model's path
    with torch.no_grad():
        assert decode_hidden(model, torch.tensor([[3, 4]]), cache) is None  # two tokens
        assert decode_hidden(tiny_model(64, **FAMILIES["gpt1"]), x, cache) is None  # post-LN
        assert decode_hidden(tiny_model(64, **FAMILIES["gpt3"]), x, cache) is None  # banded
        assert decode_hidden(model, x, cache) is not None and _plans[model][1] == "modules"
        quantize(model, "int8", lm_head="none")  # new layers: a new plan
        assert _plan(model) == "bf16" and decode_hidden(model, x, cache) is not None
        assert _plans[model][1] == "bf16"
        handle = model.blocks[1].attn.register_forward_hook(lambda *a: None)
        assert decode_hidden(model, x, cache) is None  # a hook watches a block's attention
        handle.remove()
        assert decode_hidden(model, x, cache) is not None
        monkeypatch.setenv("GPTKIT_KERNELS", "0")
        assert decode_hidden(model, x, cache) is None


@pytest.mark.parametrize(
    ("M", "K", "N", "group"),
    [(1, 576, 960, 32), (4, 1536, 90, 64), (2, 256, 7, 128), (1, 96, 13, 32), (6, 64, 24, 32)],
)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int4_gemv_equals_its_definition(kernels, M, K, N, group, dtype) -> None:
    """int4 weights times activations rounded to int8 per group (x · 127 / max|x|), in
    bf16: against the dequantized weight times the rounded activations (and near the exact
    product); output widths that are not a multiple of eight (the last tile padded)."""
    from gptkit.model.quant import dequantize_int4, gemv_tiles, quantize_int4

    torch.manual_seed(K + N)
    w, x = torch.randn(N, K), torch.randn(M, K).to(dtype)
    q, sz = quantize_int4(w, group)
    tiles = gemv_tiles(q, sz, group)
    got = kernels.int4_gemv(x, tiles, N, group)
    assert got.dtype == torch.bfloat16 and got.shape == (M, N)
    for m in range(M):  # rows go four at a time, then one by one: a row's result is its own
        assert torch.equal(kernels.int4_gemv(x[m : m + 1], tiles, N, group), got[m : m + 1])
    xg = x.float().view(M, K // group, group)
    top = xg.abs().amax(-1, keepdim=True)
    inv = torch.full_like(top, 127.0) / top  # as the kernel divides (127 / t is 127 · (1 / t))
    rounded = (torch.round(xg * inv) * (top / 127)).view(M, K)  # ties to even, as the kernel
    weight = dequantize_int4(q, sz, group)
    want = rounded @ weight.T
    torch.testing.assert_close(got.float(), want, atol=1e-3, rtol=8e-3)  # bf16's rounding
    exact = x.float() @ weight.T
    assert (got.float() - exact).abs().max() < 0.02 * exact.abs().max()


def test_int4_layers_take_the_gemv_where_it_applies(monkeypatch) -> None:
    """On AVX2 CPUs without AVX-512 an int4 layer multiplies through int4_gemv at inference
    (eval mode), any number of rows, near the dequantized product; in training through
    torch's kernel."""
    from torch import nn

    from gptkit.model import quant

    if not quant.INT4_GEMV:
        pytest.skip("int4_gemv serves int4 layers on CPUs with AVX2 and no AVX-512 only")
    torch.manual_seed(0)
    layer = quant.Int4Linear.from_linear(nn.Linear(256, 96), quant.QuantConfig("int4")).eval()
    calls = []
    kernels = decode_kernels()
    real = kernels.int4_gemv
    monkeypatch.setattr(kernels, "int4_gemv", lambda *a: calls.append(a[0].shape[0]) or real(*a))
    weight = layer.dequantized()
    for rows in (1, 5, 40):
        x = torch.randn(rows, 256)
        with torch.inference_mode():
            y = layer(x)
        torch.testing.assert_close(y, x @ weight.T + layer.bias, atol=0.05, rtol=0.02)
    assert calls == [1, 5, 40]
    x = torch.randn(3, 256, requires_grad=True)
    layer.train()(x).sum().backward()  # training (QLoRA): torch's kernel, bf16 activations
    with torch.inference_mode():
        layer(x)  # in train mode, even without autograd
    assert calls == [1, 5, 40] and x.grad is not None
