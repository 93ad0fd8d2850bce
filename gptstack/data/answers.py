"""Final answers that a program can check: the reference number of a worked solution (GSM8K's
`#### N` line) and the number a reply gives, both normalised, for verifiable rewards.

A number is written with optional sign, currency sign, thousands separators and decimals
(`-1,234.50`, `$12`, `.5`); normalised, it is the shortest plain decimal of its value (`-1234.5`,
`12`, `0.5`; `7.0` is `7`), so the comparison ignores how it was written.
"""

from __future__ import annotations

import decimal
import re

from gptstack.data.sources import DataError

# The marker before a worked solution's final answer (GSM8K's).
MARKER = '####'
NUMBER = re.compile(r'[-+]?\$?(?:\d[\d,]*(?:\.\d+)?|\.\d+)')
# How a reply's number is read: the last number it writes, or the first after the last MARKER.
RULES = ('last_number', 'marked_number')


def normalise_number(text: str) -> str | None:
    """The canonical decimal of a written number, or None when `text` is not one number."""
    text = text.strip().rstrip('.').replace(',', '').replace('$', '')
    if not text or not NUMBER.fullmatch(text):
        return None
    try:
        value = decimal.Decimal(text)
    except decimal.InvalidOperation:
        return None
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), 'f')


def final_answer(solution: str, where: str) -> str:
    """The normalised number after the last `####` of a worked solution.

    Raises:
        DataError: naming `where`, when there is no `####` or no number after it.
    """
    if MARKER not in solution:
        raise DataError(f"{where}: the answer has no '{MARKER}' line with the final number")
    tail = solution.rsplit(MARKER, 1)[1].strip()
    number = normalise_number(tail)
    if number is None:
        raise DataError(f"{where}: '{MARKER}' is followed by {tail[:40]!r}, not a number")
    return number


def reply_number(reply: str, rule: str) -> str | None:
    """The normalised number a reply gives by `rule` (`RULES`), or None if it gives none:
    `last_number` reads the last number written anywhere in it, `marked_number` the first
    number after its last `####`."""
    if rule == 'marked_number':
        if MARKER not in reply:
            return None
        found = NUMBER.search(reply.rsplit(MARKER, 1)[1])
        return normalise_number(found.group()) if found else None
    if rule == 'last_number':
        found = NUMBER.findall(reply)
        return normalise_number(found[-1]) if found else None
    raise ValueError(f'answer rule {rule!r}: expected one of {RULES}')
