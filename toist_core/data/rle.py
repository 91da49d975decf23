"""Checks of COCO RLE ``counts`` before pycocotools reads them.

pycocotools trusts an RLE's counts. Its C decoder of a compressed string (``rleFrString``)
reads past the end of a string cut short inside a number, takes any byte as a digit, and
stores runs as unsigned ints, so a negative run becomes four billion pixels. Counts that do
not add up to ``height * width`` then make ``mask.iou`` loop (practically) forever, or
``mask.decode`` paint from uninitialised memory, or the mask AP change without a word. So
every RLE that toist hands to pycocotools is checked here first.

The compressed format (pycocotools' ``rleToString``): each run is stored as the difference
to the run two places before it (from the fourth run on), as a signed number in little-endian
groups of 5 bits; a character is ``48 + group``, plus 32 when another group follows, and the
last group's bit 16 is the sign. Valid characters are therefore ``chr(48)`` .. ``chr(111)``.

A compressed string is decoded with numpy over all its characters at once, and
:func:`first_bad_counts` decodes the strings of many masks (e.g. the 100 of one image) in one
pass, so the check stays a small part of an evaluation.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import numpy as np

Counts = Union[str, bytes, list]

_FIRST_CHAR, _LAST_CHAR = 48, 111       # "0" .. "o": 48 + a 6-bit group
_MORE, _SIGN, _BITS = 0x20, 0x10, 0x1F  # continuation flag, sign of the last group, payload
# pycocotools shifts each group as a C int: numbers of up to 6 groups (runs below 2**29 pixels,
# every real image) decode exactly; longer ones overflow there, so they are refused.
MAX_NUMBER_CHARS = 6


def counts_problem(counts: Counts, height: int, width: int) -> Optional[str]:
    """What is wrong with one RLE's ``counts`` for a ``height`` x ``width`` mask (None: nothing).

    ``counts`` is a compressed string (``str`` or ``bytes``) or an uncompressed list of runs.
    """
    found = first_bad_counts([counts], [height * width])
    return None if found is None else found[1]


def first_bad_counts(counts: Sequence[Counts], pixels: Sequence[int]) -> Optional[tuple[int, str]]:
    """The first ``(index, problem)`` among RLE ``counts`` whose runs do not cover exactly
    ``pixels[index]`` (= height * width) pixels, or None when all are valid.

    Compressed strings must hold only valid characters, end with a complete number and decode
    to non-negative runs; lists must hold non-negative integers. Either must sum to ``pixels``.
    """
    if set(map(type, counts)) <= {str, bytes}:  # the usual case: no per-mask Python work
        return _first_bad_strings(counts, np.asarray(pixels, dtype=np.int64))
    strings, string_at = [], []
    for index, value in enumerate(counts):
        if isinstance(value, list):
            problem = _list_problem(value, pixels[index])
            if problem is not None:
                return index, problem
        elif isinstance(value, (str, bytes)):
            strings.append(value)
            string_at.append(index)
        else:
            return index, f"RLE 'counts' must be a string or a list of integers, got {type(value).__name__}"
    if not strings:
        return None
    found = _first_bad_strings(strings, np.asarray([pixels[i] for i in string_at], dtype=np.int64))
    return None if found is None else (string_at[found[0]], found[1])


def _list_problem(runs: list, pixels: int) -> Optional[str]:
    # Exact types: JSON true/false (bool) is not a run length. C-speed passes; a crowd region's
    # list can hold thousands of runs.
    if not set(map(type, runs)) <= {int}:
        bad = next(v for v in runs if type(v) is not int)
        return f"RLE 'counts' list must hold non-negative integers, got {bad!r}"
    if min(runs, default=0) < 0:
        return f"RLE 'counts' list must hold non-negative integers, got {min(runs)}"
    return _sum_problem(sum(runs), pixels)


def _sum_problem(total: int, pixels: int) -> Optional[str]:
    if total == pixels:
        return None
    return f"RLE 'counts' cover {total} pixels, not height * width = {pixels} (cut short or corrupted?)"


def _first_bad_strings(strings: Sequence, pixels: np.ndarray) -> Optional[tuple[int, str]]:
    """:func:`first_bad_counts` of compressed strings, decoded together: a fixed number of numpy
    passes over all their characters (a per-character Python loop would cost more than the
    evaluation it protects). int64 throughout: exact for any string (a number is below 2**29)."""
    encoded = _ascii(strings)
    if isinstance(encoded, tuple):
        return encoded
    lengths = np.fromiter(map(len, encoded), dtype=np.int64, count=len(encoded))
    ends = np.cumsum(lengths)              # one past each string's last character
    starts = ends - lengths
    groups = np.frombuffer(b"".join(encoded), dtype=np.uint8) - np.uint8(_FIRST_CHAR)  # below 48 wraps past 63
    if len(groups) and groups.max() > _LAST_CHAR - _FIRST_CHAR:
        position = int(np.argmax(groups > _LAST_CHAR - _FIRST_CHAR))
        index = int(_owner(starts, position))
        return index, _char_problem(chr((int(groups[position]) + _FIRST_CHAR) % 256), position - int(starts[index]))
    terminal = groups < _MORE              # the character ends a number
    inner = np.flatnonzero(~terminal)      # the others (few: most numbers are one character)

    # A string must end where a number ends; then no number spans two strings.
    nonempty = np.flatnonzero(lengths)
    cut = nonempty[~terminal[ends[nonempty] - 1]]
    if len(cut):
        return int(cut[0]), "RLE 'counts' string ends inside a number (cut short?)"

    values = _numbers(groups, terminal, inner)
    if isinstance(values, tuple):          # a number too long: (its first character, its length)
        position, width = values
        index = int(_owner(starts, position))
        return index, (f"RLE 'counts' string holds a number of {width} characters at position "
                       f"{position - int(starts[index])}; pycocotools reads at most {MAX_NUMBER_CHARS}")
    ended = ends - np.searchsorted(inner, ends)      # numbers ended by each string's end
    first = np.concatenate(([0], ended[:-1]))        # each string's first number
    runs = _undelta(values, first[nonempty])
    if len(runs) and runs.min() < 0:  # pycocotools would read it as an unsigned 4 billion
        k = int(np.argmax(runs < 0))
        index = int(np.searchsorted(ended, k, side="right"))
        return index, (f"RLE 'counts' string decodes to a negative run ({int(runs[k])} pixels, "
                       f"run {k - int(first[index])})")
    totals = np.zeros(len(encoded), dtype=np.int64)  # an empty string covers no pixel
    if len(nonempty):
        totals[nonempty] = np.add.reduceat(runs, first[nonempty])
    wrong = np.flatnonzero(totals != pixels)
    if len(wrong):
        index = int(wrong[0])
        return index, _sum_problem(int(totals[index]), int(pixels[index]))
    return None


def _ascii(strings: Sequence) -> Union[list, tuple[int, str]]:
    """The strings as bytes, or ``(index, problem)`` of the first holding a non-ASCII character."""
    try:
        return [s.encode("ascii") if isinstance(s, str) else s for s in strings]
    except UnicodeEncodeError:
        index = next(i for i, s in enumerate(strings) if isinstance(s, str) and not s.isascii())
        position = next(p for p, char in enumerate(strings[index]) if not char.isascii())
        return index, _char_problem(strings[index][position], position)


def _char_problem(char: str, position: int) -> str:
    return (f"RLE 'counts' string holds {char!r} at position {position}; a compressed RLE uses the characters "
            f"{chr(_FIRST_CHAR)!r} to {chr(_LAST_CHAR)!r} only")


def _owner(starts: np.ndarray, position) -> np.ndarray:
    """Index of the string a character position lies in (empty strings own no position)."""
    return np.searchsorted(starts, position, side="right") - 1


def _numbers(groups: np.ndarray, terminal: np.ndarray,
             inner: np.ndarray) -> Union[np.ndarray, tuple[int, int]]:
    """The signed numbers of the characters ``groups`` (``terminal``: where numbers end, ``inner``:
    the positions of the others): 5-bit groups, least significant first, the last group's bit
    16 the sign (pycocotools: ``x |= -1 << 5 * k``); or ``(position, length)`` of the first
    number longer than :data:`MAX_NUMBER_CHARS`. Most numbers are one character, so all are read
    from their last group, and only the few others get their lower groups. int64, as the runs."""
    values = (groups[terminal] if len(inner) else groups).astype(np.int64)  # the last group (bit 32 clear)
    values ^= _SIGN                                    # sign-extended: (x ^ 16) - 16 maps 16..31 to -16..-1
    values -= _SIGN
    if not len(inner):
        return values
    number = inner - np.arange(len(inner))             # = the numbers ended before it
    # Inner characters of one number are consecutive: the first one of each starts its number.
    leads = np.flatnonzero(np.concatenate(([True], number[1:] != number[:-1])))
    sizes = np.concatenate((leads[1:], [len(inner)])) - leads  # inner characters per such number
    if sizes.max() >= MAX_NUMBER_CHARS:
        k = int(np.argmax(sizes >= MAX_NUMBER_CHARS))
        return int(inner[leads[k]]), int(sizes[k]) + 1
    group = np.arange(len(inner)) - np.repeat(leads, sizes)  # 0 = least significant
    lower = (groups[inner] & _BITS).astype(np.int64) << (5 * group)
    owners = number[leads]
    values[owners] <<= 5 * sizes
    values[owners] += np.add.reduceat(lower, leads)
    return values


def _undelta(values: np.ndarray, starts: np.ndarray) -> np.ndarray:
    """Runs from the stored numbers (int64, turned into the runs in place); ``starts``: the
    first number of each string that has one (the strings' numbers follow each other).

    From a string's fourth number on, each is a difference to the run two places before, so
    run j >= 1 of a string is the sum of its numbers 1..j (or 2..j) of j's parity. With
    ``total`` and ``alternating`` the running sums of the numbers and of the numbers signed by
    their index' parity, that sum is ``(total + (-1)**j * alternating) / 2``. Both sums restart
    at each string: its first number (not in a chain) is replaced by minus the string before.
    (Two contiguous running sums beat one per parity over strided halves.)
    """
    total = values
    if not len(total):
        return total
    heads = total[starts]                              # a string's first run is stored as it is
    total[starts] = 0
    alternating = total.copy()
    np.negative(alternating[1::2], out=alternating[1::2])
    for sums in (total, alternating):
        sums[starts[1:]] = -np.add.reduceat(sums, starts)[:-1]
        np.cumsum(sums, out=sums)
    total[0::2] += alternating[0::2]                   # one parity doubled, the other cancelled
    total[1::2] -= alternating[1::2]
    total >>= 1
    total[starts] = heads
    return total
