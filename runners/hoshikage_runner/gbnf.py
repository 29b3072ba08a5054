"""Check a GBNF grammar the way llama.cpp will, before llama.cpp ever sees it.

A client's ``grammar`` goes straight to ``llama_sampler_init_grammar``.
When llama.cpp cannot use a grammar it logs an error and returns NULL, and
llama-cpp-python adds that NULL to its sampler chain anyway: the runner
dies with SIGSEGV, taking every other request on that model with it.  So
the supervisor checks each grammar first and answers a bad one with a
400 that says what is wrong and where.

`check_grammar` is a line-by-line mirror of llama.cpp's
``llama_grammar_parser::parse`` (``parse_rule``, ``parse_alternates``,
``parse_sequence``, ``parse_space``, ``parse_name``, ``parse_char``,
``parse_token``, the repetition rewrite and its 2000-rule threshold, the
undefined-rule validation) and of ``llama_grammar_init_impl`` (empty
grammar, missing root, left recursion), as vendored in llama-cpp-python
0.3.36.  It builds the same rules with the same symbol ids, because several
outcomes depend on them: a group's size is counted in symbols, a redefined
rule keeps the helpers of its first definition, and llama.cpp's left
recursion check only treats a rule as possibly empty when one of its
alternatives is literally empty.  Terminals are the one simplification: a
string literal or a character class is one item here and one element per
character there, which changes nothing that can be observed.

On top of that it refuses what llama.cpp accepts but then handles badly
(the limits below, each named in its error message):

* ``x{5,2}``: llama.cpp computes the optional count as ``2 - 5`` in
  unsigned arithmetic and loops about 2**64 times, allocating a rule each
  time.
* a root rule that is referenced but never defined, which survives
  validation when the only reference sits in a definition that a later
  one replaced; llama.cpp then indexes past the end of its rule table
  (SIGSEGV).
* left recursion that llama.cpp's check misses because the rule that can
  match nothing does so only through other rules (``e ::= f``,
  ``f ::= | "z"``): its parse stacks then grow until memory runs out.
* deep nesting and long chains of leading references (llama.cpp recurses
  over both, so a hostile grammar overflows the thread's stack), and
  ambiguous grammars whose ways to begin multiply (llama.cpp's left
  recursion check walks every path without memoisation, and its parser
  keeps a stack per path, deduplicated by linear search).
* ``<name>`` token references without a vocabulary to check them against.
* text with NUL characters (C reads only up to the first one, so the rest
  would be ignored silently) or lone surrogates (not encodable as UTF-8),
  and the empty string, which llama.cpp takes as "no grammar".

A grammar llama.cpp accepts can still lead, while sampling, to a point
that no token satisfies; llama.cpp then throws from its sampler and the
runner aborts.  The ways to get there that the text itself shows are
refused too: an empty range (``[z-a]``), an escaped NUL in a string
(``"\\x00"``, which no token can produce) and, given ``vocab_size``, a token id the vocabulary
does not have.  Whether some other point without a token is reached depends
on the vocabulary and on what the model writes, so it is not a property of
the text alone.

Stdlib only: the supervisor imports this and must not load llama_cpp.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

# --- llama.cpp's own limit (MAX_REPETITION_THRESHOLD in llama-grammar.cpp) -------------
# A repetition may not multiply the rules of what it repeats beyond this.  x{m,n} with
# n above it is treated as x{m,} by llama.cpp, with m above it is an error.
LLAMA_REPETITION_THRESHOLD = 2000

# --- our limits: what llama.cpp accepts but should not be asked to do -----------------
# Grammar text, in UTF-8 bytes.  JSON-schema grammars are a few KiB.
MAX_GRAMMAR_BYTES = 256 * 1024
# Rules, counting the helper rules that groups and repetitions become
# (x{0,2000} alone makes 2000 of them).
MAX_RULES = 50_000
# llama.cpp grammar elements (8 bytes each, one per character of a literal or
# class); repetitions copy their operand, so this is what bounds memory.
MAX_ELEMENTS = 1_000_000
# Nested parentheses.  llama.cpp parses groups recursively; JSON-schema grammars
# for maxLength/maxItems nest one group per optional item, and llama.cpp's own
# repetition threshold stops those at about 1000.
MAX_NESTING_DEPTH = 2048
# Longest chain of rules that can each start with the next: llama.cpp's left
# recursion check recurses once per link, and its parser copies a stack as long
# as the chain for each link (a chain of 10000 costs it 2.6 s).
MAX_LEFT_CHAIN = 1000
# Calls llama.cpp's left recursion check makes.  It revisits a rule once per path
# that leads to it, so grammars where every rule starts with one of several
# alternatives of the next grow exponentially.
MAX_LEFT_RECURSION_STEPS = 1_000_000
# Ways one rule can begin (chains of leading references, through rules that can
# match nothing).  llama.cpp keeps a parse stack for each and deduplicates them by
# linear search: 4096 ways cost it about 0.1 s to set up, 16384 about 1.4 s, and
# it does that work again as it samples.  Real grammars need a few dozen (JSON
# with 30 optional properties: 87).
MAX_LEFT_PATHS = 2048

_UINT32_MAX = 0xFFFF_FFFF
_UINT64_MAX = 0xFFFF_FFFF_FFFF_FFFF
_NUL = "\0"
_WORD_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-")
_DIGITS = frozenset("0123456789")
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")
_SIMPLE_ESCAPES = frozenset('trn\\"[]-')
_HEX_ESCAPES = {"x": 2, "u": 4, "U": 8}
_ESCAPED = {"t": "\t", "r": "\r", "n": "\n"}
# Characters a literal may contain without a closer look (see parse_string).
_PLAIN_RUN = re.compile(r'[^"\\\x00]+')

# Rule items.  A non-negative item is a reference to that rule id; llama.cpp's
# END and ALT markers are negative; a terminal (literal, class, ".", token) is
# -2 - (number of llama.cpp elements it stands for), so always below -2.
_ALT = -1
_END = -2
_INFINITE = None


def _terminal(elements: int) -> int:
    return -2 - elements


def _weight(item: int) -> int:
    """llama.cpp elements one item stands for."""
    return -2 - item if item < _END else 1


class GrammarError(ValueError):
    """A grammar llama.cpp would reject (or mishandle), with what is wrong and where.

    `line` and `column` (1-based) point into the grammar text when the problem
    has a place; problems with the whole grammar (a missing root, a limit)
    leave them None and name the rule instead.
    """

    def __init__(self, reason: str, line: int | None = None, column: int | None = None):
        self.reason = reason
        self.line = line
        self.column = column
        where = f" at line {line}, column {column}" if line is not None else ""
        super().__init__(f"invalid grammar{where}: {reason}")


@dataclass
class _Frame:
    """One ``parse_alternates`` call in progress: the rule being built and its sequence state."""

    rule_id: int
    nested: bool
    items: list[int] = field(default_factory=list)
    last_sym_start: int = 0  # where the item a repetition would apply to begins
    n_prev_rules: int = 1  # llama.cpp's count of rules in that item, for the threshold
    symbols_before: int = 0  # symbols that existed before this group opened
    opened_at: int = 0  # position of the "(" (groups only)


@dataclass
class _Symbol:
    name: str
    position: int  # first mention, or where the group/repetition was written
    parent: str = ""  # for helper rules: the rule they were written in
    kind: str = ""  # for helper rules: "group" or "repetition"


def check_grammar(text: str, root: str = "root", *,
                  is_single_token: Callable[[str], bool] | None = None,
                  vocab_size: int | None = None) -> None:
    """Raise GrammarError unless llama.cpp would accept `text` with start rule `root`.

    `is_single_token` answers for ``<name>`` token references, which llama.cpp
    resolves by tokenising ``"<name>"`` with the model's vocabulary (exactly one
    token, special tokens allowed).  Without it, such references are refused
    because a wrong one would crash the runner.  `vocab_size`, when known,
    bounds ``<[id]>`` token ids (an id past the vocabulary aborts the runner).
    """
    if not isinstance(text, str):
        raise GrammarError(f"grammar must be a string, not {type(text).__name__}")
    if len(text) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"grammar is longer than MAX_GRAMMAR_BYTES ({MAX_GRAMMAR_BYTES} bytes)")
    try:
        size = len(text.encode("utf-8"))
    except UnicodeEncodeError as e:
        raise GrammarError("grammar is not valid Unicode (it contains a lone surrogate)",
                           *_line_column(text, e.start)) from None
    if size > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"grammar is longer than MAX_GRAMMAR_BYTES ({MAX_GRAMMAR_BYTES} bytes)")
    nul = text.find(_NUL)
    if nul >= 0:
        raise GrammarError("grammar contains a NUL character; llama.cpp would ignore everything after it",
                           *_line_column(text, nul))
    if not text:
        raise GrammarError("grammar is empty")
    _Checker(text, is_single_token, vocab_size).check(root)


def _line_column(text: str, pos: int) -> tuple[int, int]:
    """1-based line and column of `pos`; CR, LF and CRLF all end a line, as for llama.cpp."""
    head = text[:pos]
    line = head.count("\n") + head.count("\r") - head.count("\r\n") + 1
    start = max(head.rfind("\n"), head.rfind("\r")) + 1
    return line, pos - start + 1


class _Checker:
    """The parser and init checks; `s` is the text with a NUL sentinel, as C sees it."""

    def __init__(self, text: str, is_single_token: Callable[[str], bool] | None, vocab_size: int | None = None):
        self.text = text
        self.s = text + _NUL
        self.is_single_token = is_single_token
        self.vocab_size = vocab_size
        self.last_char = 0  # the code point parse_char read last
        self.symbol_ids: dict[str, int] = {}
        self.symbols: list[_Symbol] = []
        self.rules: list[list[int] | None] = []
        self.elements = 0

    # ------------------------------------------------------------------ errors and limits

    def error(self, reason: str, pos: int) -> GrammarError:
        if pos >= len(self.text):
            found = "end of input"
        else:
            snippet = self.text[pos:pos + 20].split("\n")[0].split("\r")[0]
            found = repr(snippet) if snippet else "end of line"
        return GrammarError(f"{reason}, found {found}", *_line_column(self.text, pos))

    def grow(self, elements: int) -> None:
        self.elements += elements
        if self.elements > MAX_ELEMENTS:
            raise GrammarError(
                f"grammar expands to more than MAX_ELEMENTS ({MAX_ELEMENTS}) elements; "
                "reduce repetition counts or the size of what they repeat")

    def describe(self, rule_id: int) -> str:
        """A rule as a person wrote it: helper rules are named by the group or repetition they stand for."""
        symbol = self.symbols[rule_id]
        if not symbol.kind:
            return f"rule '{symbol.name}'"
        line, column = _line_column(self.text, symbol.position)
        return f"the {symbol.kind} in rule '{symbol.parent}' at line {line}, column {column}"

    def short(self, rule_id: int) -> str:
        symbol = self.symbols[rule_id]
        if not symbol.kind:
            return symbol.name
        line, column = _line_column(self.text, symbol.position)
        return f"({symbol.kind} at {line}:{column})"

    # ------------------------------------------------------------------ symbols and rules

    def get_symbol_id(self, name: str, pos: int) -> int:
        rule_id = self.symbol_ids.get(name)
        if rule_id is None:
            rule_id = self.new_symbol(_Symbol(name, pos))
        return rule_id

    def generate_symbol_id(self, base_name: str, kind: str, pos: int) -> int:
        # Helper names contain "_", which rule names cannot, so they never clash.
        return self.new_symbol(_Symbol(f"{base_name}_{len(self.symbols)}", pos, base_name, kind))

    def new_symbol(self, symbol: _Symbol) -> int:
        rule_id = len(self.symbols)
        if rule_id >= MAX_RULES:
            raise GrammarError(f"grammar has more than MAX_RULES ({MAX_RULES}) rules, counting the "
                               "helper rules that groups and repetitions become")
        self.symbol_ids[symbol.name] = rule_id
        self.symbols.append(symbol)
        return rule_id

    def add_rule(self, rule_id: int, items: list[int]) -> None:
        if len(self.rules) <= rule_id:
            self.rules.extend([None] * (rule_id + 1 - len(self.rules)))
        self.rules[rule_id] = items

    # ------------------------------------------------------------------ lexical helpers

    def parse_space(self, pos: int, newline_ok: bool) -> int:
        s = self.s
        while True:
            c = s[pos]
            if c == " " or c == "\t" or (newline_ok and (c == "\r" or c == "\n")):
                pos += 1
            elif c == "#":
                while s[pos] != _NUL and s[pos] != "\r" and s[pos] != "\n":
                    pos += 1
            else:
                return pos

    def parse_name(self, pos: int) -> int:
        end = pos
        while self.s[end] in _WORD_CHARS:
            end += 1
        if end == pos:
            raise self.error("expecting a rule name (letters, digits, '-')", pos)
        return end

    def parse_int(self, pos: int) -> tuple[int, int]:
        end = pos
        while self.s[end] in _DIGITS:
            end += 1
        if end == pos:
            raise self.error("expecting an integer", pos)
        return int(self.s[pos:end]), end

    def parse_char(self, pos: int) -> int:
        """Position after one character or escape; llama.cpp's `parse_char` (the value is unused)."""
        s = self.s
        if s[pos] == "\\":
            kind = s[pos + 1]
            if kind in _HEX_ESCAPES:
                size = _HEX_ESCAPES[kind]
                start = pos + 2
                end = start
                while end < start + size and s[end] in _HEX_DIGITS:
                    end += 1
                if end != start + size:
                    raise self.error(f"expecting {size} hex digits after '\\{kind}'", start)
                self.last_char = int(s[start:end], 16)
                return end
            if kind in _SIMPLE_ESCAPES:
                self.last_char = ord(_ESCAPED.get(kind, kind))
                return pos + 2
            raise self.error("unknown escape (known: \\x.. \\u.... \\U........ \\t \\r \\n "
                             "\\\\ \\\" \\[ \\] \\-)", pos)
        if s[pos] != _NUL:
            self.last_char = ord(s[pos])
            return pos + 1  # one code point: llama.cpp decodes one UTF-8 sequence
        raise self.error("unexpected end of input", pos)

    # ------------------------------------------------------------------ parser

    def parse(self) -> None:
        s = self.s
        pos = self.parse_space(0, True)
        while s[pos] != _NUL:
            pos = self.parse_rule(pos)

    def parse_rule(self, pos: int) -> int:
        s = self.s
        name_end = self.parse_name(pos)
        name = s[pos:name_end]
        rule_id = self.get_symbol_id(name, pos)
        pos = self.parse_space(name_end, False)
        if not (s[pos] == ":" and s[pos + 1] == ":" and s[pos + 2] == "="):
            raise self.error(f"expecting '::=' after rule name '{name}'", pos)
        pos = self.parse_space(pos + 3, True)
        pos = self.parse_alternates(pos, name, rule_id)
        if s[pos] == "\r":
            pos += 2 if s[pos + 1] == "\n" else 1
        elif s[pos] == "\n":
            pos += 1
        elif s[pos] != _NUL:
            raise self.error(f"expecting a newline or end of input after rule '{name}'", pos)
        return self.parse_space(pos, True)

    def parse_alternates(self, pos: int, rule_name: str, rule_id: int) -> int:
        """``parse_alternates``/``parse_sequence`` with an explicit stack of open groups."""
        s = self.s
        frames = [_Frame(rule_id, nested=False)]
        frame = frames[0]
        while True:
            c = s[pos]
            items = frame.items
            if c == '"':
                pos = self.parse_string(pos, frame)
            elif c == "[":
                pos = self.parse_class(pos, frame)
            elif c == "<" or c == "!":
                end = self.parse_token(pos)
                frame.last_sym_start = len(items)
                frame.n_prev_rules = 1
                items.append(_terminal(1))
                self.grow(1)
                pos = self.parse_space(end, frame.nested)
            elif c in _WORD_CHARS:
                name_end = self.parse_name(pos)
                ref = self.get_symbol_id(s[pos:name_end], pos)
                pos = self.parse_space(name_end, frame.nested)
                frame.last_sym_start = len(items)
                frame.n_prev_rules = 1
                items.append(ref)
                self.grow(1)
            elif c == "(":
                if len(frames) > MAX_NESTING_DEPTH:
                    raise self.error(f"groups nested deeper than MAX_NESTING_DEPTH ({MAX_NESTING_DEPTH})", pos)
                opened_at = pos
                pos = self.parse_space(pos + 1, True)
                before = len(self.symbols)
                sub_id = self.generate_symbol_id(rule_name, "group", opened_at)
                frame = _Frame(sub_id, nested=True, symbols_before=before, opened_at=opened_at)
                frames.append(frame)
            elif c == ".":
                frame.last_sym_start = len(items)
                frame.n_prev_rules = 1
                items.append(_terminal(1))
                self.grow(1)
                pos = self.parse_space(pos + 1, frame.nested)
            elif c == "*" or c == "+" or c == "?":
                op_pos = pos
                pos = self.parse_space(pos + 1, frame.nested)
                low, high = {"*": (0, _INFINITE), "+": (1, _INFINITE), "?": (0, 1)}[c]
                self.repeat(frame, rule_name, low, high, op_pos)
            elif c == "{":
                op_pos = pos
                pos, low, high = self.parse_braces(pos, frame.nested)
                self.repeat(frame, rule_name, low, high, op_pos)
            elif c == "|":
                items.append(_ALT)
                self.grow(1)
                pos = self.parse_space(pos + 1, True)
                frame.last_sym_start = len(items)
                frame.n_prev_rules = 1
            else:
                # End of this parse_alternates: store the rule, then back in the caller.
                items.append(_END)
                self.grow(1)
                self.add_rule(frame.rule_id, items)
                done = frames.pop()
                if not frames:
                    return pos
                frame = frames[-1]
                frame.n_prev_rules = max(1, len(self.symbols) - done.symbols_before)
                frame.last_sym_start = len(frame.items)
                frame.items.append(done.rule_id)
                self.grow(1)
                if s[pos] != ")":
                    line, column = _line_column(self.text, done.opened_at)
                    raise self.error(f"expecting ')' to close the '(' at line {line}, column {column}", pos)
                pos = self.parse_space(pos + 1, frame.nested)

    def parse_string(self, pos: int, frame: _Frame) -> int:
        s = self.s
        opened_at = pos
        pos += 1
        frame.last_sym_start = len(frame.items)
        frame.n_prev_rules = 1
        count = 0
        while s[pos] != '"':
            run = _PLAIN_RUN.match(s, pos)
            if run:  # plain characters: one parse_char each, nothing to check
                count += run.end() - pos
                pos = run.end()
                continue
            if s[pos] == _NUL:
                line, column = _line_column(self.text, opened_at)
                raise self.error(f"unterminated string literal (opened at line {line}, column {column})", pos)
            escape = pos
            pos = self.parse_char(pos)
            if self.last_char == 0:
                raise self.error("a NUL character in a string can be matched by no token "
                                 "(llama.cpp would abort while sampling)", escape)
            count += 1
        if count:  # "" adds no element, so nothing for a repetition to apply to
            frame.items.append(_terminal(count))
            self.grow(count)
        return self.parse_space(pos + 1, frame.nested)

    def parse_class(self, pos: int, frame: _Frame) -> int:
        s = self.s
        opened_at = pos
        pos += 1
        negated = s[pos] == "^"
        if negated:
            pos += 1
        frame.last_sym_start = len(frame.items)
        frame.n_prev_rules = 1
        count = 0
        matches_something = False
        while s[pos] != "]":
            if s[pos] == _NUL:
                line, column = _line_column(self.text, opened_at)
                raise self.error(f"unterminated character class (opened at line {line}, column {column})", pos)
            pos = self.parse_char(pos)
            count += 1
            if s[pos] == "-" and s[pos + 1] != "]":
                if s[pos + 1] == _NUL:
                    raise self.error("unexpected end of input in a character range", pos + 1)
                low = self.last_char
                pos = self.parse_char(pos + 1)
                matches_something |= self.last_char >= low  # [z-a] is empty
                count += 1
            else:
                matches_something = True
        if count and not negated and not matches_something:
            raise self.error("character class matches no character: each of its ranges ends before it "
                             "starts (llama.cpp would abort while sampling)", opened_at)
        if count:  # [] and [^] add no element
            frame.items.append(_terminal(count))
            self.grow(count)
        return self.parse_space(pos + 1, frame.nested)

    def parse_token(self, pos: int) -> int:
        """Position after ``<[id]>``, ``<text>`` or their ``!`` negations; llama.cpp's `parse_token`."""
        s = self.s
        if s[pos] == "!":
            pos += 1
        if s[pos] != "<":
            raise self.error("expecting '<' (a token reference) after '!'", pos)
        start = pos
        pos += 1
        if s[pos] == "[":
            token_id, pos = self.parse_int(pos + 1)
            if token_id > _UINT32_MAX:
                raise self.error(f"token id {token_id} is too big", start)
            if self.vocab_size is not None and token_id >= self.vocab_size:
                raise self.error(f"token id {token_id} is not in the model's vocabulary "
                                 f"(ids 0 to {self.vocab_size - 1})", start)
            if s[pos] != "]":
                raise self.error("expecting ']' after a token id", pos)
            if s[pos + 1] != ">":
                raise self.error("expecting '>' after a token id", pos + 1)
            return pos + 2
        end = s.find(">", pos)
        if end < 0:
            raise self.error("expecting '>' to end the token reference", len(self.text))
        token = s[start:end + 1]
        if self.is_single_token is None:
            raise self.error(f"token reference {token} needs the model's vocabulary to check; "
                             "use its id as <[id]>", start)
        if not self.is_single_token(token):
            raise self.error(f"{token} is not exactly one token of this model's vocabulary", start)
        return end + 1

    def parse_braces(self, pos: int, nested: bool) -> tuple[int, int, int | None]:
        """``{m}``, ``{m,}`` or ``{m,n}``: (position after it, m, n or _INFINITE), as llama.cpp reads them."""
        s = self.s
        brace = pos
        pos = self.parse_space(pos + 1, nested)
        if s[pos] not in _DIGITS:
            raise self.error("expecting an integer after '{'", pos)
        low, end = self.parse_int(pos)
        if low > _UINT64_MAX:
            raise self.error("repetition count out of range", pos)
        pos = self.parse_space(end, nested)
        high: int | None = _INFINITE
        if s[pos] == "}":
            high = low
            pos = self.parse_space(pos + 1, nested)
        elif s[pos] == ",":
            pos = self.parse_space(pos + 1, nested)
            if s[pos] in _DIGITS:
                high, end = self.parse_int(pos)
                if high > _UINT64_MAX:
                    raise self.error("repetition count out of range", pos)
                pos = self.parse_space(end, nested)
            if s[pos] != "}":
                raise self.error("expecting '}' to end the repetition", pos)
            pos = self.parse_space(pos + 1, nested)
        else:
            raise self.error("expecting ',' or '}' in the repetition", pos)
        if low > LLAMA_REPETITION_THRESHOLD:
            raise self.error(f"repetition minimum {low} is above llama.cpp's limit of "
                             f"{LLAMA_REPETITION_THRESHOLD}", brace)
        if high is not _INFINITE and high > LLAMA_REPETITION_THRESHOLD:
            high = _INFINITE  # llama.cpp's reading: x{0,5000} is x*
        if high is not _INFINITE and high < low:
            raise self.error(f"repetition maximum {high} is below its minimum {low}", brace)
        return pos, low, high

    def repeat(self, frame: _Frame, rule_name: str, low: int, high: int | None, op_pos: int) -> None:
        """llama.cpp's ``handle_repetitions``: rewrite the last item S as S{low,high}."""
        items = frame.items
        start = frame.last_sym_start
        if start == len(items):
            raise self.error("nothing before this repetition operator to repeat", op_pos)
        prev = items[start:]
        no_max = high is _INFINITE
        if not no_max and high > 0:
            total_rules = high
        elif low > 0:
            total_rules = low
        else:
            total_rules = 1
        if frame.n_prev_rules * total_rules > LLAMA_REPETITION_THRESHOLD:
            raise self.error(
                f"this repetition would repeat {frame.n_prev_rules} rule(s) {total_rules} times, above "
                f"llama.cpp's limit of {LLAMA_REPETITION_THRESHOLD}; reduce the count or simplify what it repeats",
                op_pos)
        weight = sum(_weight(item) for item in prev)
        if low == 0:
            del items[start:]
            self.elements -= weight
        else:
            self.grow(weight * (low - 1))
            items.extend(prev * (low - 1))
        n_opt = 1 if no_max else high - low
        last_rec_rule_id = 0
        for i in range(n_opt):
            rec_rule_id = self.generate_symbol_id(rule_name, "repetition", op_pos)
            rec_rule = prev.copy()
            if i > 0 or no_max:
                rec_rule.append(rec_rule_id if no_max else last_rec_rule_id)
            rec_rule.append(_ALT)
            rec_rule.append(_END)
            self.grow(len(rec_rule) - len(prev) + weight)
            self.add_rule(rec_rule_id, rec_rule)
            last_rec_rule_id = rec_rule_id
        if n_opt > 0:
            items.append(last_rec_rule_id)
            self.grow(1)
        frame.n_prev_rules *= total_rules

    # ------------------------------------------------------------------ validation and init

    def check(self, root: str) -> None:
        self.parse()
        rules = self.rules
        n_rules = len(rules)
        # llama_grammar_parser::parse: every rule slot defined, every reference in range.
        for rule in rules:
            if rule is None:
                continue
            for item in rule:
                if item >= 0 and (item >= n_rules or rules[item] is None):
                    raise self.undefined(item)
        for rule_id, rule in enumerate(rules):
            if rule is None:
                raise self.undefined(rule_id)
        # llama_grammar_init_impl
        if not rules:
            raise GrammarError("grammar has no rules (only whitespace and comments)")
        root_id = self.symbol_ids.get(root)
        if root_id is None:
            raise GrammarError(f"grammar has no rule named '{root}' (the start rule)")
        if root_id >= n_rules:
            # Only mentioned in a definition that a later one replaced: llama.cpp
            # finds the name, then reads past the end of its rule table.
            raise self.undefined(root_id)
        self.check_llama_left_recursion()
        self.check_expansion(root_id)

    def undefined(self, rule_id: int) -> GrammarError:
        symbol = self.symbols[rule_id]
        line, column = _line_column(self.text, symbol.position)
        return GrammarError(f"undefined rule '{symbol.name}'", line, column)

    def chain(self, rule_ids: list[int]) -> str:
        if len(rule_ids) > 12:
            return " -> ".join(map(self.short, rule_ids[:6])) + " -> ... -> " + \
                " -> ".join(map(self.short, rule_ids[-6:]))
        return " -> ".join(map(self.short, rule_ids))

    def left_recursion(self, rule_id: int, cycle: list[int], deep: bool = False) -> GrammarError:
        how = ", after rules that can match nothing," if deep else ""
        hint = ""
        if any(self.symbols[r].kind == "repetition" for r in cycle):
            hint = " (repeating something that can match nothing is one)"
        return GrammarError(
            f"left recursion: {self.describe(rule_id)} can begin{how} with itself ({self.chain(cycle)}); "
            f"llama.cpp cannot use left-recursive grammars{hint}")

    def check_llama_left_recursion(self) -> None:
        """``llama_grammar_detect_left_recursion`` over every rule, without its exponential walk.

        llama.cpp follows, in each alternative, the leading rule references for
        as long as each one may be empty, where "may be empty" means that the
        rule has a literally empty alternative (nothing deeper).  A cycle in
        that graph is what it rejects.  Without one, its cost is the number of
        paths it walks (it does not remember finished rules) and its recursion
        depth the longest chain: both are bounded here.
        """
        rules: list[list[int]] = self.rules  # type: ignore[assignment]  # all defined by now
        n_rules = len(rules)
        may_be_empty = [False] * n_rules
        for rule_id, rule in enumerate(rules):
            at_rule_start = True
            for item in rule:
                if item == _ALT or item == _END:
                    if at_rule_start:
                        may_be_empty[rule_id] = True
                        break
                    at_rule_start = True
                else:
                    at_rule_start = False
        edges: list[list[int]] = []
        for rule in rules:
            out: list[int] = []
            recurse = True
            for item in rule:
                if item >= 0 and recurse:
                    out.append(item)
                    if not may_be_empty[item]:
                        recurse = False
                elif item == _ALT or item == _END:
                    recurse = True
                else:
                    recurse = False
            edges.append(out)

        # Iterative depth-first search: colour 1 = on the current path, 2 = done.
        colour = [0] * n_rules
        order: list[int] = []  # post-order: every rule after the rules it starts with
        for start in range(n_rules):
            if colour[start]:
                continue
            path = [start]
            cursors = [0]
            colour[start] = 1
            while path:
                node = path[-1]
                out = edges[node]
                if cursors[-1] < len(out):
                    nxt = out[cursors[-1]]
                    cursors[-1] += 1
                    if colour[nxt] == 1:
                        raise self.left_recursion(nxt, path[path.index(nxt):] + [nxt])
                    if colour[nxt] == 0:
                        colour[nxt] = 1
                        path.append(nxt)
                        cursors.append(0)
                else:
                    colour[node] = 2
                    order.append(node)
                    path.pop()
                    cursors.pop()

        cap = MAX_LEFT_RECURSION_STEPS + 1
        steps = [0] * n_rules
        depth = [0] * n_rules
        for node in order:
            total = 1
            deepest = 0
            for nxt in edges[node]:
                total += steps[nxt]
                deepest = max(deepest, depth[nxt])
            steps[node] = min(total, cap)
            depth[node] = deepest + 1
            if depth[node] > MAX_LEFT_CHAIN:
                raise GrammarError(
                    f"{self.describe(node)} starts a chain of more than MAX_LEFT_CHAIN "
                    f"({MAX_LEFT_CHAIN}) rules that can each begin with the next")
        # llama.cpp's outer loop: every rule not yet visited starts a fresh walk.
        visited = [False] * n_rules
        total = 0
        for start in range(n_rules):
            if visited[start]:
                continue
            total += steps[start]
            if total > MAX_LEFT_RECURSION_STEPS:
                raise GrammarError(
                    f"grammar is too ambiguous: llama.cpp would take more than MAX_LEFT_RECURSION_STEPS "
                    f"({MAX_LEFT_RECURSION_STEPS}) steps to check it for left recursion")
            todo = [start]
            visited[start] = True
            while todo:
                for nxt in edges[todo.pop()]:
                    if not visited[nxt]:
                        visited[nxt] = True
                        todo.append(nxt)

    def check_expansion(self, root_id: int) -> None:
        """Refuse what would make llama.cpp's parse stacks grow without end or explode.

        Before each character, llama.cpp expands the rule references on top of
        each parse stack until a terminal is on top, pushing what follows a
        reference in its alternative, and drops duplicate stacks by linear
        search.  Only rules reachable from the root matter, but here rules that
        can match nothing are found properly (not just literally empty ones):

        * a rule that can begin with itself, through references that can match
          nothing, where some reference on the way is followed by more items,
          pushes one more item per round and never stops (memory runs out);
          when every such reference is the last of its alternative, the stacks
          repeat and llama.cpp copes, so that is left alone;
        * otherwise the number of ways a rule can begin bounds the number of
          stacks, and the linear-search deduplication costs its square.
        """
        rules: list[list[int]] = self.rules  # type: ignore[assignment]  # all defined by now
        n_rules = len(rules)
        reachable = [False] * n_rules
        reachable[root_id] = True
        todo = [root_id]
        while todo:
            for item in rules[todo.pop()]:
                if item >= 0 and not reachable[item]:
                    reachable[item] = True
                    todo.append(item)

        # Rules that can match nothing: some alternative of only such rules.
        nullable = [False] * n_rules
        alternatives_of: list[int] = []  # owner rule of each candidate alternative
        waiting: list[int] = []  # references in it not yet known to match nothing
        users: dict[int, list[int]] = {}  # rule -> candidate alternatives that reference it
        ready: list[int] = []
        for rule_id in range(n_rules):
            if not reachable[rule_id]:
                continue
            refs: list[int] = []
            has_terminal = False
            for item in rules[rule_id]:
                if item == _ALT or item == _END:
                    if not has_terminal:
                        if not refs:
                            if not nullable[rule_id]:
                                nullable[rule_id] = True
                                ready.append(rule_id)
                        else:
                            index = len(alternatives_of)
                            alternatives_of.append(rule_id)
                            waiting.append(len(refs))
                            for ref in refs:
                                users.setdefault(ref, []).append(index)
                    refs = []
                    has_terminal = False
                elif item >= 0:
                    refs.append(item)
                else:
                    has_terminal = True
        while ready:
            for index in users.get(ready.pop(), ()):
                waiting[index] -= 1
                owner = alternatives_of[index]
                if waiting[index] == 0 and not nullable[owner]:
                    nullable[owner] = True
                    ready.append(owner)

        # Leading references: (target, followed by more items in its alternative).
        edges: list[list[tuple[int, bool]]] = [[] for _ in range(n_rules)]
        for rule_id in range(n_rules):
            if not reachable[rule_id]:
                continue
            rule = rules[rule_id]
            leading = True
            for i, item in enumerate(rule):
                if item == _ALT or item == _END:
                    leading = True
                elif item >= 0 and leading:
                    nxt = rule[i + 1]
                    edges[rule_id].append((item, nxt != _ALT and nxt != _END))
                    leading = nullable[item]
                else:
                    leading = False

        # Tarjan's strongly connected components, iteratively; components come
        # out after every component they lead to.
        index_of = [-1] * n_rules
        low = [0] * n_rules
        on_stack = [False] * n_rules
        component = [-1] * n_rules
        stack: list[int] = []
        counter = 0
        components: list[list[int]] = []
        for start in range(n_rules):
            if not reachable[start] or index_of[start] >= 0:
                continue
            work = [(start, 0)]
            index_of[start] = low[start] = counter
            counter += 1
            stack.append(start)
            on_stack[start] = True
            while work:
                node, cursor = work[-1]
                out = edges[node]
                if cursor < len(out):
                    work[-1] = (node, cursor + 1)
                    nxt = out[cursor][0]
                    if index_of[nxt] < 0:
                        index_of[nxt] = low[nxt] = counter
                        counter += 1
                        stack.append(nxt)
                        on_stack[nxt] = True
                        work.append((nxt, 0))
                    elif on_stack[nxt]:
                        low[node] = min(low[node], index_of[nxt])
                    continue
                work.pop()
                if work:
                    parent = work[-1][0]
                    low[parent] = min(low[parent], low[node])
                if low[node] == index_of[node]:
                    members = []
                    while True:
                        member = stack.pop()
                        on_stack[member] = False
                        component[member] = len(components)
                        members.append(member)
                        if member == node:
                            break
                    components.append(members)

        cap = MAX_LEFT_PATHS + 1
        paths = [0] * len(components)
        for c, members in enumerate(components):
            total = len(members)
            for node in members:
                for nxt, grows in edges[node]:
                    if component[nxt] != c:
                        total += paths[component[nxt]]
                    elif grows:
                        raise self.endless_expansion(node, nxt, edges, component)
            paths[c] = min(total, cap)
            if total > MAX_LEFT_PATHS:
                raise GrammarError(
                    f"grammar is too ambiguous: {self.describe(members[0])} can begin in more than "
                    f"MAX_LEFT_PATHS ({MAX_LEFT_PATHS}) ways, which llama.cpp would track one by one")

    def endless_expansion(self, node: int, nxt: int, edges: list[list[tuple[int, bool]]],
                          component: list[int]) -> GrammarError:
        """The error for a growing cycle through the leading reference node -> nxt."""
        # Shortest way back from nxt to node inside their component, for the message.
        came_from = {nxt: nxt}
        todo = [nxt]
        for current in todo:
            if current == node:
                break
            for target, _ in edges[current]:
                if component[target] == component[node] and target not in came_from:
                    came_from[target] = current
                    todo.append(target)
        back = [node]
        while back[-1] != nxt:
            back.append(came_from[back[-1]])
        return self.left_recursion(node, [node] + back[::-1], deep=True)
