"""Next-item recommendation: leave-last-out HR@K and NDCG@K over the full catalogue.

Protocol (SASRec, Kang & McAuley 2018, Sec. IV-B, but without its sampled negatives): each
user's last rated movie is the target and the rest of the history the input. Every movie in
the catalogue is ranked, except the ones the user already rated (they are removed before
ranking, as in RecBole's and Krichene & Rendle's (KDD 2020, "On Sampled Metrics for Item
Recommendation") full-ranking evaluations). With the target at 1-based rank ``r``::

    HR@K   = 1 if r <= K else 0
    NDCG@K = 1 / log2(r + 1) if r <= K else 0      (one relevant item: the ideal DCG is 1)

averaged over users. Items with equal scores are ordered by id (a fixed, score-blind rule).
The sampled variant (the target among 100 random unseen items, SASRec's protocol) is reported
beside, only to place our figures against papers that used it.

Scorers, all with the same interface (one score per item id):

- a GPT over item tokens (:mod:`gptkit.data.sequences`): the next-token distribution after
  the history;
- a text model (SmolLM2 fine-tuned on histories written as titles): the log-likelihood of
  each candidate's title after the chat request; scoring 1,682 titles per user is too slow
  on two CPU cores, so it re-ranks the top ``candidates`` of the co-occurrence baseline (a
  candidate stage that never sees the target; a target it misses counts as a miss);
- most popular (training interactions per item) and item-to-item co-occurrence (Linden et
  al. 2003: how often each item followed the user's recent items within a few positions in
  the training histories).
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from gptkit.data.sequences import (
    HISTORY_PROMPT,
    Movie,
    catalogue_size,
    history_messages,
    read_movies,
    read_ratings,
    split_last,
    title_rows,
    write_item_corpus,
)
from gptkit.errors import GptkitError
from gptkit.eval.examples import Example, check_limit, find_data
from gptkit.files import atomic_write_text
from gptkit.generate.chat import apply_chat_template
from gptkit.model import GPT
from gptkit.model.kv_cache import KVCache
from gptkit.tokenizer import Tokenizer

K = 10
WINDOW = 5  # co-occurrence: j counts for i when it comes at most this many items later
RECENT = 5  # co-occurrence: the user's last items whose neighbours are summed
SAMPLED = 100  # SASRec's sampled protocol: negatives per user


# -- metrics -------------------------------------------------------------------------------


def target_rank(scores: np.ndarray, target: int, seen: Sequence[int] = ()) -> int:
    """1-based rank of ``target`` among the items of ``scores`` (indexed by item id; index
    0 is no item), the ``seen`` items left out; ties are ordered by item id."""
    s = np.asarray(scores, dtype=np.float64)
    rival = np.ones(len(s), dtype=bool)
    rival[0] = False
    rival[list(seen)] = False
    rival[target] = False
    t = s[target]
    ahead = (s > t) | ((s == t) & (np.arange(len(s)) < target))
    return int((ahead & rival).sum()) + 1


def ranking_metrics(ranks: Sequence[int | None], k: int = K) -> dict[str, float]:
    """HR@k and NDCG@k of 1-based target ranks (None: the target was not ranked)."""
    if k < 1:
        raise GptkitError(f"k must be at least 1, got {k}")
    n = max(1, len(ranks))
    hits = [r for r in ranks if r is not None and r <= k]
    return {
        f"hr@{k}": len(hits) / n,
        f"ndcg@{k}": sum(1 / math.log2(r + 1) for r in hits) / n,
    }


# -- baselines -----------------------------------------------------------------------------


def popularity_scores(train: Mapping[int, Sequence[int]], n_items: int) -> np.ndarray:
    """Training interactions per item id (index 0 unused)."""
    counts = np.zeros(n_items + 1)
    for items in train.values():
        np.add.at(counts, list(items), 1)
    return counts


def cooccurrence(
    train: Mapping[int, Sequence[int]], n_items: int, window: int = WINDOW
) -> np.ndarray:
    """``C[i, j]``: how often ``j`` came within ``window`` items after ``i`` in a history."""
    c = np.zeros((n_items + 1, n_items + 1), dtype=np.float32)
    for items in train.values():
        a = np.asarray(items)
        for d in range(1, window + 1):
            np.add.at(c, (a[:-d], a[d:]), 1)
    return c


def cooccurrence_scores(c: np.ndarray, history: Sequence[int], recent: int = RECENT) -> np.ndarray:
    """Item-to-item scores of a user: the co-occurrence rows of the last ``recent`` items
    summed (a tiny popularity term breaks ties among items no recent item led to)."""
    return c[list(history[-recent:])].sum(0) + 1e-6 * c.sum(0)


# -- model scores --------------------------------------------------------------------------


@torch.no_grad()
def item_scores(model: GPT, histories: Sequence[Sequence[int]], eos: int = 0) -> np.ndarray:
    """Next-item log-probabilities (N, V) of an item-token GPT after each history (kept to
    the model's context, after the end-of-text token that starts every document)."""
    device = next(model.parameters()).device
    rows = [[eos, *h][-model.config.block_size :] for h in histories]
    x = torch.zeros(len(rows), max(map(len, rows)), dtype=torch.long)  # right-padded; causal
    for r, ids in enumerate(rows):
        x[r, : len(ids)] = torch.tensor(ids)
    was_training = model.training
    model.eval()  # no dropout while scoring
    h = model.hidden(x.to(device))  # (N, T, C)
    last = h[torch.arange(len(rows)), torch.tensor([len(r) - 1 for r in rows])]  # (N, C)
    model.train(was_training)
    return F.log_softmax(model.lm_head(last).float(), -1).cpu().numpy()


def history_prompt(tokenizer: Tokenizer, titles: Sequence[str]) -> str:
    """The request to a text model: its chat template, or the plain text with "Answer:"."""
    if tokenizer.chat_template is not None:
        return apply_chat_template(tokenizer, history_messages(titles))
    listed = "\n".join(f"- {t}" for t in titles)
    return HISTORY_PROMPT.format(titles=listed) + "\nAnswer:"


@torch.no_grad()
def continuation_logprobs(
    model: GPT, tokenizer: Tokenizer, prompt: str, options: Sequence[str]
) -> np.ndarray:
    """Log-likelihood of each option's tokens after ``prompt``, the prompt run once.

    What :func:`gptkit.eval.classification.score_options` computes row by row, with the
    prompt's keys and values computed once and copied to one cache row per option, so
    ranking K titles costs one prompt plus K short continuations instead of K prompts.
    """
    opts = [tokenizer.encode(o, allow_special=False) for o in options]
    if not opts or any(not o for o in opts):
        raise GptkitError("every option needs some text")
    width = max(map(len, opts))
    ids = tokenizer.encode_prompt(prompt)[-max(1, model.config.block_size - width) :]
    param = next(model.parameters())
    was_training = model.training
    model.eval()
    cache = KVCache(model.config, 1, len(ids) + width, param.device, param.dtype)
    h = model.hidden(torch.tensor([ids], device=param.device), cache=cache)  # (1, P, C)
    first = F.log_softmax(model.lm_head(h[0, -1]).float(), -1)  # (V,)
    cache.keep(torch.zeros(len(opts), dtype=torch.long, device=param.device))
    x = torch.zeros(len(opts), width, dtype=torch.long)  # right-padded: padding comes after
    for r, o in enumerate(opts):
        x[r, : len(o)] = torch.tensor(o)
    h = model.hidden(x.to(param.device), cache=cache)  # (K, W, C)
    logp = F.log_softmax(model.lm_head(h[:, :-1]).float(), -1)  # (K, W-1, V): tokens 1..
    model.train(was_training)
    out = np.zeros(len(opts))
    for r, o in enumerate(opts):
        out[r] = first[o[0]].item() + sum(logp[r, t - 1, o[t]].item() for t in range(1, len(o)))
    return out


def title_scores(
    model: GPT, tokenizer: Tokenizer, titles: Sequence[str], candidates: Sequence[str]
) -> np.ndarray:
    """Log-likelihood of each candidate title as the answer to the history request."""
    prompt = history_prompt(tokenizer, titles)
    options = [" " + c if tokenizer.chat_template is None else c for c in candidates]
    return continuation_logprobs(model, tokenizer, prompt, options)


# -- the evaluation ------------------------------------------------------------------------


def _catalogue_path(path: Path) -> Path:
    return path / "u.data" if path.is_dir() else path


def _catalogue(path: Path) -> tuple[dict[int, list[int]], dict[int, Movie]]:
    path = _catalogue_path(path)
    return read_ratings(path), read_movies(path.with_name("u.item"))


def read_movielens(path: str | Path, limit: int | None = None) -> list[Example]:
    """Leave-last-out examples of MovieLens ``u.data`` (u.item beside it), users in id
    order: ``history`` (item ids), ``target`` (the last item), the request written with
    titles (``prompt``, ``messages``) and the target's title as ``reference``."""
    check_limit(limit)
    histories, movies = _catalogue(Path(path))
    train, targets = split_last(histories)
    examples: list[Example] = []
    for user in sorted(targets)[:limit]:
        titles = [movies[i].title for i in train[user]]
        messages = history_messages(titles)
        examples.append(
            dict(
                id=f"user {user}",
                user=user,
                history=train[user],
                target=targets[user],
                prompt=messages[0]["content"] + "\nAnswer:",
                messages=messages,
                reference=movies[targets[user]].title,
            )
        )
    return examples


def _negatives(n_items: int, target: int, seen: set[int], rng: random.Random) -> list[int]:
    """SASRec's sampled protocol: ``SAMPLED`` random items the user never rated."""
    pool = [i for i in range(1, n_items + 1) if i != target and i not in seen]
    return rng.sample(pool, min(SAMPLED, len(pool)))


def _sampled_rank(scores: np.ndarray, target: int, negatives: list[int]) -> int:
    """1-based rank of ``target`` among itself and ``negatives`` (ties by id)."""
    t, neg = scores[target], scores[negatives]
    return int(((neg > t) | ((neg == t) & (np.asarray(negatives) < target))).sum()) + 1


def _top(scores: np.ndarray, seen: set[int], k: int) -> list[int]:
    """The ``k`` best unseen items (ties by id)."""
    s = np.asarray(scores, dtype=np.float64).copy()
    s[0] = -np.inf
    s[list(seen)] = -np.inf
    order = np.lexsort((np.arange(len(s)), -s))
    return [int(i) for i in order[:k] if np.isfinite(s[i])]


def _item_logprobs(
    model: GPT, tokenizer: Tokenizer, examples: Sequence[Example], batch_size: int
) -> np.ndarray | None:
    """An item model's scores (N, V), a batch of users per forward; None for a text model."""
    if catalogue_size(tokenizer) is None:
        return None
    parts = []
    for b in range(0, len(examples), batch_size):
        parts.append(item_scores(model, [ex["history"] for ex in examples[b : b + batch_size]]))
    return np.concatenate(parts)


def movielens_eval(
    model: GPT,
    tokenizer: Tokenizer,
    path: str | Path,
    limit: int | None = None,
    k: int = K,
    candidates: int = 20,
    history: int = 10,
    batch_size: int = 64,
    progress: bool = True,
    seed: int = 0,
) -> dict[str, Any]:
    """HR@k / NDCG@k of ``model`` and of the two baselines on leave-last-out MovieLens.

    Args:
        model, tokenizer: an item-token GPT (its tokenizer from ``gptkit recommend-data``)
            or a text model, which re-ranks ``candidates`` titles (see the module doc).
        path: u.data (u.item beside it) or the directory holding both.
        limit: evaluate the first N users (by id).
        k: the cut-off of HR and NDCG.
        candidates: for a text model, how many co-occurrence candidates it re-ranks.
        history: for a text model, the most recent titles it is shown.
        batch_size: users per forward pass of an item model.
        progress: show a progress bar.
        seed: the seed of the sampled-negatives protocol.
    """
    examples = read_movielens(path, limit)
    histories, movies = _catalogue(Path(path))
    train, _ = split_last(histories)
    n_items = max(movies)
    pop, co = popularity_scores(train, n_items), cooccurrence(train, n_items)
    item_logp = _item_logprobs(model, tokenizer, examples, batch_size)
    if item_logp is not None and item_logp.shape[1] != n_items + 1:
        raise GptkitError(
            f"the model knows {item_logp.shape[1] - 1} items but the catalogue has {n_items}; "
            "train it on item tokens written by `gptkit recommend-data` from this data"
        )
    ranks: dict[str, list[int | None]] = {m: [] for m in ("model", "popular", "cooccur")}
    sampled: dict[str, list[int | None]] = {m: [] for m in ("model", "popular", "cooccur")}
    rng = random.Random(seed)
    recall, rows = 0, []
    for i, ex in enumerate(tqdm(examples, desc="rank", disable=not progress)):
        seen, target = set(ex["history"]), ex["target"]
        base = {"popular": pop, "cooccur": cooccurrence_scores(co, ex["history"])}
        if item_logp is not None:
            base["model"] = item_logp[i]
            top = _top(item_logp[i], seen, k)
        else:  # a text model re-ranks the co-occurrence candidates
            pool = _top(base["cooccur"], seen, candidates)
            recall += target in pool
            titles = [movies[j].title for j in ex["history"][-history:]]
            s = title_scores(model, tokenizer, titles, [movies[j].title for j in pool])
            top = [pool[j] for j in np.argsort(-s, kind="stable")]
            ranks["model"].append(top.index(target) + 1 if target in top else None)
        negatives = _negatives(n_items, target, seen, rng)  # the same for every scorer
        for name, s in base.items():
            ranks[name].append(target_rank(s, target, list(seen)))
            sampled[name].append(_sampled_rank(s, target, negatives))
        rows.append({"id": ex["id"], "target": target, "rank": ranks["model"][-1], "top": top[:k]})
    metrics = ranking_metrics(ranks["model"], k)
    for name in ("popular", "cooccur"):
        metrics |= {f"{name}_{m}": v for m, v in ranking_metrics(ranks[name], k).items()}
    for name, r in sampled.items():
        if r:  # a text model ranks candidates only: no sampled figure
            prefix = "" if name == "model" else f"{name}_"
            sub = ranking_metrics(r, k).items()
            metrics |= {f"{prefix}{m}_sampled{SAMPLED}": v for m, v in sub}
    settings: dict[str, Any] = {
        "method": "items" if item_logp is not None else "titles",
        "k": k,
        "excluded": "items the user rated",
    }
    if item_logp is None:
        metrics[f"candidate_recall@{candidates}"] = recall / max(1, len(examples))
        settings |= {"candidates": candidates, "history": history}
    return {"metrics": metrics, "n": len(examples), "settings": settings, "predictions": rows}


# -- the command line ----------------------------------------------------------------------


def recommend(
    model: GPT,
    tokenizer: Tokenizer,
    history: Sequence[int],
    ratings: str | Path,
    k: int = K,
    candidates: int = 20,
) -> list[int]:
    """The ``k`` unseen movie ids ``model`` ranks highest after ``history`` (an item model
    over the whole catalogue; a text model over the co-occurrence candidates of
    ``ratings``' histories)."""
    histories, movies = _catalogue(Path(ratings))
    unknown = [i for i in history if i not in movies]
    if unknown or not history:
        raise GptkitError(
            f"movie ids {unknown or '(none)'} are not in the catalogue 1..{max(movies)}; give "
            "ids of u.item"
        )
    seen = set(history)
    if catalogue_size(tokenizer) is not None:
        return _top(item_scores(model, [history])[0], seen, k)
    co = cooccurrence(split_last(histories)[0], max(movies))
    pool = _top(cooccurrence_scores(co, history), seen, max(k, candidates))
    titles = [movies[i].title for i in history[-10:]]
    s = title_scores(model, tokenizer, titles, [movies[i].title for i in pool])
    return [pool[j] for j in np.argsort(-s, kind="stable")[:k]]


def _parse_history(user: str, ratings: Path) -> list[int]:
    if user.startswith("@"):  # a user of the data set: the whole history
        histories, _ = _catalogue(ratings)
        uid = int(user[1:]) if user[1:].isdigit() else -1
        if uid not in histories:
            raise GptkitError(f"--user {user}: no such user id in {ratings}")
        return histories[uid]
    try:
        return [int(p) for p in user.replace(",", " ").split()]
    except ValueError:
        raise GptkitError(
            f"--user {user!r}: give movie ids oldest first ('1,50,181') or @ID for a user "
            "of the data set"
        ) from None


def _ratings_path(data: str | None) -> Path:
    if data is None:
        return find_data("movielens/u.data", "movielens")
    if not Path(data).exists():
        raise GptkitError(f"--data {data} does not exist; pass MovieLens' u.data or its folder")
    return _catalogue_path(Path(data))


def recommend_cmd(
    model: str,
    user: str,
    top_k: int = K,
    data: str | None = None,
    candidates: int = 20,
) -> list[int]:
    """Print the movies a model recommends after a user's history.

    Args:
        model: an item-token GPT trained on `gptkit recommend-data` shards, or a text model
            fine-tuned on histories written as titles (it re-ranks co-occurrence candidates).
        user: the history, movie ids oldest first ("1,50,181"), or @ID for that user's
            ratings in the data.
        top_k: how many movies to print.
        data: MovieLens u.data (u.item beside it); default movielens/u.data in GPTKIT_DATA
            or shared/data.
        candidates: for a text model, how many candidates it re-ranks.
    """
    from gptkit.checkpoint import load

    ratings = _ratings_path(data)
    history = _parse_history(user, ratings)
    net, tok = load(model)
    if tok is None:
        raise GptkitError(f"{model} has no tokenizer; recommending needs one")
    movies = read_movies(ratings.with_name("u.item"))
    top = recommend(net, tok, history, ratings, top_k, candidates)
    for rank, item in enumerate(top, 1):
        print(f"{rank:>3}. {movies[item].title}  (movie {item})")
    return top


def recommend_data_cmd(
    out: str,
    data: str | None = None,
    titles: bool = False,
    history: int = 10,
    per_user: int = 1,
    limit: int | None = None,
    seed: int = 1337,
) -> None:
    """Write MovieLens training histories (each user's last rating held out for evaluation).

    Args:
        out: a directory for items.jsonl and the item tokenizer (then `gptkit prepare
            OUT/items.jsonl --tokenizer OUT`), or with --titles the .jsonl of chat SFT rows.
        data: MovieLens u.data (u.item beside it); default movielens/u.data in GPTKIT_DATA
            or shared/data.
        titles: write histories as titles for fine-tuning a text model instead.
        history: --titles: the most recent titles in each request.
        per_user: --titles: rows per user (its last training positions).
        limit: --titles: at most N rows.
        seed: the seed of the user order.
    """
    ratings = _ratings_path(data)
    if not titles:
        info = write_item_corpus(ratings, out, seed=seed)
        users, items, movies = info["users"], info["tokens"], info["items"]
        print(f"wrote {users} users' {items} ratings and a tokenizer of {movies} movies to {out}")
        return
    rows = title_rows(ratings, history=history, per_user=per_user, limit=limit, seed=seed)
    atomic_write_text(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"wrote {len(rows)} examples to {out}")
