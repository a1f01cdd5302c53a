"""What a label may be: characters of the scheme's charset, a length in its range.

The page checks the same rules as the label is typed (static/label.js mirrors ``fit_case`` and
``problem``); the server checks them again before anything is written.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from captcha_lit.charset import Charset, describe


@dataclass(frozen=True)
class LabelRules:
    charset: str | None = None  # the allowed characters; None: any character but whitespace
    min_length: int | None = None
    max_length: int | None = None
    source: str = ""  # where the rules come from, for the messages: "the model", "charset=..."

    def __post_init__(self) -> None:
        if self.charset is not None:
            object.__setattr__(self, "charset", Charset(self.charset).chars)  # a preset name expands here
        for name in ("min_length", "max_length"):
            value = getattr(self, name)
            if value is not None and int(value) < 1:
                raise ValueError(f"{name}={value}: a label has at least 1 character")
        if self.min_length is not None and self.max_length is not None and self.max_length < self.min_length:
            raise ValueError(f"max_length={self.max_length} is less than min_length={self.min_length}")

    def fit_case(self, text: str) -> str:
        """Each character the charset has only in the other case becomes that one: with a
        charset of capitals, typing ``k`` gives ``K``."""
        if self.charset is None:
            return text
        return "".join(c.swapcase() if c not in self.charset and len(c.swapcase()) == 1 and c.swapcase() in self.charset
                       else c for c in text)

    def problem(self, text: str) -> str | None:
        """Why ``text`` (already case-fitted) is not a label of this scheme, naming the bad character; None if it is."""
        if not text:
            return "the label is empty: type what the image says, or skip it (Tab)"
        for char in text:
            if char.isspace():
                return "a label has no spaces"
            if self.charset is not None and char not in self.charset:
                return f"'{char}' is not in the charset '{describe(self.charset)}' ({self.source})"
        if self.min_length is not None and len(text) < self.min_length:
            return f"{len(text)} characters: a label here has at least {self.min_length} ({self.source})"
        if self.max_length is not None and len(text) > self.max_length:
            return f"{len(text)} characters: a label here has at most {self.max_length} ({self.source})"
        return None

    def to_dict(self) -> dict:
        """What the page's own check needs (static/label.js)."""
        return {**asdict(self), "charset_name": describe(self.charset) if self.charset is not None else None}
