"""containerd's filter syntax (pkg/filters), parsed once into a predicate over snapshot fields.

A filter is ``selector ("," selector)*`` where a selector is ``fieldpath [operator value]``:
``name==base``, ``labels."containerd.io/gc.root"``, ``kind!=view,parent~=^sha256:``. Selectors
in one filter must all match; a list of filters matches when any one does, and an empty list
(or an empty filter string) matches everything.

The grammar follows containerd's scanner and parser, quirks included, so a filter means the
same here as under ``ctr snapshots ls``:

* a field is a run of ``[A-Za-z0-9_-]`` or a double-quoted Go string;
* a value is a double-quoted Go string, or a bare run of printable characters up to a comma or
  whitespace; ``~=`` also takes ``/regexp/`` and ``|regexp|``, in which ``\\/`` and ``\\|``
  escape the delimiter;
* whitespace may precede any field, operator or value, but not follow a value or a bare field
  path (containerd's lookahead there is a single character);
* ``!=`` and ``~=`` compare an absent field as ``""``, so ``labels.x!=y`` selects snapshots
  without label ``x``, while ``==`` never matches an absent field.

Regular expressions use Python's :mod:`re` dialect and must compile when the filter does.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from .errors import InvalidArgument

__all__ = ["compile_filters"]

Fields = Mapping[str, object]

# Go's unicode.IsSpace: the Unicode White_Space property.
_SPACE = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    map(chr, range(0x2000, 0x200B))
)
_FIELD = re.compile(r"[A-Za-z0-9_-]+")
_OPERATOR = re.compile(r"[=!~]+")
_OPERATORS = frozenset({"==", "!=", "~="})
_SIMPLE_ESCAPES = {"a": "\a", "b": "\b", "f": "\f", "n": "\n", "r": "\r", "t": "\t", "v": "\v", "\\": "\\"}
_DIGITS = {8: frozenset("01234567"), 16: frozenset("0123456789abcdefABCDEF")}
_NUMERIC_ESCAPES = {"x": (2, 16), "u": (4, 16), "U": (8, 16), **dict.fromkeys("01234567", (3, 8))}


@dataclass(frozen=True)
class _Selector:
    """One ``fieldpath [operator value]`` term, with its regular expression compiled."""

    path: tuple[str, ...]
    operator: str = ""
    value: str = ""
    regex: re.Pattern[str] | None = None

    def matches(self, fields: Fields) -> bool:
        value, present = _lookup(fields, self.path)
        if self.operator == "==":
            return present and value == self.value
        if self.operator == "!=":
            return value != self.value
        if self.regex is not None:
            return self.regex.search(value) is not None
        return present


def _lookup(fields: Fields, path: tuple[str, ...]) -> tuple[str, bool]:
    """The value at ``path`` and whether it is present, as containerd's snapshot adaptor sees it.

    A mapping field (labels) is keyed by the rest of the path joined with dots, so ``labels.a.b``
    and ``labels."a.b"`` name the same label; a scalar field ignores any further components.
    """
    head = fields.get(path[0])
    if isinstance(head, Mapping):
        head = head.get(".".join(path[1:]))
    if head is None:
        return "", False
    return (head if isinstance(head, str) else str(head)), True


def _is_value_char(ch: str) -> bool:
    """Go's graphic characters other than spaces and the comma: what a bare value is made of."""
    return ch != "," and ch not in _SPACE and unicodedata.category(ch)[0] in "LMNPS"


