"""One reading of a pydantic validation error, for every place that reports one (a config
file, a request body, a CLI argument): the field's path as the input spells it, and what is
wrong with it."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import ValidationError


@dataclass(frozen=True, slots=True)
class Problem:
    field: str  # "history.0.role"; "" when it is the whole input
    message: str

    def __str__(self) -> str:
        return f"{self.field}: {self.message}" if self.field else self.message


def problem_of(exc: ValidationError, prefix: str = "") -> Problem:
    """The first problem; `prefix` goes before the field ("models.local", "plugins.x")."""
    error = exc.errors()[0]
    parts = [prefix] if prefix else []
    parts += [str(part) for part in error["loc"] if not _is_type_tag(part)]
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    return Problem(".".join(parts), message)


def first_problem(exc: ValidationError, prefix: str = "") -> str:
    """The first problem in one line: `prefix.key: message`."""
    return str(problem_of(exc, prefix))


def _is_type_tag(part: int | str) -> bool:
    # pydantic names the member of a union in the path ("history.list[HistoryMessage].0");
    # the input spells it "history.0".
    return isinstance(part, str) and ("[" in part or part in {"int", "str", "float", "bool"})


def query_problem(query: str, max_chars: int | None) -> str | None:
    """What is wrong with a user's query (blank, or longer than `max_query_chars`); None
    when nothing is. Every transport checks its query with this."""
    if not query.strip():
        return "must not be empty"
    if max_chars is not None and len(query) > max_chars:
        return f"must be at most {max_chars} characters (got {len(query)})"
    return None
