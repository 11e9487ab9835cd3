"""Next-item recommendation: item sequences, HR/NDCG by hand, baselines, the eval task and
the recommend verbs, end to end through prepare, train and eval on a toy MovieLens."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from conftest import shared_path, tiny_model

from gptkit.data.sequences import (
    catalogue_size,
    item_tokenizer,
    read_movies,
    read_ratings,
    split_last,
    title_rows,
)
from gptkit.errors import GptkitError
from gptkit.eval.recommend import (
    continuation_logprobs,
    cooccurrence,
    cooccurrence_scores,
    movielens_eval,
    popularity_scores,
    ranking_metrics,
    target_rank,
)

N_ITEMS = 8


def _toy_movielens(root: Path) -> Path:
    """8 movies; 6 users who watch them mostly in a cycle 1 -> 2 -> ... -> 8 -> 1."""
    root.mkdir(parents=True, exist_ok=True)
    genres = "|0" * 19
    lines = [
        f"{i}|Movie {i} Caf\xe9 ({1990 + i})|01-Jan-1995||http://x{genres}\n" for i in range(1, 9)
    ]
    root.joinpath("u.item").write_bytes("".join(lines).encode("latin-1"))
    rows, stamp = [], 1000
    for user in range(1, 7):
        for n in range(7):
            stamp += 1
            rows.append(f"{user}\t{(user + n - 1) % N_ITEMS + 1}\t4\t{stamp}")
    rows.reverse()  # the file is not in time order
    root.joinpath("u.data").write_text("\n".join(rows) + "\n")
    return root / "u.data"


def test_toy_ranking_by_hand() -> None:
    # item ids 1..6 (index 0 is no item, its 9.0 never counts); the user saw item 2
    scores = np.array([9.0, 0.1, 0.9, 0.5, 0.5, 0.7, 0.2])
    # target 4 (0.5): item 5 (0.7) is ahead, item 2 (0.9) is seen, item 3 ties at 0.5 and
    # ties go by id, so 3 is ahead too: rank 3; counting item 2, rank 4
    assert target_rank(scores, 4, seen=[2]) == 3
    assert target_rank(scores, 4) == 4
    assert target_rank(scores, 3, seen=[2]) == 2  # only 5 ahead; 4 ties but comes later
    assert target_rank(scores, 1, seen=[2]) == 5  # 3, 4, 5, 6 ahead
    # ranks 1 and 3 hit @10, rank 11 and a miss do not: HR = 2/4; NDCG = (1/log2 2 + 1/log2 4)/4
    out = ranking_metrics([1, 3, 11, None], k=10)
    assert out == {"hr@10": 0.5, "ndcg@10": pytest.approx((1 + 0.5) / 4)}
    assert ranking_metrics([2], k=1) == {"hr@1": 0.0, "ndcg@1": 0.0}
    assert ranking_metrics([2], k=2)["ndcg@2"] == pytest.approx(1 / math.log2(3))
    with pytest.raises(GptkitError, match="k must be at least 1"):
        ranking_metrics([1], k=0)


def test_histories_in_time_order_and_leave_last_out(tmp_path: Path) -> None:
    data = tmp_path / "u.data"
    # user 7 rated 5, then 3 and 9 in the same second (file order: 3 first), then 1
    data.write_text("7\t9\t3\t20\n7\t1\t5\t30\n7\t3\t4\t20\n7\t5\t4\t10\n8\t2\t1\t5\n")
    histories = read_ratings(data)
    assert histories == {7: [5, 9, 3, 1], 8: [2]}  # ties keep the file's row order
    train, targets = split_last(histories)
    assert train == {7: [5, 9, 3]} and targets == {7: 1}  # user 8 has nothing to predict from
    data.write_text("7\tx\t3\t20\n")
    with pytest.raises(GptkitError, match=r"u\.data:1: expected"):
        read_ratings(data)


def test_item_tokenizer_ids_are_movie_ids(bpe_tokenizer) -> None:
    tok = item_tokenizer(1682)
    assert tok.encode("m1 m242 m1682") == [1, 242, 1682]
    assert tok.decode([242, 0, 5]) == "m242 <|endoftext|> m5"
    assert tok.eos_id == 0 and tok.vocab_size == 1683
    assert catalogue_size(tok) == 1682 and catalogue_size(bpe_tokenizer) is None


def test_baselines_by_hand() -> None:
    train = {1: [1, 2, 3], 2: [2, 3], 3: [3, 1]}
    assert popularity_scores(train, 4).tolist() == [0, 2, 2, 3, 0]
    c = cooccurrence(train, 4, window=1)  # j right after i
    assert c[1, 2] == 1 and c[2, 3] == 2 and c[3, 1] == 1 and c[2, 1] == 0
    c2 = cooccurrence(train, 4, window=2)
    assert c2[1, 3] == 1  # two steps apart in user 1's history
    s = cooccurrence_scores(c, [1, 2], recent=1)  # only item 2's row counts
    assert int(np.argmax(s)) == 3


def test_titles_and_sft_rows(tmp_path: Path) -> None:
    data = _toy_movielens(tmp_path / "ml")
    movies = read_movies(tmp_path / "ml" / "u.item")
    assert movies[1].title == "Movie 1 Café (1991)" and movies[1].genres == ()
    rows = title_rows(data, history=3, per_user=2)
    assert len(rows) == 12  # 6 users x 2 positions
    assert all(r["messages"][0]["content"].count("\n- ") == 3 for r in rows)
    # the answers are each user's 2nd- and 3rd-last items, never the held-out last one
    histories = read_ratings(data)
    want = sorted(movies[h[-n]].title for h in histories.values() for n in (2, 3))
    assert sorted(r["messages"][1]["content"] for r in rows) == want
    assert len(title_rows(data, limit=4)) == 4


def test_prefix_cached_scores_equal_row_by_row(chatml_tokenizer) -> None:
    from gptkit.eval.classification import score_options

    model = tiny_model(chatml_tokenizer.vocab_size, block_size=256)
    prompt = "Here are some movies: a quick brown fox\nNext:"
    options = [" the lazy dog", " jumps", " over the moon and back"]
    ours = continuation_logprobs(model, chatml_tokenizer, prompt, options)
    ref = score_options(model, chatml_tokenizer, [prompt], options)[0].numpy()
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
def test_end_to_end_prepare_train_eval_recommend(tmp_path: Path, capsys) -> None:
    from gptkit.cli import main

    data = _toy_movielens(tmp_path / "ml")
    seqs, shards, run = tmp_path / "seqs", tmp_path / "shards", tmp_path / "run"
    assert main(["recommend-data", "--out", str(seqs), "--data", str(data)]) == 0
    records = [json.loads(x)["text"] for x in (seqs / "items.jsonl").read_text().splitlines()]
    assert sorted(len(r.split()) for r in records) == [6] * 6  # each history minus its last
    argv = ["prepare", str(seqs / "items.jsonl"), "--out", str(shards), "--tokenizer", str(seqs)]
    assert main([*argv, "--val-fraction", "0.2", "--no-progress"]) == 0
    train = ["train", "--data", str(shards), "--out", str(run), "--vocab-size", "9"]
    train += ["--block-size", "8", "--n-layer", "1", "--n-head", "1", "--n-embd", "16"]
    train += ["--batch-size", "8", "--max-steps", "150", "--lr", "1e-2", "--warmup-steps", "5"]
    assert main([*train, "--eval-every", "0", "--save-every", "0", "--no-progress"]) == 0
    report = tmp_path / "report.json"
    argv = ["eval", "--model", str(run), "--task", "movielens", "--data", str(data)]
    assert main([*argv, "--report", str(report), "--no-progress"]) == 0
    result = json.loads(report.read_text())
    assert result["n"] == 6 and result["settings"]["method"] == "items"
    # the cycle is learnable: every target follows its history's last item
    assert result["metrics"]["hr@10"] == 1.0 and result["metrics"]["ndcg@10"] > 0.5
    assert {"popular_hr@10", "cooccur_hr@10", "hr@10_sampled100"} <= set(result["metrics"])
    capsys.readouterr()
    assert main(["recommend", "--model", str(run), "--user", "1,2,3", "--data", str(data)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert len(out) == 5 and out[0].startswith("  1. Movie 4 Café")  # 8 items less 3 seen
    assert main(["recommend", "--model", str(run), "--user", "@99", "--data", str(data)]) == 2


def test_text_model_reranks_candidates(tmp_path: Path, chatml_tokenizer) -> None:
    data = _toy_movielens(tmp_path / "ml")
    model = tiny_model(chatml_tokenizer.vocab_size, block_size=512)
    out = movielens_eval(model, chatml_tokenizer, data, candidates=3, progress=False)
    assert out["settings"]["method"] == "titles" and out["n"] == 6
    assert 0 <= out["metrics"]["candidate_recall@3"] <= 1
    assert out["metrics"]["hr@10"] <= out["metrics"]["candidate_recall@3"]
    assert all(len(r["top"]) == 2 for r in out["predictions"])  # 8 movies less 6 seen


def test_real_movielens_split() -> None:
    data = shared_path("movielens", "u.data")
    histories = read_ratings(data)
    assert len(histories) == 943 and sum(map(len, histories.values())) == 99906
    train, targets = split_last(histories)
    assert len(targets) == 943 and all(len(h) >= 18 for h in train.values())
