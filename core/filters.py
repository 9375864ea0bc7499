"""Exchange Management Shell filters for queues and messages.

``mailyard queue list --filter EXPR``, ``mailyard queue messages --filter EXPR`` and the bulk
actions take a filter written as in Exchange 2010's ``Get-Queue -Filter {...}`` and
``Get-Message -Filter {...}``::

    MessageCount -gt 100 -and Status -eq Retry
    {FromAddress -like "*@contoso.com"}
    -not (Status -eq Suspended) -and (Size -ge 2MB -or Age -gt 4h)

:func:`parse` turns the text into a :class:`Filter` (or raises :class:`FilterError`, which
points a caret at the bad part) and :meth:`Filter.matches` tests one record, a mapping keyed
by the canonical property names of the fields it was parsed against. The fields of Get-Queue
and Get-Message are mailyard.hub.queue_rows' ``QUEUE_FIELDS`` and ``MESSAGE_FIELDS``: their
enum values are the hub's own (``QueueStatus``, ``ItemStatus``, ``DeliveryType``), which
this shared module may not import.

Grammar
-------
::

    filter      = "{" expression "}" | expression
    expression  = and-chain { "-or" and-chain }
    and-chain   = unary { "-and" unary }
    unary       = "-not" unary | "(" expression ")" | comparison
    comparison  = property operator value
    operator    = "-eq" | "-ne" | "-gt" | "-ge" | "-lt" | "-le" | "-like" | "-notlike" | "-contains"
    value       = quoted-string | bare-word | "$true" | "$false" | "$null"

Property names, operators and ``$`` variables are case-insensitive. ``-and`` binds tighter
than ``-or``, as in most languages, so ``A -or B -and C`` means ``A -or (B -and C)``.
PowerShell itself gives the two the same precedence and reads left to right, which gives the
same result in the common cases (a chain of only ``-and`` or only ``-or``, or ``-or`` inside
parentheses); write the parentheses when mixing them. ``-not`` applies to the one comparison
or parenthesised group after it: ``-not Status -eq Retry -and Size -gt 0`` means
``(-not (Status -eq Retry)) -and Size -gt 0``.

Values
------
* ``'single'`` or ``"double"`` quoted strings; a doubled quote inside stands for one quote
  (``'O''Brien'``). Nothing else is an escape.
* Bare words: any run of characters other than white space, quotes, parentheses and braces
  (``Retry``, ``contoso.com``, ``*.example``, ``2026-11-26T10:00:00Z``). A word that starts
  with ``-`` and a letter is read as an operator; quote it to use it as a value.
* Numbers for int properties, with an optional size unit (``10KB``, ``2MB``: binary
  multiples, in bytes) or, for ``Age``, a duration unit (``30s``, ``5m``, ``4h``, ``2d``: in
  seconds). Anything else is rejected when the filter is parsed.
* Dates for datetime properties in ISO 8601 (``2026-11-26T10:00:00``, ``'2026-11-26 10:00'``,
  ``2026-11-26``), in UTC unless an offset is given. A date alone is its midnight.
* ``$null`` (with ``-eq`` and ``-ne`` only), and ``$true`` / ``$false`` for bool properties.
* Enum values are checked against the property's values when the filter is parsed; a pattern
  for ``-like``, ``-notlike`` or ``-contains`` must fit at least one of them.

Matching
--------
Text comparisons are case-insensitive (PowerShell's default), ordering ones included:
``-gt`` and friends compare strings and enum values as (case-folded) text. ``-like`` and
``-notlike`` match the whole value against a pattern in which ``*`` is any run of characters
and ``?`` is one character. ``-contains`` is a case-insensitive substring test (not
PowerShell's collection test); it applies to text, enum and list properties only, as do
``-like`` and ``-notlike``.

A record value of ``None`` (or a missing key) equals only ``$null``, and never satisfies
``-gt``, ``-ge``, ``-lt``, ``-le``, ``-like`` or ``-contains``. A list property satisfies a
comparison when any of its elements does; an empty list counts as ``$null``. ``-ne`` and
``-notlike`` are always the exact negation of ``-eq`` and ``-like``, as in Exchange's OPATH:
``RecipientDomains -ne fabrikam.example`` means *no* recipient domain is fabrikam.example, and
``LastError -ne 'x'`` is true when LastError is ``None``.
"""

