"""The part of Prometheus' alert templating (Go ``text/template``) that our rules use.

:func:`render` expands an annotation the way Prometheus does when the alert fires, so a rule's
``promtool`` test derives its expected annotations from the rule's own text instead of a second,
hand-rendered copy. It knows exactly the constructs of :mod:`.rules`; anything else raises
``ValueError`` naming the construct, so a new template construct fails generation, never a test
silently.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

__all__ = ["Sample", "render", "selector_query"]

_ACTION = re.compile(r"{{(.*?)}}", re.S)
_SELECTOR = re.compile(r'^([a-zA-Z_:][a-zA-Z0-9_:]*)\{((?:[a-zA-Z_]\w*="[^"\\]*",?)*)\}$')
_MATCHER = re.compile(r'([a-zA-Z_]\w*)="([^"\\]*)"')
_VERB = re.compile(r"%(?:(\.\d+)?f|q|s|%)")


@dataclass(frozen=True)
class Sample:
    """One result of the ``query`` template function."""

    labels: Mapping[str, str]
    value: float


Query = Callable[[str], list[Sample]]


def render(text: str, *, labels: Mapping[str, str], value: float | None,
           query: Query | None = None) -> str:
    """``text`` expanded for an alert with ``labels`` and ``$value``.

    Args:
        text: A Prometheus annotation template.
        labels: The firing series' labels (``$labels``); a missing one reads as ``""``.
        value: The firing sample's value (``$value``); ``None``: the text must not read it.
        query: Answers the ``query`` function (a PromQL string) with its samples.

    Raises:
        ValueError: ``text`` uses a construct this renderer does not implement.
    """
    nodes, rest = _parse(_tokens(text), text)
    if rest:
        raise ValueError(f"Unexpected {{{{ {rest[0][1]} }}}} in template {text!r}")
    out: list[str] = []
    _run(nodes, _Scope(dict(labels), value, query, None, text), out)
    return "".join(out)


def _tokens(text: str) -> list[tuple[str, str]]:
    """``("text", literal)`` and ``("action", inside of {{ }})`` in order."""
    tokens, pos = [], 0
    for m in _ACTION.finditer(text):
        tokens.append(("text", text[pos:m.start()]))
        inner = m.group(1)
        if inner.startswith("-") or inner.endswith("-") or inner.strip().startswith("/*"):
            raise ValueError(f"Template construct {m.group(0)!r} (trim or comment) is not "
                             f"supported in {text!r}")
        tokens.append(("action", inner.strip()))
        pos = m.end()
    tokens.append(("text", text[pos:]))
    return [t for t in tokens if t != ("text", "")]


def _parse(tokens: list[tuple[str, str]], text: str) -> tuple[list, list[tuple[str, str]]]:
    """Nodes up to an unmatched ``else``/``end`` (returned with what follows it)."""
    nodes: list = []
    while tokens:
        kind, body = tokens[0]
        if kind == "text":
            nodes.append(("text", body))
            tokens = tokens[1:]
            continue
        word = body.split(None, 1)[0] if body else ""
        if word in ("range", "define", "template", "block", "break", "continue") or ":=" in body:
            raise ValueError(f"Template construct {{{{ {body} }}}} is not supported in {text!r}")
        if word in ("else", "end"):
            return nodes, tokens
        if word in ("if", "with"):
            then, tokens = _parse(tokens[1:], text)
            otherwise: list = []
            if tokens and tokens[0][1] == "else":
                otherwise, tokens = _parse(tokens[1:], text)
            if not tokens or tokens[0][1] != "end":
                raise ValueError(f"{{{{ {body} }}}} has no {{{{ end }}}} in template {text!r}")
            nodes.append((word, body.split(None, 1)[1], then, otherwise))
            tokens = tokens[1:]
            continue
        nodes.append(("pipe", body))
        tokens = tokens[1:]
    return nodes, []


@dataclass(frozen=True)
class _Scope:
    labels: dict[str, str]
    value: float | None
    query: Query | None
    dot: object
    text: str

    def fail(self, what: str) -> ValueError:
        return ValueError(f"Template construct {what!r} is not supported (in {self.text!r}); "
                          "extend privacy_callbacks.ops.template or rephrase the annotation")


def _run(nodes: list, scope: _Scope, out: list[str]) -> None:
    for node in nodes:
        if node[0] == "text":
            out.append(node[1])
        elif node[0] == "pipe":
            out.append(_print(_pipe(node[1], scope), node[1], scope))
        else:
            kind, pipe, then, otherwise = node
            result = _pipe(pipe, scope)
            if _truthy(result):
                inner = scope if kind == "if" else _Scope(scope.labels, scope.value, scope.query,
                                                          result, scope.text)
                _run(then, inner, out)
            else:
                _run(otherwise, scope, out)


def _truthy(value: object) -> bool:
    return value not in (None, "", 0, 0.0, False) and value != []


def _print(value: object, pipe: str, scope: _Scope) -> str:
    if isinstance(value, str):
        return value
    # Go prints a bare float with %v, which Python's repr does not match: make it explicit.
    raise scope.fail(f"{{{{ {pipe} }}}} printing a {type(value).__name__} without printf")


def _split(text: str, sep: str | None) -> list[str]:
    """``text`` split on ``sep`` (whitespace if ``None``) outside quotes and backticks."""
    parts, current, quote = [], "", ""
    for ch in text:
        if quote:
            current += ch
            if ch == quote:
                quote = ""
        elif ch in "\"`":
            quote, current = ch, current + ch
        elif (ch.isspace() if sep is None else ch == sep):
            parts.append(current)
            current = ""
        else:
            current += ch
    if quote:
        raise ValueError(f"Unterminated string in template action {text!r}")
    parts.append(current)
    return [p.strip() for p in parts if p.strip()] if sep is None else [p.strip() for p in parts]


def _pipe(pipe: str, scope: _Scope) -> object:
    result: object = _Missing
    for command in _split(pipe, "|"):
        words = _split(command, None)
        if not words:
            raise scope.fail(pipe)
        args = [_operand(w, scope) for w in words[1:]]
        if result is not _Missing:
            args.append(result)
        if len(words) == 1 and not words[0].isidentifier():
            if result is not _Missing:
                raise scope.fail(pipe)
            result = _operand(words[0], scope)
        else:
            result = _call(words[0], args, scope)
    return result


class _Missing:
    pass


def _operand(word: str, scope: _Scope) -> object:
    if word == "$value":
        if scope.value is None:
            raise ValueError(f"$value is read but no value was given (in {scope.text!r})")
        return float(scope.value)
    if word.startswith("$labels."):
        return scope.labels.get(word[len("$labels."):], "")
    if word == ".":
        return scope.dot
    if len(word) >= 2 and word[0] == word[-1] == "`":
        return word[1:-1]
    if len(word) >= 2 and word[0] == word[-1] == '"':
        return json.loads(word)
    raise scope.fail(word)


def _call(name: str, args: list, scope: _Scope) -> object:
    if name == "printf" and args and isinstance(args[0], str):
        return _printf(args[0], args[1:], scope)
    if name == "humanizePercentage" and len(args) == 1 and isinstance(args[0], float):
        return _g4(args[0] * 100) + "%"
    if name == "humanizeDuration" and len(args) == 1 and isinstance(args[0], float):
        return _duration(args[0], scope)
    if name == "query" and len(args) == 1 and isinstance(args[0], str) and scope.query:
        return scope.query(args[0])
    if name == "first" and len(args) == 1 and isinstance(args[0], list):
        if not args[0]:
            raise ValueError(f"first of an empty query result (in {scope.text!r})")
        return args[0][0]
    if name == "value" and len(args) == 1 and isinstance(args[0], Sample):
        return float(args[0].value)
    raise scope.fail(f"{name} with {len(args)} argument(s)")


def _printf(fmt: str, args: list, scope: _Scope) -> str:
    out, pos, rest = [], 0, list(args)
    for m in _VERB.finditer(fmt):
        out.append(fmt[pos:m.start()])
        pos = m.end()
        verb = m.group(0)
        if verb == "%%":
            out.append("%")
            continue
        if not rest:
            raise scope.fail(f"printf {fmt!r} with too few arguments")
        arg = rest.pop(0)
        if verb.endswith("f") and isinstance(arg, float):
            out.append(verb % arg)
        elif verb == "%q" and isinstance(arg, str) and arg.isprintable():
            out.append(json.dumps(arg, ensure_ascii=False))
        elif verb == "%s" and isinstance(arg, str):
            out.append(arg)
        else:
            raise scope.fail(f"printf {verb} of {arg!r}")
    tail = fmt[pos:]
    if "%" in tail or rest:
        raise scope.fail(f"printf {fmt!r} with {len(args)} argument(s)")
    out.append(tail)
    return "".join(out)


def _g4(v: float) -> str:
    """Go's ``%.4g`` (Python's agrees for finite values)."""
    if not math.isfinite(v):
        return {math.inf: "+Inf", -math.inf: "-Inf"}.get(v, "NaN")
    return f"{v:.4g}"


def _duration(v: float, scope: _Scope) -> str:
    """Prometheus' ``humanizeDuration`` for 0, non-finite values and at least one second."""
    if not math.isfinite(v) or v == 0:
        return _g4(v) + ("s" if v == 0 else "")
    if abs(v) < 1:
        raise scope.fail(f"humanizeDuration of {v!r} (under a second)")
    sign, total = ("-" if v < 0 else ""), int(abs(v))
    days, hours = total // 86400, total // 3600 % 24
    minutes, seconds = total // 60 % 60, total % 60
    if days:
        return f"{sign}{days}d {hours}h {minutes}m {seconds}s"
    if hours:
        return f"{sign}{hours}h {minutes}m {seconds}s"
    if minutes:
        return f"{sign}{minutes}m {seconds}s"
    return f"{sign}{_g4(abs(v))}s"


