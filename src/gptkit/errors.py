"""The one exception type gptkit raises for bad input.

Its message is a single line that names the problem and the fix; the CLI prints it as
``error: <message>`` and exits with status 2 instead of showing a traceback.
"""

from __future__ import annotations


class GptkitError(Exception):
    """Bad input or state that the user can fix; ``str(err)`` says how."""


def shape_mismatch(
    expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]]
) -> str | None:
    """What differs between two name -> shape tables (missing, unexpected, wrong shape), in
    a few words for an error message, or None when they agree."""
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    shapes = [
        f"{k}: {found[k]} vs model {v}" for k, v in expected.items() if k in found and found[k] != v
    ]
    parts = []
    if missing:
        parts.append(f"missing {missing[:3]}")
    if unexpected:
        parts.append(f"unexpected {unexpected[:3]}")
    if shapes:
        parts.append(f"shape mismatch {shapes[:3]}")
    return "; ".join(parts) or None