from __future__ import annotations

import difflib
import enum
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from operator import ge, gt, le, lt
from typing import Any

from mailyard.errors import MailyardError

__all__ = [
    "And",
    "Comparison",
    "Field",
    "Filter",
    "FilterError",
    "Node",
    "Not",
    "Or",
    "Token",
    "TokenKind",
    "evaluate",
    "parse",
    "tokenize",
]


class FilterError(MailyardError):
    """A filter that cannot be parsed, with the offending span of the text.

    ``str()`` gives three lines: the reason, the filter text, and carets under the bad part.
    """

    def __init__(self, reason: str, text: str, position: int, length: int = 1) -> None:
        super().__init__(reason, text, position, length)
        self.reason = reason
        self.text = text
        self.position = position
        self.length = max(1, length)

    def __str__(self) -> str:
        shown = "".join(" " if char in "\r\n" else char for char in self.text)
        # Keep tabs in the padding so the carets line up under a tab-indented filter.
        padding = "".join("\t" if char == "\t" else " " for char in shown[: self.position])
        return f"{self.reason}\n  {shown}\n  {padding}{'^' * self.length}"


# --- Properties ------------------------------------------------------------------------------

KINDS = ("str", "int", "datetime", "enum", "list", "bool")


@dataclass(frozen=True)
class Field:
    """A property that filters can name.

    ``kind`` is ``"str"``, ``"int"``, ``"datetime"``, ``"enum"`` (one of ``values``; matched
    case-insensitively), ``"list"`` (a list of strings that matches when any element does)
    or ``"bool"``. An ``"int"`` field with ``duration=True`` holds seconds and takes values
    written as ``30s``, ``5m``, ``4h`` or ``2d``; other ``"int"`` fields take sizes (``10KB``).
    """

    name: str
    kind: str
    values: tuple[str, ...] = ()
    duration: bool = False

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"field {self.name}: kind must be one of {', '.join(KINDS)}")
        if (self.kind == "enum") != bool(self.values):
            raise ValueError(f"field {self.name}: values are for (and required by) enum fields")
        if self.duration and self.kind != "int":
            raise ValueError(f"field {self.name}: only an int field can be a duration")


# --- Operators -------------------------------------------------------------------------------

ORDERING = ("-gt", "-ge", "-lt", "-le")
TEXTUAL = ("-like", "-notlike", "-contains")
OPERATORS = ("-eq", "-ne", *ORDERING, *TEXTUAL)
LOGICAL = ("-and", "-or", "-not")

# The operators each kind of field accepts.
_KIND_OPERATORS: dict[str, tuple[str, ...]] = {
    "str": OPERATORS,
    "enum": OPERATORS,
    "list": OPERATORS,
    "int": ("-eq", "-ne", *ORDERING),
    "datetime": ("-eq", "-ne", *ORDERING),
    "bool": ("-eq", "-ne"),
}

# Negated operators, evaluated as the negation of their positive twin.
_NEGATED = {"-ne": "-eq", "-notlike": "-like"}

# What people type from other languages, and what to write instead.
_HINTS = {
    "=": "-eq",
    "==": "-eq",
    "!=": "-ne",
    "<>": "-ne",
    ">": "-gt",
    ">=": "-ge",
    "<": "-lt",
    "<=": "-le",
    "and": "-and",
    "&&": "-and",
    "or": "-or",
    "||": "-or",
    "not": "-not",
    "!": "-not",
}

_SIZE_UNITS = {"b": 1, "kb": 1024, "mb": 1024**2, "gb": 1024**3, "tb": 1024**4}
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _use(operators: Iterable[str]) -> str:
    return "use " + ", ".join(operators)


def _hint(word: str) -> str:
    replacement = _HINTS.get(word.lower())
    return f" (write {replacement})" if replacement else ""


# --- Tokens ----------------------------------------------------------------------------------


class TokenKind(enum.Enum):
    WORD = "word"
    STRING = "string"
    OPERATOR = "operator"  # -eq, -and, -gtx: a dash and a letter
    VARIABLE = "variable"  # $true, $false, $null
    LPAREN = "("
    RPAREN = ")"
    LBRACE = "{"
    RBRACE = "}"
    END = "end"


