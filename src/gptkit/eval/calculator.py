"""The GSM8K calculator (Cobbe et al. 2021, "Training Verifiers to Solve Math Word Problems").

GSM8K's reference solutions carry calculator annotations: ``48/2 = <<48/2=24>>24 clips``. A
model fine-tuned on them writes the annotations too; with the calculator on, once it has
written ``<<48/2=`` the result ``24>>`` is written for it, so a small model's arithmetic
slips stop costing it the answer. Pass :func:`calculator` as the ``tool`` of
:func:`gptkit.generate.generate` (``gptkit eval --task gsm8k --calculator`` does that).

Only arithmetic is evaluated (numbers, ``+ - * / // % **`` and brackets, through Python's
``ast``, never ``eval``); anything else is left to the model.
"""

from __future__ import annotations

import ast
import math
import re

#: an opened annotation that has just reached its "=": ``<<expression=``
_OPEN = re.compile(r"<<([^<>=\n]{1,100})=$")
_MAX_EXPONENT = 64
_MAX_MAGNITUDE = 1e15

_BINARY = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
}


def _value(node: ast.AST) -> float:
    if isinstance(node, ast.Expression):
        return _value(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return float(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp):
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if abs(b) > _MAX_EXPONENT:
                raise ValueError("exponent too large")
            return a**b
        op = _BINARY.get(type(node.op))
        if op is not None:
            return op(a, b)
    raise ValueError(f"not arithmetic: {ast.dump(node)[:60]}")


def evaluate_arithmetic(expression: str) -> float | None:
    """The value of an arithmetic expression as GSM8K writes them (``48/2``, ``3*$5``,
    ``1,200+300``, ``20%*50``, ``7%3``), or None when it is not plain arithmetic or has no finite
    value of sensible size. Dollar signs and thousands commas are ignored; ``20%`` is 0.2
    unless a number follows (``7%3`` is the remainder)."""
    text = expression.replace("$", "").replace(",", "").replace("x", "*").strip()
    text = re.sub(r"(\d+(?:\.\d+)?)\s*%(?!\s*[\d(.])", r"(\1/100)", text)  # not 7%3
    if not text or len(text) > 100:
        return None
    try:
        value = _value(ast.parse(text, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError):
        return None
    if isinstance(value, complex) or not math.isfinite(value) or abs(value) > _MAX_MAGNITUDE:
        return None
    return value


def format_number(value: float) -> str:
    """How GSM8K writes a result: integers without a decimal point, others with at most six
    decimals and no trailing zeros (``24``, ``0.2``, ``-3.5``)."""
    rounded = round(value)
    if abs(value - rounded) < 1e-9:
        return str(int(rounded))
    return f"{value:.6f}".rstrip("0").rstrip(".")


def calculator(text: str) -> str | None:
    """A ``tool`` for :func:`gptkit.generate.generate`: when ``text`` (a row's output so far)
    ends in an opened annotation ``<<expression=`` whose expression is arithmetic, the text
    to write next, the result and the closing ``>>``; otherwise None."""
    if not text.endswith("="):
        return None
    m = _OPEN.search(text[-110:])
    if m is None:
        return None
    value = evaluate_arithmetic(m.group(1))
    return None if value is None else format_number(value) + ">>"
