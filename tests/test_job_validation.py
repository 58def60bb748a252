"""Bad input gives exit 2 and one `Error:` line naming what is wrong, before anything is sent.

Every case is a row of CASES: a job file (the base job with one edit), the files beside it,
and the significant part of the one line expected. `run` is pointed at a port nothing listens
on, so a case that wrongly got as far as sending would show a connection error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import polars as pl
import pytest

from tests.conftest import TEST_KEY_ENV as KEY_ENV
from tests.conftest import invoke, write_job

UNSET_KEY_ENV = "BATCHRUN_VALIDATION_NEVER_SET_KEY"
UNREACHABLE = "http://127.0.0.1:9/v1"  # the discard port: nothing listens there

# Line numbers matter: cases assert on them.
JOB = f"""\
input:
  path: items.csv
  id_column: id
output:
  path: out.csv
  include_columns: [title]
model: test-model
prompt:
  system: You summarise news items.
  user: "Summarise {{title}}: {{body}}"
params:
  temperature: 0.2
  max_tokens: 64
endpoint:
  base_url: {UNREACHABLE}
  api_key_env: {KEY_ENV}
concurrency: 4
"""
CSV = b"id,title,body\na1,Rain,It rained all day.\na2,Sun,The sun came out.\n"
ITEMS = {"items.csv": CSV}


def many_rows(n: int, fmt: str) -> bytes:
    """`n` good rows with distinct ids, past what a schema is inferred from."""
    return "".join(fmt.format(i=i) for i in range(n)).encode()


def edit(old: str, new: str, job: str = JOB) -> str:
    """The base job with `old` (which must occur exactly once) replaced by `new`."""
    assert job.count(old) == 1, old
    return job.replace(old, new)


def drop(line: str) -> str:
    return edit(line + "\n", "")


@dataclass(frozen=True)
class Case:
    id: str
    expect: str  # a substring of the one error line
    job: str | None = JOB  # None: no job file at all
    files: dict[str, bytes] = field(default_factory=lambda: dict(ITEMS))
    commands: tuple[str, ...] = ("validate", "run")


CASES = [
    # --- the job file itself
    Case(
        "malformed-yaml",
        "job.yaml:7: invalid YAML: mapping values are not allowed here",
        edit("model: test-model", "model: test: model"),
    ),
    Case("job-file-missing", "job.yaml: job file not found", job=None),
    Case("empty-job-file", "job.yaml: a job file must be a YAML mapping", ""),
    Case("top-level-list", "job.yaml: a job file must be a YAML mapping", "- input\n- output\n"),
    Case("top-level-scalar", "job.yaml: a job file must be a YAML mapping", "just some text\n"),
    Case(
        "unknown-top-level-key",
        "job.yaml:7: unknown key 'modle'; did you mean 'model'?",
        edit("model: test-model", "modle: test-model"),
    ),
    Case(
        "unknown-top-level-key-no-suggestion",
        "job.yaml:18: unknown key 'colour'; expected one of: input, output, model, prompt",
        JOB + "colour: blue\n",
    ),
    Case(
        "non-string-top-level-key",
        "job.yaml:18: key 1 is not a string",
        JOB + "1: one\n",
    ),
    Case(
        "unknown-key-in-section",
        "job.yaml:2: unknown key 'paht' in input; did you mean 'path'?",
        edit("  path: items.csv", "  paht: items.csv"),
    ),
    Case(
        "misspelled-param",
        "job.yaml:12: unknown key 'temprature' in params; did you mean 'temperature'?",
        edit("temperature: 0.2", "temprature: 0.2"),
    ),
    Case(
        "wrong-type",
        "job.yaml:17: concurrency: Input should be a valid integer",
        edit("concurrency: 4", "concurrency: many"),
    ),
    Case(
        "section-not-a-mapping",
        "job.yaml:8: prompt: Input should be a valid dictionary",
        edit('  system: You summarise news items.\n  user: "Summarise {title}: {body}"\n', "").replace(
            "prompt:", "prompt: Summarise {title}"
        ),
    ),
    Case("missing-model", "job.yaml: missing required key 'model'", drop("model: test-model")),
    Case(
        "missing-prompt-user",
        "job.yaml:8: prompt: nothing to send; give prompt.user",
        drop('  user: "Summarise {title}: {body}"'),
    ),
    Case(
        "missing-input",
        "job.yaml: missing required key 'input'",
        edit("input:\n  path: items.csv\n  id_column: id\n", ""),
    ),
    Case(
        "temperature-too-high",
        "job.yaml:12: params.temperature: Input should be less than or equal to 2 (got 3)",
        edit("temperature: 0.2", "temperature: 3"),
    ),
    Case(
        "top-p-too-high",
        "job.yaml:14: params.top_p: Input should be less than or equal to 1 (got 1.5)",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  top_p: 1.5\n"),
    ),
    Case(
        "max-tokens-zero",
        "job.yaml:13: params.max_tokens: Input should be greater than or equal to 1 (got 0)",
        edit("max_tokens: 64", "max_tokens: 0"),
    ),
    Case(
        "five-stop-strings",
        "job.yaml:14: params.stop: stop takes a string or a list of 1 to 4 strings",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  stop: [a, b, c, d, e]\n"),
    ),
    Case(
        "stop-wrong-type",
        "job.yaml:14: params.stop: Input should be a valid string (got 5)",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  stop: 5\n"),
    ),
    Case(
        "concurrency-zero",
        "job.yaml:17: concurrency: Input should be greater than or equal to 1 (got 0)",
        edit("concurrency: 4", "concurrency: 0"),
    ),
    Case(
        "rate-limit-zero",
        "job.yaml:19: rate_limit.requests_per_minute: Input should be greater than or equal to 1 (got 0)",
        JOB + "rate_limit:\n  requests_per_minute: 0\n",
    ),
    Case(
        "rate-limit-fraction",
        "job.yaml:20: rate_limit.tokens_per_minute: Input should be a valid integer (got 1500.5)",
        JOB + "rate_limit:\n  requests_per_minute: 60\n  tokens_per_minute: 1500.5\n",
    ),
    Case(
        "rate-limit-bool",
        "job.yaml:19: rate_limit.requests_per_minute: Input should be a valid integer (got True)",
        JOB + "rate_limit:\n  requests_per_minute: true\n",
    ),
    Case(
        "rate-limit-typo",
        "job.yaml:19: unknown key 'requests_per_min' in rate_limit; did you mean 'requests_per_minute'?",
        JOB + "rate_limit:\n  requests_per_min: 60\n",
    ),
    Case(
        "rate-limit-not-a-mapping",
        "job.yaml:18: rate_limit: Input should be a valid dictionary",
        JOB + "rate_limit: 600\n",
    ),
    Case(
        "base-url-not-http",
        "job.yaml:15: endpoint.base_url: base_url must start with http:// or https:// and name a "
        "host (got 'ftp://example.com/v1')",
        edit(UNREACHABLE, "ftp://example.com/v1"),
    ),
    Case(
        "base-url-no-host",
        "job.yaml:15: endpoint.base_url: base_url must start with http:// or https:// and name a "
        "host (got 'https:///v1')",
        edit(UNREACHABLE, "https:///v1"),
    ),
    Case(
        "base-url-plain-http-off-loopback",
        "job.yaml:14: endpoint: plain http:// to a host other than this machine would send the API "
        "key in clear text; use https://, or set endpoint.allow_insecure_http: true",
        edit(UNREACHABLE, "http://api.example.com/v1"),
    ),
    Case(
        "null-in-prompt-column",
        "column 'title' used by the prompt is empty in row(s) 2 of items.csv; fill it, or set "
        "input.on_null: skip",
        files={"items.csv": b"id,title,body\na1,Rain,x\na2,,y\n"},
    ),
    Case(
        "reserved-param",
        "job.yaml:14: params.model is set by batchrun",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  model: other-model\n"),
    ),
    Case(
        "reserved-param-messages",
        "job.yaml:14: params.messages is set by batchrun",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  messages: []\n"),
    ),
    # --- the input table
    Case(
        "unsupported-input-extension",
        "job.yaml:2: input.path: 'items.xlsx' is not a table type batchrun knows; use .csv, .parquet",
        edit("path: items.csv", "path: items.xlsx"),
        files={"items.xlsx": b"PK\x03\x04 not really a workbook"},
    ),
    Case(
        "unsupported-output-extension",
        "job.yaml:5: output.path: 'out.txt' is not a table type batchrun knows",
        edit("path: out.csv", "path: out.txt"),
    ),
    Case("input-missing", "input file not found: ", files={}),
    Case(
        "input-url-scheme-polars-cannot-read",
        "job.yaml:2: input.path: polars cannot read ftp:// URLs; use a local path, or an s3://",
        edit("path: items.csv", "path: ftp://example.com/items.csv"),
    ),
    Case(
        "output-url-polars-cannot-write",
        "job.yaml:5: output.path: polars cannot write hf:// URLs; write to s3://, gs:// or az://",
        edit("path: out.csv", "path: hf://datasets/me/data/out.csv"),
    ),
    Case(
        "input-folder-without-parquet",
        "input folder ",
        edit("path: items.csv", "path: items.jsonl"),
        files={"items.jsonl/inner.csv": CSV},
    ),
    Case("input-header-only", "items.csv has no rows", files={"items.csv": b"id,title,body\n"}),
    Case("input-zero-bytes", "cannot read input ", files={"items.csv": b""}),
    Case(
        "input-not-parquet",
        "cannot read input ",
        edit("path: items.csv", "path: items.parquet"),
        files={"items.parquet": bytes(range(256)) * 8},
    ),
    Case(
        "input-truncated-parquet",
        "cannot read input ",
        edit("path: items.csv", "path: items.parquet"),
        files={"items.parquet": b"PAR1" + bytes(range(200)) + b"PAR1"},
    ),
    Case(
        "input-bad-jsonl",
        "cannot read input ",
        edit("path: items.csv", "path: items.jsonl"),
        files={"items.jsonl": b'{"id": "a1", "title": "Rain", "body": "x"}\n{"id": oops\n'},
    ),
    # a table is decoded whole before sending, so damage deep in the file is found too
    Case(
        "input-bad-line-deep-in-file",
        "cannot read input ",
        edit("path: items.csv", "path: items.jsonl"),
        files={
            "items.jsonl": many_rows(12_000, '{{"id": "r{i}", "title": "T", "body": "B"}}\n') + b"not json\n"
        },
    ),
    Case(
        "input-invalid-utf8",
        "cannot read input ",
        files={"items.csv": CSV + b"a3,\xff\xfe,x\n"},
    ),
    Case(
        "input-row-with-extra-fields",
        "found more fields than defined",
        files={"items.csv": CSV + many_rows(12_000, "r{i},T,B\n") + b"a3,Snow,x,surplus\n"},
    ),
    Case(
        "input-unclosed-quote",
        "cannot read input ",
        files={"items.csv": CSV + b'a3,"Snow,x\n'},
    ),
    # --- the templates against the input
    Case(
        "template-missing-column",
        "prompt.user names column 'titel', which items.csv does not have; did you mean 'title'? "
        "its columns are: id, title, body",
        edit("Summarise {title}", "Summarise {titel}"),
    ),
    Case(
        "system-template-missing-column",
        "prompt.system names column 'audience', which items.csv does not have",
        edit("You summarise news items.", "You summarise for {audience}."),
    ),
    Case(
        "template-unbalanced-brace",
        "job.yaml:10: prompt.user: expected '}' before end of string",
        edit('"Summarise {title}: {body}"', '"Summarise {title"'),
    ),
    Case(
        "template-stray-closing-brace",
        "job.yaml:10: prompt.user: Single '}' encountered",
        edit('"Summarise {title}: {body}"', '"Summarise title}"'),
    ),
    Case(
        "template-format-spec",
        "job.yaml:10: prompt.user: placeholder '{title:>10}' has a format spec",
        edit("{title}:", "{title:>10}:"),
    ),
    Case(
        "template-conversion",
        "job.yaml:10: prompt.user: placeholder '{title!r}' has a format spec",
        edit("{title}:", "{title!r}:"),
    ),
    Case(
        "template-empty-placeholder",
        "job.yaml:9: prompt.system: empty placeholder '{}'",
        edit("You summarise news items.", "You summarise {} items."),
    ),
    # --- ids and output columns against the input
    Case(
        "id-column-missing",
        "input.id_column 'uid' is not a column of items.csv; did you mean 'id'? "
        "its columns are: id, title, body",
        edit("id_column: id", "id_column: uid"),
    ),
    Case(
        "duplicate-ids",
        "input.id_column 'id' has duplicate ids in items.csv: 'a1'",
        files={"items.csv": CSV + b"a1,Snow,It snowed.\n"},
    ),
    Case(
        "null-id",
        "input.id_column 'id' is empty in row(s) 2 of items.csv",
        files={"items.csv": b"id,title,body\na1,Rain,x\n,Sun,y\n"},
    ),
    Case(
        "include-column-missing",
        "output.include_columns names column 'author', which items.csv does not have",
        edit("[title]", "[title, author]"),
    ),
    Case(
        "include-column-clashes-with-result",
        "job.yaml: output.include_columns: 'status' is also a result column",
        edit("[title]", "[title, status]"),
        files={"items.csv": b"id,title,body,status\na1,Rain,x,new\n"},
    ),
    Case(
        "output-is-input",
        "job.yaml: output.path is the input file",
        edit("path: out.csv", "path: items.csv"),
    ),
    # --- only `run` needs the key
    Case(
        "api-key-unset",
        f"{UNSET_KEY_ENV} is not set: export your API key as {UNSET_KEY_ENV}; "
        "pass --simulate to try the job offline",
        edit(f"api_key_env: {KEY_ENV}", f"api_key_env: {UNSET_KEY_ENV}"),
        commands=("run",),
    ),
    # --- conversations, tools and structured fields (issue #3)
    Case(
        "messages-and-user",
        "job.yaml:8: prompt: give either messages or system/user, not both",
        edit("prompt:\n", "prompt:\n  messages: [{role: user, content: hi}]\n"),
    ),
    Case(
        "message-role-unknown",
        "job.yaml:10: prompt.messages[0].role: Input should be 'system', 'user', 'assistant' or 'tool'",
        edit(
            '  system: You summarise news items.\n  user: "Summarise {title}: {body}"\n',
            "  messages:\n    - {role: robot, content: '{title}'}\n",
        ),
    ),
    Case(
        "message-template-bad",
        "job.yaml:9: prompt.messages[1].content: empty placeholder '{}'",
        edit(
            '  system: You summarise news items.\n  user: "Summarise {title}: {body}"\n',
            "  messages:\n    - {role: system, content: hi}\n    - {role: user, content: 'x {} y'}\n",
        ),
    ),
    Case(
        "message-template-unknown-column",
        "prompt.messages[0].content names column 'colour', which items.csv does not have",
        edit(
            '  system: You summarise news items.\n  user: "Summarise {title}: {body}"\n',
            "  messages:\n    - {role: user, content: '{colour}'}\n",
        ),
    ),
    Case(
        "messages-column-with-user",
        "job.yaml:4: input.messages_column: it holds each row's whole conversation; drop prompt.user",
        edit("  id_column: id\n", "  id_column: id\n  messages_column: body\n"),
    ),
    Case(
        "messages-column-missing",
        "input.messages_column names column 'chat', which items.csv does not have",
        edit("  id_column: id\n", "  id_column: id\n  messages_column: chat\n").replace(
            '  user: "Summarise {title}: {body}"\n', ""
        ),
    ),
    Case(
        "messages-column-not-json",
        "input.messages_column 'chat', row 2 of items.csv: not valid JSON",
        edit("  id_column: id\n", "  id_column: id\n  messages_column: chat\n").replace(
            '  user: "Summarise {title}: {body}"\n', ""
        ),
        files={
            "items.csv": b'id,title,chat\na1,Rain,"[{""role"": ""user"", ""content"": ""x""}]"\na2,Sun,[x\n'
        },
    ),
    Case(
        "messages-column-bad-role",
        "input.messages_column 'chat', row 1 of items.csv: message 1 has role 'robot'",
        edit("  id_column: id\n", "  id_column: id\n  messages_column: chat\n").replace(
            '  user: "Summarise {title}: {body}"\n', ""
        ),
        files={"items.csv": b'id,title,chat\na1,Rain,"[{""role"": ""robot"", ""content"": ""hi""}]"\n'},
    ),
    Case(
        "tools-not-a-list",
        "job.yaml:14: params.tools: tools takes a list of {type: function, function: {name, parameters}}",
        edit("  max_tokens: 64\n", "  max_tokens: 64\n  tools: record\n"),
    ),
    Case(
        "tool-without-name",
        "job.yaml:14: params.tools: tools[0].function needs a name",
        edit(
            "  max_tokens: 64\n",
            "  max_tokens: 64\n  tools: [{type: function, function: {parameters: {}}}]\n",
        ),
    ),
    Case(
        "field-type-unknown",
        "job.yaml:7: output.fields.mood",
        edit("  include_columns: [title]\n", "  include_columns: [title]\n  fields: {mood: text}\n"),
    ),
    Case(
        "field-enum-empty",
        "job.yaml:7: output.fields.mood",
        edit("  include_columns: [title]\n", "  include_columns: [title]\n  fields: {mood: {enum: []}}\n"),
    ),
    Case(
        "field-clashes-with-result-column",
        "output.fields: 'status' is also an output column",
        edit("  include_columns: [title]\n", "  include_columns: [title]\n  fields: {status: string}\n"),
    ),
]


def write_case(tmp_path: Path, case: Case) -> Path:
    job_path = tmp_path / "job.yaml"
    if case.job is not None:
        job_path.write_text(case.job, encoding="utf-8")
    for name, data in case.files.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    return job_path


def tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize(
    ("case", "command"),
    [pytest.param(case, command, id=f"{case.id}-{command}") for case in CASES for command in case.commands],
)
def test_bad_input_is_one_line_and_exit_2(
    case: Case, command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(UNSET_KEY_ENV, raising=False)
    job_path = write_case(tmp_path, case)
    before = tree(tmp_path)

    result = invoke(command, str(job_path))

    assert isinstance(result.exception, SystemExit), result.exception  # not a crash
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: ")
    assert case.expect in lines[0]
    assert lines[0].count("(got ") <= 1  # said once
    assert "Traceback" not in result.output
    assert result.stdout == ""
    assert tree(tmp_path) == before  # no output, no checkpoint: nothing was started


def test_base_job_is_valid(tmp_path: Path) -> None:
    """The control: every case above differs from a job that passes (its endpoint aside, which
    nothing answers: the model check is skipped)."""
    result = invoke("validate", "--no-check-model", str(write_case(tmp_path, Case("base", ""))))

    assert result.exit_code == 0, result.output
    assert result.stderr.startswith("ok: "), result.stderr
    assert '"content": "Summarise Rain: It rained all day."' in result.stdout


def test_case_ids_are_unique() -> None:
    ids = [case.id for case in CASES]
    assert len(ids) == len(set(ids))


def test_errors_name_only_the_first_of_several_problems(tmp_path: Path) -> None:
    job = edit("temperature: 0.2", "temperature: 3", edit("concurrency: 4", "concurrency: 0"))
    result = invoke("validate", str(write_case(tmp_path, Case("two", "", job))))

    assert result.exit_code == 2
    assert result.stderr.splitlines() == [
        f"Error: {tmp_path / 'job.yaml'}:12: params.temperature: "
        "Input should be less than or equal to 2 (got 3) (and 1 more problem)"
    ]


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    result = invoke("validate", "--debug", str(write_case(tmp_path, Case("dbg", "", JOB + "colour: blue\n"))))

    assert result.exit_code != 0
    assert type(result.exception).__name__ == "JobError"


def test_a_parquet_input_is_checked_from_its_metadata_as_a_csv_is_in_full(tmp_path: Path) -> None:
    """Nulls in a Parquet prompt column are found from its row groups' statistics, duplicate ids
    out of order by the full check (an ascending id column is unique without one)."""
    rows = {"id": [3, 1, 2, 5, 4, 6], "title": ["a", "b", "c", "d", None, "f"], "text": ["x"] * 6}
    cases = {
        "nulls": (rows, "column 'title' used by the prompt is empty in row(s) 5 of input.parquet"),
        "dupes": (
            {**rows, "id": [3, 1, 2, 5, 4, 1], "title": ["t"] * 6},
            "input.id_column 'id' has duplicate ids in input.parquet: 1",
        ),
        "ascending": ({**rows, "id": [1, 2, 3, 4, 5, 6], "title": ["t"] * 6}, None),
    }
    for name, (table, error) in cases.items():
        folder = tmp_path / name
        folder.mkdir()
        job = write_job(
            folder, [{"id": 1}], "http://127.0.0.1:9/v1", input={"path": "input.parquet", "id_column": "id"}
        )
        pl.DataFrame(table).write_parquet(folder / "input.parquet", row_group_size=2)

        result = invoke("validate", "--no-check-model", str(job))

        if error is None:
            assert result.exit_code == 0, result.output
        else:
            assert (result.exit_code, result.stderr.split(";")[0].strip()) == (2, f"Error: {error}"), (
                result.output
            )