@dataclass(frozen=True)
class Token:
    """One token: its kind, its source text, its value (a string's content) and offset."""

    kind: TokenKind
    text: str
    value: str
    position: int

    @property
    def length(self) -> int:
        return max(1, len(self.text))

    def describe(self) -> str:
        if self.kind is TokenKind.END:
            return "the end of the filter"
        if self.kind is TokenKind.STRING:
            return f"the quoted string {self.text}"
        return f"'{self.text}'"


_PUNCTUATION = {
    "(": TokenKind.LPAREN,
    ")": TokenKind.RPAREN,
    "{": TokenKind.LBRACE,
    "}": TokenKind.RBRACE,
}
_QUOTES = "'\""


def _word_end(text: str, start: int) -> int:
    """The end of the bare word at ``start``: it runs to white space, a quote or punctuation."""
    index = start
    while index < len(text):
        char = text[index]
        if char.isspace() or char in _QUOTES or char in _PUNCTUATION:
            break
        index += 1
    return index


def _read_string(text: str, start: int) -> Token:
    """The quoted string at ``start``; a doubled quote inside stands for one."""
    quote = text[start]
    pieces: list[str] = []
    index = start + 1
    while True:
        close = text.find(quote, index)
        if close < 0:
            raise FilterError(f"unclosed quote: this {quote} has no closing {quote}", text, start)
        pieces.append(text[index:close])
        if text.startswith(quote, close + 1):
            pieces.append(quote)
            index = close + 2
            continue
        return Token(TokenKind.STRING, text[start : close + 1], "".join(pieces), start)


def tokenize(text: str) -> list[Token]:
    """The tokens of ``text``, ending with an END token at ``len(text)``."""
    tokens: list[Token] = []
    index = 0
    while index < len(text):
        char = text[index]
        if char.isspace():
            index += 1
            continue
        if char in _PUNCTUATION:
            token = Token(_PUNCTUATION[char], char, char, index)
        elif char in _QUOTES:
            token = _read_string(text, index)
        else:
            end = _word_end(text, index + 1)
            word = text[index:end]
            if char == "-" and word[1:2].isalpha():
                kind = TokenKind.OPERATOR
            elif char == "$":
                kind = TokenKind.VARIABLE
            else:
                kind = TokenKind.WORD
            token = Token(kind, word, word, index)
        tokens.append(token)
        index = token.position + len(token.text)
    tokens.append(Token(TokenKind.END, "", "", len(text)))
    return tokens


# --- Syntax tree -----------------------------------------------------------------------------

Operand = str | int | float | datetime | bool | None


@dataclass(frozen=True)
class Comparison:
    """``field operator operand``; the operand is already in the field's type, with text
    case-folded (a -like pattern keeps its ``*`` and ``?``)."""

    field: Field
    operator: str
    operand: Operand


@dataclass(frozen=True)
class Not:
    operand: Node


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]


Node = Comparison | Not | And | Or


# --- Values ----------------------------------------------------------------------------------


class _BadValue(Exception):
    """A value that does not fit its field; the parser adds the position."""


def _expected(field: Field) -> str:
    """What ``field`` takes, for error messages."""
    if field.kind == "int" and field.duration:
        return "a duration such as 30s, 5m, 4h or 2d"
    return {
        "str": "text",
        "list": "text",
        "int": "a number such as 100, or a size such as 10KB or 2MB",
        "datetime": "a date such as 2026-11-26, '2026-11-26 10:00' or 2026-11-26T10:00:00Z",
        "enum": "one of " + ", ".join(field.values),
        "bool": "$true or $false",
    }[field.kind]


def _quantity(text: str, units: Mapping[str, int]) -> int | float | None:
    """The number in ``"100"``, ``"-3"``, ``"1.5"``, ``"10KB"`` or ``"4h"`` times its unit."""
    text = text.strip()
    split = len(text)
    while split > 0 and text[split - 1].isalpha():
        split -= 1
    number, unit = text[:split].strip(), text[split:].lower()
    if unit and unit not in units:
        return None
    value: int | float
    try:
        value = int(number)
    except ValueError:
        try:
            value = float(number)
        except ValueError:
            return None
    if not math.isfinite(value):
        return None
    scaled = value * units.get(unit, 1)
    return int(scaled) if float(scaled).is_integer() else scaled


