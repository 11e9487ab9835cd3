"""Item sequences for next-item recommendation: MovieLens histories as token documents.

Each user's rated movies, in the order they were rated, become one document of item tokens
(``m242 m302 ...``, one token per movie id), the input SASRec (Kang & McAuley, 2018, "Self-
Attentive Sequential Recommendation") feeds its causal transformer. The item tokenizer is a
Hugging Face ``tokenizers`` word-level model whose id of ``m<i>`` is ``i`` (id 0 is the
end-of-text token that separates users), saved as an ordinary ``tokenizer.json``, so
``gptkit prepare --tokenizer`` writes the shards and ``gptkit train`` trains on them with no
special case.

Time order: MovieLens 100K ratings carry Unix-second timestamps and many users rated several
movies in the same second; such ties keep the order of the rows in ``u.data`` (a stable sort),
the same rule the data folder used to pick each user's last rating.

Leave-last-out (SASRec's protocol): each user's last item is the evaluation target, so
training documents end before it (``holdout`` items are cut from every history).

The same histories written as movie titles make chat requests ("which movie next?") for
fine-tuning a text model; the wording lives here so training rows and evaluation prompts are
the same text.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models, pre_tokenizers

from gptkit.errors import GptkitError
from gptkit.files import atomic_write_text
from gptkit.tokenizer import EOT, BPETokenizer, Tokenizer

ITEM_PREFIX = "m"  # item token of movie 242: "m242"
GENRES = (  # u.item's 19 genre flags, in file order (u.genre)
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance",
    "Sci-Fi", "Thriller", "War", "Western",
)  # fmt: skip
HISTORY_PROMPT = (
    "Here are the movies a user rated, oldest first:\n{titles}\n\nWhich movie will the user "
    "rate next? Reply with its title only."
)


@dataclass(frozen=True)
class Movie:
    """One row of ``u.item``."""

    id: int
    title: str
    genres: tuple[str, ...]


def item_token(item: int) -> str:
    """The token text of movie ``item``: ``m242``."""
    return f"{ITEM_PREFIX}{item}"


def read_ratings(path: str | Path) -> dict[int, list[int]]:
    """Each user's rated movie ids in time order (ties keep ``u.data``'s row order).

    Args:
        path: MovieLens ``u.data`` (``user<TAB>item<TAB>rating<TAB>timestamp``).
    """
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist; pass MovieLens' u.data (ml-100k)")
    rows: list[tuple[int, int, int, int]] = []
    with path.open(encoding="latin-1") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            try:
                user, item, _, stamp = (int(p) for p in parts)
            except ValueError:
                raise GptkitError(
                    f"{path}:{n}: expected 'user<TAB>item<TAB>rating<TAB>timestamp', got "
                    f"{line[:60]!r}"
                ) from None
            rows.append((user, stamp, n, item))
    if not rows:
        raise GptkitError(f"{path} holds no ratings")
    histories: dict[int, list[int]] = {}
    for user, _, _, item in sorted(rows):  # by user, then time, then row number
        histories.setdefault(user, []).append(item)
    return histories


def read_movies(path: str | Path) -> dict[int, Movie]:
    """Movie id -> :class:`Movie` from MovieLens ``u.item`` (Latin-1, ``|``-separated)."""
    path = Path(path)
    if not path.is_file():
        raise GptkitError(f"{path} does not exist; u.item must sit beside u.data")
    movies: dict[int, Movie] = {}
    for n, line in enumerate(path.read_text(encoding="latin-1").splitlines(), 1):
        parts = line.split("|")
        if len(parts) != 5 + len(GENRES) or not parts[0].isdigit():
            raise GptkitError(f"{path}:{n}: not a u.item row (id|title|...|19 genre flags)")
        flags = parts[5:]
        genres = tuple(g for g, flag in zip(GENRES, flags, strict=True) if flag == "1")
        movies[int(parts[0])] = Movie(int(parts[0]), parts[1], genres)
    return movies


def split_last(
    histories: Mapping[int, Sequence[int]], holdout: int = 1
) -> tuple[dict[int, list[int]], dict[int, int]]:
    """Leave-last-out: ``(train, targets)``, each user's history without its last
    ``holdout`` items and the item right after what ``train`` keeps (the first held out)."""
    if holdout < 1:
        raise GptkitError(f"holdout must be at least 1, got {holdout}")
    train, targets = {}, {}
    for user, items in histories.items():
        if len(items) <= holdout:
            continue  # nothing left to learn from or to predict from
        train[user] = list(items[:-holdout])
        targets[user] = items[-holdout]
    return train, targets


def item_tokenizer(n_items: int) -> BPETokenizer:
    """Word-level tokenizer over ``m1 .. m<n_items>``; id ``i`` is movie ``i``, id 0 the
    end-of-text token. Whitespace separates items; an unknown item is an error, not a guess."""
    if n_items < 1:
        raise GptkitError(f"the catalogue needs at least one item, got {n_items}")
    vocab = {EOT: 0} | {item_token(i): i for i in range(1, n_items + 1)}
    tok = HFTokenizer(models.WordLevel(vocab=vocab, unk_token=EOT))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([EOT])
    return BPETokenizer(tok, eos_token=EOT)


def catalogue_size(tokenizer: Tokenizer) -> int | None:
    """The number of items an item tokenizer covers (its ids 1..n are movies 1..n), or None
    for a text tokenizer (whose ``m1`` is not one token or not id 1)."""
    n = tokenizer.vocab_size - 1
    if n < 1 or tokenizer.encode(f"{item_token(1)} {item_token(n)}") != [1, n]:
        return None
    return n


def encode_items(items: Iterable[int]) -> str:
    """A history as item-token text."""
    return " ".join(item_token(i) for i in items)


def history_messages(titles: Sequence[str]) -> list[dict[str, str]]:
    """The chat request that asks which movie follows ``titles`` (oldest first)."""
    listed = "\n".join(f"- {t}" for t in titles)
    return [{"role": "user", "content": HISTORY_PROMPT.format(titles=listed)}]


def write_item_corpus(
    ratings: str | Path, out: str | Path, holdout: int = 1, seed: int = 1337
) -> dict[str, int | str]:
    """Write ``items.jsonl`` (one user's training history a record, users in a seeded
    shuffle so ``gptkit prepare``'s validation tail is a random tenth) and the item
    tokenizer (``tokenizer.json``) into ``out``.

    Args:
        ratings: MovieLens u.data; u.item beside it sets the catalogue size.
        out: the directory to write.
        holdout: items cut from the end of every history (the evaluation targets).
        seed: the seed of the user order.
    """
    ratings = Path(ratings)
    histories = read_ratings(ratings)
    n_items = max(read_movies(ratings.with_name("u.item")))
    train, _ = split_last(histories, holdout)
    users = sorted(train)
    random.Random(seed).shuffle(users)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lines = (json.dumps({"text": encode_items(train[u])}) + "\n" for u in users)
    atomic_write_text(out / "items.jsonl", "".join(lines))
    item_tokenizer(n_items).save(out)
    return {"users": len(users), "items": n_items, "tokens": sum(map(len, train.values()))}


def title_rows(
    ratings: str | Path,
    holdout: int = 1,
    history: int = 10,
    per_user: int = 1,
    limit: int | None = None,
    seed: int = 1337,
) -> list[dict[str, list[dict[str, str]]]]:
    """SFT rows (``messages``): the titles of up to ``history`` items, then the next item's
    title as the assistant's answer, taken at each user's last ``per_user`` training
    positions (never at the ``holdout`` items kept for evaluation); users in a seeded
    shuffle, at most ``limit`` rows."""
    if history < 1 or per_user < 1:
        raise GptkitError("history and per_user must be at least 1")
    ratings = Path(ratings)
    movies = read_movies(ratings.with_name("u.item"))
    train, _ = split_last(read_ratings(ratings), holdout)
    users = sorted(train)
    random.Random(seed).shuffle(users)
    rows = []
    for user in users:
        items = train[user]
        for end in range(len(items) - 1, max(0, len(items) - 1 - per_user), -1):
            titles = [movies[i].title for i in items[max(0, end - history) : end]]
            answer = {"role": "assistant", "content": movies[items[end]].title}
            rows.append({"messages": [*history_messages(titles), answer]})
        if limit is not None and len(rows) >= limit:
            return rows[:limit]
    return rows
