"""core.templates.PromptTemplates: the query is data, templates are sandboxed."""

from __future__ import annotations

import pytest
from jinja2.exceptions import SecurityError

from core.config import ConfigError
from core.templates import PromptTemplates

TRICKY_QUERIES = [
    "plain text",
    "{{ 7*7 }}",
    "{{7*7}} and {{ input }}",
    "{% raw %}x{% endraw %}",
    "{% raw %}",
    "{% if true %}yes{% endif %}",
    "{# a comment #}",
    "{#",
    "}}",
    "{{",
    "{ } {{ }} {{{ }}}",
    "{{ config.__class__ }}",
    "def f():\n    return {'a': {'b': 1}}\n",
    "<b>bold</b> & 'quotes' \"double\"",
    "  leading and trailing spaces  ",
    "trailing newline\n",
    "\n\n",
    "emoji 😀 and 中文",
    "{%- set x = 1 -%}{{ x }}",
]


@pytest.fixture
def templates() -> PromptTemplates:
    return PromptTemplates(
        {
            "default": "{{ input }}",
            "py": "You are a careful programming assistant.\n\n{{ input }}",
            "wrapped": "<<{{ input }}>>\n",
        }
    )


@pytest.mark.parametrize("query", TRICKY_QUERIES)
def test_default_renders_the_query_unchanged(templates: PromptTemplates, query: str) -> None:
    assert templates.render("default", query) == query


@pytest.mark.parametrize("query", TRICKY_QUERIES)
def test_surrounding_text_and_the_query_as_is(templates: PromptTemplates, query: str) -> None:
    expected = f"You are a careful programming assistant.\n\n{query}"
    assert templates.render("py", query) == expected


def test_template_trailing_newline_is_kept(templates: PromptTemplates) -> None:
    assert templates.render("wrapped", "x") == "<<x>>\n"


def test_empty_query(templates: PromptTemplates) -> None:
    assert templates.render("default", "") == ""
    assert templates.render("wrapped", "") == "<<>>\n"


def test_a_long_query(templates: PromptTemplates) -> None:
    query = "{{ x }} " * 50_000
    assert templates.render("default", query) == query


def test_syntax_error_is_a_config_error_naming_the_prompt() -> None:
    with pytest.raises(ConfigError) as info:
        PromptTemplates({"default": "{{ input }}", "broken": "Answer: {{ input "})
    message = str(info.value)
    assert message.startswith("prompts.broken: template error: ")
    assert "\n" not in message


def test_syntax_error_on_a_later_line_is_one_line() -> None:
    with pytest.raises(ConfigError) as info:
        PromptTemplates({"multi": "line one\nline two {% if %}\nline three {{ input }}"})
    message = str(info.value)
    assert message.startswith("prompts.multi: template error: ")
    assert "\n" not in message


def test_unknown_tag_is_a_config_error() -> None:
    with pytest.raises(ConfigError) as info:
        PromptTemplates({"x": "{% include 'etc/passwd' %}{% nosuchtag %}"})
    assert str(info.value).startswith("prompts.x: template error: ")


def test_sandbox_blocks_dunder_attribute_chains() -> None:
    templates = PromptTemplates({"evil": "{{ input.__class__.__mro__ }}"})
    try:
        rendered = templates.render("evil", "x")
    except SecurityError:
        return
    assert "class" not in rendered
    assert "object" not in rendered
    assert "str" not in rendered


@pytest.mark.parametrize(
    "source",
    [
        "{{ input.__class__ }}",
        "{{ input.__class__.__base__.__subclasses__() }}",
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ '{0.__class__}'.format(input) }}",
        "{{ input|attr('__class__') }}",
        "{{ cycler.__init__.__globals__ }}",
    ],
)
def test_sandbox_leaks_no_class_names(source: str) -> None:
    templates = PromptTemplates({"evil": source})
    try:
        rendered = templates.render("evil", "x")
    except SecurityError:
        return
    for leak in ("class", "object", "str", "subclasses", "globals", "builtins", "os"):
        assert leak not in rendered, rendered


def test_immutable_sandbox_refuses_mutation() -> None:
    templates = PromptTemplates({"mutate": "{% set xs = [1] %}{{ xs.append(2) }}{{ xs }}"})
    with pytest.raises(SecurityError):
        templates.render("mutate", "x")


def test_safe_filters_still_work() -> None:
    templates = PromptTemplates({"upper": "{{ input|upper }} ({{ input|length }})"})
    assert templates.render("upper", "{{ hi }}") == "{{ HI }} (8)"


def test_names_and_membership(templates: PromptTemplates) -> None:
    assert templates.names == ["default", "py", "wrapped"]
    assert "py" in templates
    assert "missing" not in templates
    assert PromptTemplates({}).names == []


def test_unknown_name_is_a_key_error(templates: PromptTemplates) -> None:
    with pytest.raises(KeyError):
        templates.render("missing", "x")


VERBATIM_LOOKALIKES = ["{{ input }}", "{{input}}", "{{  input\n}}", "{{ input }}\n", " {{ input }}",
                       "{{ input }}{{ input }}", "{{ input|upper }}", "{{ input }}x"]  # fmt: skip


@pytest.mark.parametrize("source", VERBATIM_LOOKALIKES)
@pytest.mark.parametrize("query", TRICKY_QUERIES)
def test_a_template_that_is_its_input_renders_as_jinja2_would(source: str, query: str) -> None:
    """`{{ input }}` alone skips jinja2: the text must be what jinja2 itself renders, for
    that template and for every one that only looks like it."""
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    jinja = ImmutableSandboxedEnvironment(autoescape=False, keep_trailing_newline=True)
    expected = jinja.from_string(source).render(input=query)
    assert PromptTemplates({"t": source}).render("t", query) == expected