class _Parser:
    """A recursive-descent parser over one filter string, mirroring containerd's grammar."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def error(self, message: str, pos: int | None = None) -> InvalidArgument:
        at = self.pos if pos is None else pos
        return InvalidArgument(f"invalid filter {self.text!r} at position {at}: {message}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_space(self) -> None:
        while self.peek() in _SPACE:
            self.pos += 1

    def parse(self) -> list[_Selector]:
        selectors = [self.selector()]
        while self.pos < len(self.text):
            if self.peek() != ",":
                raise self.error(f"unexpected input {self.peek()!r}")
            self.pos += 1
            selectors.append(self.selector())
        return selectors

    def selector(self) -> _Selector:
        path = [self.field()]
        while self.peek() == ".":
            self.pos += 1
            path.append(self.field())
        if self.peek() in ("", ","):
            return _Selector(tuple(path))
        operator = self.operator()
        self.skip_space()
        at = self.pos
        value = self.value(allow_regex_quotes=operator == "~=")
        if operator != "~=":
            return _Selector(tuple(path), operator, value)
        try:
            regex = re.compile(value)
        except (re.error, OverflowError, RecursionError) as e:
            raise self.error(f"invalid regular expression {value!r}: {e}", at) from None
        return _Selector(tuple(path), operator, value, regex)

    def field(self) -> str:
        self.skip_space()
        start = self.pos
        if self.peek() in ('"', "/", "|"):
            quote, text = self.peek(), self.quoted()
            if quote != '"':
                raise self.error("invalid quote encountered", start)
            return text
        m = _FIELD.match(self.text, self.pos)
        if m is None:
            raise self.error("expected field or quoted")
        self.pos = m.end()
        return m.group()

    def operator(self) -> str:
        self.skip_space()
        m = _OPERATOR.match(self.text, self.pos)
        if m is None:
            raise self.error('expected an operator ("==", "!=" or "~=")')
        if m.group() not in _OPERATORS:
            raise self.error(f"unsupported operator {m.group()!r}")
        self.pos = m.end()
        return m.group()

    def value(self, *, allow_regex_quotes: bool) -> str:
        self.skip_space()
        start, ch = self.pos, self.peek()
        if ch in ('"', "/", "|"):
            text = self.quoted()
            if ch != '"' and not allow_regex_quotes:
                raise self.error("invalid quote encountered", start)
            return text
        if not ch or ch in ",.=!~\0":
            raise self.error("expected value or quoted")
        self.pos += 1
        while self.pos < len(self.text) and _is_value_char(self.text[self.pos]):
            self.pos += 1
        return self.text[start : self.pos]

    def quoted(self) -> str:
        """A string between ``"``, ``/`` or ``|`` delimiters with Go escapes, ending at ``self.pos``.

        ``\\x`` and octal escapes are bytes, decoded as UTF-8 run by run; bytes that are not
        UTF-8 become lone surrogates, which (like Go's raw bytes) equal no real label.
        """
        start, quote = self.pos, self.text[self.pos]
        pieces: list[str] = []
        raw = bytearray()
        i = start + 1
        while (ch := self.text[i : i + 1]) != quote:
            if ch in ("", "\n", "\0"):
                raise self.error("quoted literal not terminated", start)
            piece, i = self.escape(i, quote) if ch == "\\" else (ch, i + 1)
            if isinstance(piece, int):
                raw.append(piece)
            else:
                pieces.append(raw.decode("utf-8", "surrogateescape") + piece)
                raw.clear()
        pieces.append(raw.decode("utf-8", "surrogateescape"))
        self.pos = i + 1
        return "".join(pieces)

    def escape(self, i: int, quote: str) -> tuple[str | int, int]:
        """The escape at ``i`` (a character, or a byte for ``\\x`` and octal) and where it ends."""
        kind = self.text[i + 1 : i + 2]
        if kind == quote or kind in _SIMPLE_ESCAPES:
            return _SIMPLE_ESCAPES.get(kind, quote), i + 2
        if kind not in _NUMERIC_ESCAPES:
            raise self.error("illegal escape sequence", i)
        width, base = _NUMERIC_ESCAPES[kind]
        first = i + 1 if base == 8 else i + 2
        digits = self.text[first : first + width]
        if len(digits) < width or not set(digits) <= _DIGITS[base]:
            raise self.error("illegal numeric escape sequence", i)
        code = int(digits, base)
        if kind in "uU":
            if code > 0x10FFFF:
                raise self.error("escaped code point beyond U+10FFFF", i)
            return ("\ufffd" if 0xD800 <= code <= 0xDFFF else chr(code)), first + width
        if code > 0xFF:
            raise self.error("octal escape beyond \\377", i)
        return code, first + width


def _parse(text: str) -> list[_Selector]:
    if not isinstance(text, str):
        raise InvalidArgument(f"a filter must be a string, not {type(text).__name__}")
    return _Parser(text).parse() if text else []


def compile_filters(filters: Sequence[str]) -> Callable[[Fields], bool]:
    """A predicate over a snapshot's fields that is true when any of ``filters`` matches.

    Everything is parsed, and every regular expression compiled, here rather than per match;
    a malformed filter raises :class:`~cowstore.errors.InvalidArgument` naming it and the
    position of the fault.
    """
    if isinstance(filters, str):
        raise InvalidArgument(f"filters must be a sequence of strings, not the string {filters!r}")
    alternatives = [_parse(f) for f in filters]

    def match(fields: Fields) -> bool:
        if not alternatives:
            return True
        return any(all(s.matches(fields) for s in selectors) for selectors in alternatives)

    return match
