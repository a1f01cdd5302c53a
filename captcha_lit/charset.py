"""The charset: text <-> class indices, in one place.

A charset is an ordered string of distinct characters. Index ``i`` is the class of
``charset[i]``. CTC models add one blank class after the last character.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

PRESETS = {
    "0-9A-Z": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "0-9a-z": "0123456789abcdefghijklmnopqrstuvwxyz",
    "0-9": "0123456789",
    "A-Z": "ABCDEFGHIJKLMNOPQRSTUVWXYZ",
    "a-z": "abcdefghijklmnopqrstuvwxyz",
    "0-9A-Za-z": "0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz",
}


def describe(chars: str) -> str:
    """The preset name of ``chars`` where it has one, for short error messages."""
    for name, preset in PRESETS.items():
        if preset == chars:
            return name
    return chars


class Charset:
    """Maps text to class indices and back.

    ``Charset("0-9A-Z")`` expands a preset name; any other string is taken as the
    literal list of characters, in order.
    """

    def __init__(self, chars: str):
        if not isinstance(chars, str):
            raise TypeError(f"charset must be a string, got {type(chars).__name__}: {chars!r}")
        expanded = PRESETS.get(chars, chars)
        if not expanded:
            raise ValueError("charset is empty: give a preset such as '0-9A-Z' or a string of characters")
        seen: set[str] = set()
        duplicates = [c for c in expanded if c in seen or seen.add(c)]
        if duplicates:
            raise ValueError(
                f"charset {expanded!r} has duplicate characters {''.join(sorted(set(duplicates)))!r}: "
                "each character must appear once"
            )
        if any(c.isspace() for c in expanded):
            raise ValueError(f"charset {expanded!r} contains whitespace, which cannot be a CAPTCHA character")
        self.chars = expanded
        self._index = {c: i for i, c in enumerate(expanded)}

    def __len__(self) -> int:
        return len(self.chars)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Charset) and other.chars == self.chars

    def __hash__(self) -> int:
        return hash(self.chars)

    def __repr__(self) -> str:
        return f"Charset({describe(self.chars)!r})"

    @property
    def blank(self) -> int:
        """The CTC blank class: one past the last character."""
        return len(self.chars)

    def validate(self, text: str) -> None:
        unknown = sorted({c for c in text if c not in self._index})
        if unknown:
            raise ValueError(
                f"label {text!r} has character(s) {''.join(unknown)!r} not in charset "
                f"{describe(self.chars)!r}; add them to data.charset or fix the label"
            )

    def encode(self, text: str) -> list[int]:
        self.validate(text)
        return [self._index[c] for c in text]

    def decode(self, indices: Iterable[int]) -> str:
        out = []
        for i in indices:
            i = int(i)
            if i < 0:  # padding
                continue
            if i >= len(self.chars):
                raise ValueError(f"class index {i} is outside charset of size {len(self.chars)}")
            out.append(self.chars[i])
        return "".join(out)

    def encode_batch(self, texts: Sequence[str], max_length: int, pad: int = -1) -> list[list[int]]:
        """Encode texts to rows of ``max_length`` indices, padded with ``pad``."""
        rows = []
        for text in texts:
            if len(text) > max_length:
                raise ValueError(f"label {text!r} is longer than the maximum length {max_length}")
            row = self.encode(text)
            rows.append(row + [pad] * (max_length - len(row)))
        return rows
