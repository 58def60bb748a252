"""Prompt templates: `{column}` placeholders, literal braces, and rendering a row."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchrun.errors import JobError
from batchrun.prompts import compile_prompts, compile_template


def test_plain_text_renders_as_is() -> None:
    template = compile_template("No placeholders here.", "prompt.user")

    assert template.columns == ()
    assert template.render({}) == "No placeholders here."


def test_doubled_braces_are_literal_braces() -> None:
    template = compile_template('Answer as {{"summary": ...}} about {title}. }}{{', "prompt.user")

    assert template.columns == ("title",)
    assert template.render({"title": "Rain"}) == 'Answer as {"summary": ...} about Rain. }{'


def test_a_column_may_appear_more_than_once() -> None:
    template = compile_template("{title}, again {title}, and {body}", "prompt.user")

    assert template.columns == ("title", "body")
    assert template.render({"title": "T", "body": "B"}) == "T, again T, and B"


@pytest.mark.parametrize(
    ("value", "text"),
    [(3, "3"), (1.5, "1.5"), (True, "True"), (None, ""), ([1, 2], "[1, 2]"), ("", "")],
)
def test_values_that_are_not_strings_render_with_str(value: object, text: str) -> None:
    template = compile_template("<{v}>", "prompt.user")

    assert template.render({"v": value}) == f"<{text}>"


def test_columns_are_in_first_use_order_system_first() -> None:
    prompts = compile_prompts("You write for {audience} in {lang}.", "{title} {body} {lang}")

    assert prompts.columns == ("audience", "lang", "title", "body")
    assert prompts.needed()["prompt.user"] == ("title", "body", "lang")


def test_messages_have_system_then_user() -> None:
    prompts = compile_prompts("Be brief about {title}.", "{body}")

    assert prompts.messages({"title": "T", "body": "B"}) == [
        {"role": "system", "content": "Be brief about T."},
        {"role": "user", "content": "B"},
    ]


def test_without_system_there_is_only_the_user_message() -> None:
    prompts = compile_prompts(None, "{body}")

    assert prompts.columns == ("body",)
    assert prompts.messages({"body": "B"}) == [{"role": "user", "content": "B"}]


def test_an_empty_system_template_is_still_sent() -> None:
    assert compile_prompts("", "x").messages({}) == [
        {"role": "system", "content": ""},
        {"role": "user", "content": "x"},
    ]


@pytest.mark.parametrize(
    ("source", "message"),
    [
        ("Summarise {title", "prompt.user: expected '}' before end of string"),
        ("Summarise title}", "prompt.user: Single '}' encountered in format string"),
        ("{title:>10}", "prompt.user: placeholder '{title:>10}' has a format spec"),
        ("{title!r}", "prompt.user: placeholder '{title!r}' has a format spec"),
        ("{title!s:^5}", "prompt.user: placeholder '{title!s:^5}' has a format spec"),
        ("{}", "prompt.user: empty placeholder '{}'"),
        ("{ }", "prompt.user: empty placeholder '{}'"),
    ],
)
def test_bad_templates_name_the_key(source: str, message: str) -> None:
    with pytest.raises(JobError) as caught:
        compile_template(source, "prompt.user")

    assert str(caught.value).startswith(message)
    assert "\n" not in str(caught.value)


def test_hints_show_braces_as_they_are_written() -> None:
    with pytest.raises(JobError, match=r"write literal braces as '\{\{\}\}'$"):
        compile_template("{}", "prompt.user")
    with pytest.raises(JobError, match=r"write literal braces as '\{\{' and '\}\}'$"):
        compile_template("{", "prompt.user")


def test_the_system_template_is_named_in_its_errors() -> None:
    with pytest.raises(JobError, match=r"^prompt\.system: "):
        compile_prompts("{oops", "{body}")


COLUMNS = st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,7}", fullmatch=True)
LITERALS = st.text(alphabet=st.characters(exclude_characters="{}"), max_size=20)
SEGMENTS = st.one_of(
    LITERALS.map(lambda text: ("text", text)),
    COLUMNS.map(lambda name: ("column", name)),
    st.sampled_from([("text", "{{"), ("text", "}}")]),
)


@given(segments=st.lists(SEGMENTS, max_size=12), values=st.lists(st.text(), min_size=12, max_size=12))
def test_rendering_matches_str_format(segments: list[tuple[str, str]], values: list[str]) -> None:
    """Any text, placeholders and literal braces render just as `str.format` would."""
    source = "".join(f"{{{s}}}" if kind == "column" else s for kind, s in segments)
    names = sorted({s for kind, s in segments if kind == "column"})
    row = dict(zip(names, values, strict=False))  # values may hold braces: they are not re-read

    template = compile_template(source, "prompt.user")

    assert template.render(row) == source.format(**row)
    assert set(template.columns) == set(names)