def selector_query(series: Mapping[str, float | None]) -> Query:
    """A ``query`` answering an exact-match selector from ``series`` (selector -> latest value).

    ``series`` maps each input series (``name{a="b",...}``) to its value at evaluation time
    (``None``: no sample). Any query but ``name{label="value",...}``, or one that selects more
    than one series, raises ``ValueError``.
    """
    parsed = []
    for selector, value in series.items():
        name, labels = _parse_selector(selector)
        parsed.append((name, labels, value))

    def query(promql: str) -> list[Sample]:
        name, matchers = _parse_selector(promql)
        found = [Sample(labels, value) for n, labels, value in parsed
                 if n == name and value is not None
                 and all(labels.get(k) == v for k, v in matchers.items())]
        if len(found) > 1:
            # Prometheus' order of several results is not ours to guess.
            raise ValueError(f"Query {promql!r} matches {len(found)} input series; "
                             "make the case's series or the query select one")
        return found

    return query


def _parse_selector(selector: str) -> tuple[str, dict[str, str]]:
    m = _SELECTOR.match(selector.replace(" ", ""))
    if not m:
        raise ValueError(f"Query {selector!r} is not supported: only name{{label=\"value\",...}} "
                         "selectors are answered from the test's input series")
    return m.group(1), dict(_MATCHER.findall(m.group(2)))