def _as_utc(moment: datetime) -> datetime:
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment


def _datetime(text: str) -> datetime | None:
    try:
        return _as_utc(datetime.fromisoformat(text.strip()))
    except ValueError:
        return None


def _suggestion(word: str, choices: Iterable[str]) -> str | None:
    """The choice closest to ``word``, compared case-insensitively, if any is close."""
    by_folded = {choice.casefold(): choice for choice in choices}
    close = difflib.get_close_matches(word.casefold(), list(by_folded), n=1)
    return by_folded[close[0]] if close else None


def _enum_value(field: Field, operator: str, text: str) -> str:
    folded = text.casefold()
    if operator in ORDERING:
        return folded  # compared as text: any bound is meaningful
    if operator in TEXTUAL:
        fits = _like if operator != "-contains" else _contains
        if not any(fits(folded, value.casefold()) for value in field.values):
            raise _BadValue(f"'{text}' fits no {field.name} value: {field.name} is {_expected(field)}")
        return folded
    if folded not in (value.casefold() for value in field.values):
        guess = _suggestion(text, field.values)
        if guess:
            raise _BadValue(f"unknown {field.name} value '{text}' (did you mean {guess}?)")
        raise _BadValue(f"unknown {field.name} value '{text}': use {', '.join(field.values)}")
    return folded


def _operand(field: Field, operator: str, token: Token) -> Operand:
    """The value of ``token`` converted for comparing ``field`` with ``operator``."""
    if token.kind is TokenKind.VARIABLE:
        return _variable(field, operator, token.text)
    text = token.value
    if field.kind in ("str", "list"):
        return text.casefold()
    if field.kind == "enum":
        return _enum_value(field, operator, text)
    if field.kind == "int":
        number = _quantity(text, _DURATION_UNITS if field.duration else _SIZE_UNITS)
        if number is None:
            what = "a duration" if field.duration else "a number"
            raise _BadValue(f"'{text}' is not {what}: {field.name} takes {_expected(field)}")
        return number
    if field.kind == "datetime":
        moment = _datetime(text)
        if moment is None:
            raise _BadValue(f"'{text}' is not a date: {field.name} takes {_expected(field)}")
        return moment
    if text.lower() in ("true", "false"):  # bool
        return text.lower() == "true"
    raise _BadValue(f"'{text}' is not $true or $false: {field.name} takes {_expected(field)}")


def _variable(field: Field, operator: str, name: str) -> Operand:
    lowered = name.lower()
    if lowered == "$null":
        if operator not in ("-eq", "-ne"):
            raise _BadValue(f"$null can only be compared with -eq or -ne, not {operator}")
        return None
    if lowered in ("$true", "$false"):
        if field.kind != "bool":
            raise _BadValue(f"{field.name} takes {_expected(field)}, not {name}")
        return lowered == "$true"
    raise _BadValue(f"unknown variable '{name}': use $true, $false or $null")


# --- Parser ----------------------------------------------------------------------------------


