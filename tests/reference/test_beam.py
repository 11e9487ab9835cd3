"""Beam search against transformers' ``generate(num_beams=...)``: sequences and scores.

Each case builds a tiny random transformers model (test_hf's twins), loads it through
gptkit's converter, and runs both beam searches on the same prompts, with an eos id that the
model reaches (the third token of its best beam when no eos is set), so that some beams end
early and others run to ``max_new_tokens``. A batch of prompts of different lengths goes to
transformers left-padded, to gptkit as it is.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_hf import hf_model, save_as

from gptkit.checkpoint.hf import load_hf_dir
from gptkit.generate import BeamConfig, beam_search

transformers = pytest.importorskip("transformers")

#: (model, prompt lengths, num_beams, num_return_sequences, length_penalty, early_stopping,
#: no_repeat_ngram_size, max_new_tokens, whether a returned beam ends on eos)
CASES = [
    ("gpt2", [6], 4, 1, 1.0, False, 0, 12, True),
    ("gpt2", [5, 9], 3, 3, 0.5, True, 0, 10, True),
    ("gpt2", [7], 4, 4, 0.0, "never", 2, 10, True),
    ("llama-gqa-untied", [4, 8], 4, 2, 2.0, "never", 2, 12, False),
    ("llama-tied-bias", [6], 5, 5, -0.5, False, 3, 10, True),
    ("llama-gqa-untied", [9, 3], 2, 1, 1.0, False, 0, 8, False),
]


def prompts_of(lengths: list[int]) -> list[list[int]]:
    g = torch.Generator().manual_seed(sum(lengths))
    return [torch.randint(0, 128, (n,), generator=g).tolist() for n in lengths]


def hf_beams(model, prompts: list[list[int]], eos: int, **settings) -> tuple[list, list]:
    """transformers' beams: per returned sequence its generated ids (cut after eos) and
    its score; prompts left-padded with the eos id."""
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[eos] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = model.generate(
        ids,
        attention_mask=mask,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=eos,
        output_scores=True,
        return_dict_in_generate=True,
        **settings,
    )
    seqs = []
    for row in out.sequences[:, width:].tolist():
        seqs.append(row[: row.index(eos) + 1] if eos in row else row)
    return seqs, out.sequences_scores.tolist()


@pytest.mark.parametrize("name, lengths, beams, k, lp, early, ngram, new, ends_on_eos", CASES)
def test_beams_equal_transformers(
    name: str,
    lengths: list[int],
    beams: int,
    k: int,
    lp: float,
    early: bool | str,
    ngram: int,
    new: int,
    ends_on_eos: bool,
    tmp_path: Path,
) -> None:
    theirs = hf_model(name)
    save_as(theirs, tmp_path, "safetensors")
    with pytest.warns(UserWarning, match="no tokenizer"):
        ours, _ = load_hf_dir(tmp_path)
    prompts = prompts_of(lengths)
    cfg = BeamConfig(
        num_beams=beams,
        max_new_tokens=new,
        length_penalty=lp,
        early_stopping=early,  # type: ignore[arg-type]
        num_return_sequences=k,
        no_repeat_ngram_size=ngram,
    )
    eos = beam_search(ours, prompts, cfg, None)[0][0].tokens[2]

    found = beam_search(ours, prompts, cfg, eos)
    seqs, scores = hf_beams(
        theirs,
        prompts,
        eos,
        num_beams=beams,
        num_return_sequences=k,
        length_penalty=lp,
        early_stopping=early,
        no_repeat_ngram_size=ngram,
        max_new_tokens=new,
    )
    flat = [b for per_prompt in found for b in per_prompt]
    assert [len(per_prompt) for per_prompt in found] == [k] * len(prompts)
    assert [list(b.tokens) for b in flat] == seqs
    torch.testing.assert_close(
        torch.tensor([b.score for b in flat]), torch.tensor(scores), rtol=1e-4, atol=1e-5
    )
    assert {b.finish_reason for b in flat} <= {"eos", "length"}
    assert any(b.finish_reason == "eos" for b in flat) == ends_on_eos
    assert all((b.finish_reason == "eos") == (b.tokens[-1] == eos) for b in flat)