class _Parser:
    """A recursive-descent parser over the tokens of one filter: one method per rule."""

    def __init__(self, text: str, fields: Mapping[str, Field]) -> None:
        self.text = text
        self.tokens = tokenize(text)
        self.index = 0
        self.fields = {field.name.casefold(): field for field in fields.values()}

    # Token access.

    def peek(self) -> Token:
        return self.tokens[self.index]

    def previous(self) -> Token | None:
        return self.tokens[self.index - 1] if self.index else None

    def advance(self) -> Token:
        token = self.tokens[self.index]
        if token.kind is not TokenKind.END:
            self.index += 1
        return token

    def at_keyword(self, keyword: str) -> bool:
        token = self.peek()
        return token.kind is TokenKind.OPERATOR and token.text.lower() == keyword

    def fail(self, token: Token, reason: str, last: Token | None = None) -> FilterError:
        """An error under ``token`` (through ``last``, if given)."""
        last = last or token
        return FilterError(reason, self.text, token.position, last.position + last.length - token.position)

    def example(self) -> str:
        """A comparison on these fields, for messages that suggest one."""
        fields = list(self.fields.values())
        for field in fields:
            if field.kind == "int" and not field.duration:
                return f"{field.name} -gt 100"
        for field in fields:
            if field.kind == "enum":
                return f"{field.name} -eq {field.values[0]}"
        return f"{fields[0].name} -like 'a*'" if fields else "Property -eq Value"

    # Grammar rules.

    def filter(self) -> Node:
        """filter = "{" expression "}" | expression"""
        first = self.peek()
        if first.kind is TokenKind.END:
            raise FilterError(
                f"empty filter: write a comparison such as {self.example()}", self.text, 0, len(self.text)
            )
        if first.kind is not TokenKind.LBRACE:
            node = self.expression()
            if self.peek().kind is not TokenKind.END:
                raise self.unexpected(self.peek(), "-and or -or")
            return node
        self.advance()
        if self.peek().kind is TokenKind.RBRACE:
            raise self.fail(first, f"empty filter: write a comparison such as {self.example()}", self.peek())
        if self.peek().kind is TokenKind.END:
            raise self.fail(first, "unclosed brace: this { has no matching }")
        node = self.expression()
        closing = self.peek()
        if closing.kind is TokenKind.END:
            raise self.fail(first, "unclosed brace: this { has no matching }")
        if closing.kind is not TokenKind.RBRACE:
            raise self.unexpected(closing, "-and, -or or }")
        self.advance()
        trailing = self.peek()
        if trailing.kind is not TokenKind.END:
            raise self.fail(
                trailing,
                f"unexpected {trailing.describe()} after the closing }}: "
                "the braces must wrap the whole filter",
            )
        return node

    def expression(self) -> Node:
        """expression = and-chain { "-or" and-chain }"""
        operands = [self.and_chain()]
        while self.at_keyword("-or"):
            operands.append(self.operand_after(self.advance(), self.and_chain))
        return operands[0] if len(operands) == 1 else Or(tuple(operands))

    def and_chain(self) -> Node:
        """and-chain = unary { "-and" unary }"""
        operands = [self.unary()]
        while self.at_keyword("-and"):
            operands.append(self.operand_after(self.advance(), self.unary))
        return operands[0] if len(operands) == 1 else And(tuple(operands))

    def operand_after(self, keyword: Token, rule: Callable[[], Node]) -> Node:
        if self.peek().kind is TokenKind.END:
            raise self.fail(keyword, f"missing comparison after {keyword.text.lower()}")
        return rule()

    def unary(self) -> Node:
        """unary = "-not" unary | "(" expression ")" | comparison"""
        if self.at_keyword("-not"):
            return Not(self.operand_after(self.advance(), self.unary))
        token = self.peek()
        if token.kind is TokenKind.LPAREN:
            return self.group()
        if token.kind is TokenKind.WORD:
            return self.comparison()
        raise self.not_a_comparison(token)

    def group(self) -> Node:
        opening = self.advance()
        following = self.peek()
        if following.kind is TokenKind.RPAREN:
            raise self.fail(opening, "empty parentheses: write a comparison inside them", following)
        if following.kind is TokenKind.END:
            raise self.fail(opening, "unclosed parenthesis: this ( has no matching )")
        node = self.expression()
        closing = self.peek()
        if closing.kind is TokenKind.END:
            raise self.fail(opening, "unclosed parenthesis: this ( has no matching )")
        if closing.kind is not TokenKind.RPAREN:
            raise self.unexpected(closing, "-and, -or or )")
        self.advance()
        return node

    def comparison(self) -> Comparison:
        """comparison = property operator value"""
        name = self.advance()
        field = self.property(name)
        operator = self.operator(field, name)
        value = self.value(field, operator)
        try:
            return Comparison(field, operator, _operand(field, operator, value))
        except _BadValue as problem:
            raise self.fail(value, str(problem)) from None

    def property(self, name: Token) -> Field:
        field = self.fields.get(name.text.casefold())
        if field is not None:
            return field
        if _hint(name.text):
            raise self.fail(name, f"expected a property name, found '{name.text}'{_hint(name.text)}")
        canonical = [field.name for field in self.fields.values()]
        guess = _suggestion(name.text, canonical)
        if guess:
            raise self.fail(name, f"unknown property '{name.text}' (did you mean {guess}?)")
        raise self.fail(name, f"unknown property '{name.text}': the properties are {', '.join(canonical)}")

    def operator(self, field: Field, name: Token) -> str:
        token = self.peek()
        allowed = _KIND_OPERATORS[field.kind]
        if token.kind is TokenKind.END:
            raise self.fail(name, f"missing operator after {field.name}: {_use(allowed)}")
        operator = token.text.lower()
        if token.kind is not TokenKind.OPERATOR or operator in LOGICAL:
            hint = _hint(token.text) if token.kind is TokenKind.WORD else ""
            raise self.fail(
                token,
                f"expected an operator after {field.name}, found {token.describe()}{hint}: {_use(allowed)}",
            )
        if operator not in OPERATORS:
            raise self.fail(token, f"unknown operator '{token.text}': {_use(OPERATORS)}")
        if operator not in allowed:
            raise self.fail(
                token,
                f"{operator} does not apply to {field.name}, which takes {_expected(field)}: {_use(allowed)}",
            )
        self.advance()
        return operator

    def value(self, field: Field, operator: str) -> Token:
        token = self.peek()
        if token.kind in (TokenKind.END, TokenKind.RPAREN, TokenKind.RBRACE) or (
            token.kind is TokenKind.OPERATOR and token.text.lower() in LOGICAL + OPERATORS
        ):
            previous = self.previous()
            assert previous is not None  # the operator
            raise self.fail(
                previous, f"missing value after {operator}: {field.name} takes {_expected(field)}"
            )
        if token.kind is TokenKind.OPERATOR:
            raise self.fail(token, f"'{token.text}' reads as an operator: quote it to use it as a value")
        if token.kind in (TokenKind.LPAREN, TokenKind.LBRACE):
            raise self.fail(
                token,
                f"expected a value after {operator}, found {token.describe()}: "
                f"{field.name} takes {_expected(field)}",
            )
        return self.advance()

    # Errors.

    def not_a_comparison(self, token: Token) -> FilterError:
        if token.kind is TokenKind.LBRACE:
            return self.fail(token, "unexpected {: braces can only wrap the whole filter")
        if token.kind is TokenKind.STRING:
            return self.fail(token, f"expected a property name, found {token.describe()}: do not quote names")
        return self.fail(token, f"expected a comparison such as {self.example()}, found {token.describe()}")

    def unexpected(self, token: Token, expected: str) -> FilterError:
        """An error for ``token`` found after a complete condition, where ``expected`` fits."""
        if token.kind is TokenKind.RPAREN:
            return self.fail(token, "unmatched ): there is no ( before it")
        if token.kind is TokenKind.RBRACE:
            return self.fail(token, "unmatched }: there is no { before it")
        if token.kind is TokenKind.LBRACE:
            return self.fail(token, "unexpected {: braces can only wrap the whole filter")
        if token.kind is TokenKind.WORD and _hint(token.text):
            return self.fail(token, f"unexpected '{token.text}'{_hint(token.text)}")
        previous = self.previous()
        values = (TokenKind.WORD, TokenKind.STRING)
        if previous is not None and previous.kind in values and token.kind in values:
            return self.fail(
                token,
                f"unexpected {token.describe()} after the value {previous.text}: "
                f"quote a value that contains spaces, or join comparisons with -and or -or",
            )
        return self.fail(token, f"unexpected {token.describe()}: expected {expected}")


# --- Evaluation ------------------------------------------------------------------------------


def _like(pattern: str, text: str) -> bool:
    """Whether ``text`` matches ``pattern`` as a whole, ``*`` being any run and ``?`` one
    character. Greedy with backtracking to the last ``*``: linear in most cases."""
    p = t = 0
    star = -1  # index in pattern of the last * seen
    resume = 0  # where in text that * currently ends
    while t < len(text):
        if p < len(pattern) and pattern[p] == "*":
            star, resume = p, t
            p += 1
        elif p < len(pattern) and pattern[p] in ("?", text[t]):
            p += 1
            t += 1
        elif star >= 0:
            resume += 1
            p, t = star + 1, resume
        else:
            return False
    while p < len(pattern) and pattern[p] == "*":
        p += 1
    return p == len(pattern)


def _contains(needle: str, text: str) -> bool:
    return needle in text


def _record_datetime(field: Field, value: object) -> datetime:
    if isinstance(value, datetime):
        return _as_utc(value)
    if isinstance(value, str):
        moment = _datetime(value)
        if moment is not None:
            return moment
    raise ValueError(f"record field {field.name}: {value!r} is not an ISO 8601 date")


def _record_number(field: Field, value: object) -> int | float:
    if isinstance(value, int | float):
        return value
    if isinstance(value, str):
        number = _quantity(value, {})
        if number is not None:
            return number
    raise ValueError(f"record field {field.name}: {value!r} is not a number")


def _record_values(field: Field, value: object) -> tuple[Operand, ...]:
    """The record's value for ``field`` as comparable values: none for None or an empty
    list, one for a scalar, one per element for a list."""
    if value is None:
        return ()
    if field.kind == "list":
        if isinstance(value, str):
            value = (value,)
        if not isinstance(value, list | tuple | set | frozenset):
            raise ValueError(f"record field {field.name}: {value!r} is not a list of strings")
        return tuple(str(item).casefold() for item in value if item is not None)
    if field.kind in ("str", "enum"):
        return (str(value).casefold(),)
    if field.kind == "int":
        return (_record_number(field, value),)
    if field.kind == "datetime":
        return (_record_datetime(field, value),)
    if isinstance(value, str):  # bool
        return (value.strip().lower() == "true",)
    return (bool(value),)


_ORDERINGS: dict[str, Callable[[Any, Any], bool]] = {"-gt": gt, "-ge": ge, "-lt": lt, "-le": le}


def _holds(operator: str, value: Operand, operand: Operand) -> bool:
    """One positive comparison between two non-None values of the same type."""
    if operator == "-eq":
        return value == operand
    if operator == "-like":
        return _like(str(operand), str(value))
    if operator == "-contains":
        return _contains(str(operand), str(value))
    return _ORDERINGS[operator](value, operand)


def _compare(node: Comparison, value: object) -> bool:
    positive = _NEGATED.get(node.operator, node.operator)
    result = _passes(positive, _record_values(node.field, value), node.operand)
    return not result if node.operator in _NEGATED else result


def _passes(operator: str, values: tuple[Operand, ...], operand: Operand) -> bool:
    """A positive comparison against a record's values (none, one, or a list's elements)."""
    if operand is None:  # only -eq and -ne take $null: None and an empty list are $null
        return not values
    return any(_holds(operator, value, operand) for value in values)


def evaluate(node: Node, record: Mapping[str, object]) -> bool:
    """Whether ``record`` (keyed by canonical field name) satisfies ``node``."""
    match node:
        case Comparison():
            return _compare(node, record.get(node.field.name))
        case Not(operand=inner):
            return not evaluate(inner, record)
        case And(operands=operands):
            return all(evaluate(operand, record) for operand in operands)
        case Or(operands=operands):
            return any(evaluate(operand, record) for operand in operands)
    raise TypeError(f"not a filter node: {node!r}")


# --- Public entry points ---------------------------------------------------------------------


@dataclass(frozen=True)
class Filter:
    """A parsed filter: its text and its syntax tree."""

    text: str
    expression: Node

    def matches(self, record: Mapping[str, object]) -> bool:
        """Whether ``record``, keyed by canonical field name, passes the filter.

        A missing key counts as None. Datetimes may be ISO 8601 strings or ``datetime``
        objects (naive ones are UTC); a value of the wrong type raises ``ValueError``.
        """
        return evaluate(self.expression, record)

    def __str__(self) -> str:
        return self.text


def parse(text: str, fields: Mapping[str, Field]) -> Filter:
    """Parse ``text`` against ``fields`` (by name; e.g. mailyard.hub.queue_rows.QUEUE_FIELDS).

    Raises :class:`FilterError` pointing at the first problem found.
    """
    try:
        return Filter(text, _Parser(text, fields).filter())
    except RecursionError:
        raise FilterError("the filter nests too deeply", text, 0, len(text)) from None
