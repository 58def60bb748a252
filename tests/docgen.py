"""The generated parts of docs/: run by cog (`cog -r docs/*.md`), checked by tests/test_docs.py.

- `job_keys()`: every key of the job file, walked from the pydantic models of batchrun/job.py
  (type, default and bounds come from the schema; what a key does from `MEANING` below);
- `output_columns()`: the output table's columns, from batchrun/results.py's `COLUMNS`;
- `cli_reference()`: the commands' `--help`, as click prints it.

A key in the schema without a line in `MEANING`, or a line for a key the schema lacks, raises, so
`cog --check` (and the test running it) fails until both agree.
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import annotated_types
from pydantic import BaseModel
from pydantic_core import PydanticUndefined

# What each job key does, for users. Keys as dotted paths; `[]` is an item of a list, `NAME` a
# key the user chooses, `*` any other key.
MEANING = {
    "input": "Where the rows come from.",
    "input.path": "A `.csv`, `.parquet` or `.jsonl` / `.ndjson` file, a glob of them "
    "(`data/part-*.parquet`), a folder of `.parquet` files, or an `s3://`, `gs://`, `az://` or `hf://` "
    "URL of one of these. Relative to the job file.",
    "input.id_column": "The column that names each row in the output; without it, the 0-based row "
    "number is the id.",
    "input.on_null": "A null in a column the prompt uses: `error` stops before sending and names the "
    'rows, `skip` records the row `skipped` without sending it, `empty` renders it as `""`.',
    "input.messages_column": "A column holding each row's whole conversation, a list of `{role, "
    "content}` (JSON text in CSV). Replaces `prompt.user` and `prompt.messages`.",
    "input.format": "`csv`, `parquet` or `jsonl`, where the path's suffix does not say it "
    "(`articles.csv.gz`).",
    "output": "Where the output table goes.",
    "output.path": "A `.parquet`, `.csv` or `.jsonl` file, or an `s3://`, `gs://` or `az://` URL. "
    "The checkpoint and reports go beside a local path.",
    "output.format": "As `input.format`, where the suffix does not say it.",
    "output.include_columns": "Input columns copied into the output beside each answer.",
    "output.fields": "Typed columns read from each answer (JSON in the content, or the first tool "
    "call's arguments); an answer that does not fit is asked for again.",
    "output.fields.NAME": "The column's type: `string`, `integer`, `number`, `boolean`, `list` (of "
    "strings), or `{enum: [a, b, ...]}`.",
    "model": "The model name sent with every request; checked against the endpoint's `GET /models` "
    "before anything is sent.",
    "prompt": "The messages sent for each row: `system` and `user`, or `messages`.",
    "prompt.system": "The system message (a template, like `user`).",
    "prompt.user": "The user message: `{column}` is replaced by the row's value; `{{` and `}}` are "
    "literal braces.",
    "prompt.messages": "A whole conversation of templates (few-shot), instead of `system` / `user`.",
    "prompt.messages[].role": "`system`, `user`, `assistant` or `tool`.",
    "prompt.messages[].content": "A template, like `prompt.user`.",
    "prompt.images": "Columns holding images, sent after the text of the user message (with "
    "`messages`, the last user message), in this order. A cell holds a path (relative to the "
    "input's folder), an `http(s)://` URL, an `s3://`, `gs://` or `az://` URL, image bytes, or a "
    "list of these; a null follows `input.on_null` (`empty`: no image). See `images`.",
    "params": "Merged into each request body; a key close to a known parameter's name is refused as a "
    "typo, and `model` and `messages` cannot be set here.",
    "params.temperature": "Sampling temperature.",
    "params.max_tokens": "The longest answer; also what the budget and token pacing reserve.",
    "params.top_p": "Nucleus sampling.",
    "params.stop": "A string, or 1 to 4 strings, that end the answer.",
    "params.tools": "OpenAI function tools: `[{type: function, function: {name, description, "
    "parameters}}]`. With `output.fields`, the fields are read from the first tool call.",
    "params.*": "Any other key (`seed`, `stream`, `tool_choice`, `response_format`, ...) passes "
    "through unchanged. `stream: true` adds `stream_options.include_usage`.",
    "endpoint": "The OpenAI-compatible server.",
    "endpoint.base_url": "Its URL, up to `/v1`.",
    "endpoint.api_key_env": "The environment variable that holds the key.",
    "endpoint.timeout_s": "Seconds per request.",
    "endpoint.allow_insecure_http": "Allow plain `http://` to a host other than this machine (the "
    "key would travel in clear text).",
    "endpoint.check_model": "`false` skips the `GET /models` check, for a gateway that serves models "
    "its list does not name.",
    "endpoint.max_response_mb": "A longer answer fails its row (`response_too_large`), read no further.",
    "endpoint.batch_api": "The Batch API batch mode speaks: `openai` (files of requests), `xai` "
    "(batches added to), or `auto`, whichever the endpoint answers `GET /batches` in (see "
    "[batch mode](batch-mode.md)).",
    "concurrency": "Requests in flight at most (on Ray: across the whole cluster).",
    "retry": "How failed requests are tried again.",
    "retry.max_attempts": "Requests per row at most.",
    "retry.max_parse_attempts": "Answers asked for per row while `output.fields` do not fit.",
    "retry.initial_backoff_s": "The first backoff; it doubles, with full jitter.",
    "retry.max_backoff_s": "The longest backoff; also caps a server's `Retry-After`.",
    "retry.max_outage_s": "An outage (no answer at all, or 502/503/504) this long stops the job with exit 4.",
    "rate_limit": "Your key's limits; without them batchrun adapts to 429s.",
    "rate_limit.requests_per_minute": "Requests paced evenly over the minute, with no bursts.",
    "rate_limit.tokens_per_minute": "Each request reserves its estimated prompt tokens plus "
    "`max_tokens`; the usage settles the difference.",
    "stall_warning_s": "Warn when no row has finished for this long.",
    "pricing": "Your prices, instead of the model's list price (from the `genai-prices` package).",
    "pricing.input_per_million": "USD per million prompt tokens.",
    "pricing.output_per_million": "USD per million completion tokens (reasoning included).",
    "pricing.cached_input_per_million": "USD per million cached prompt tokens; default: the input rate.",
    "pricing.discount": "A fraction off every list rate (`0.3`: 30% off); instead of the rates.",
    "pricing.batch_discount": "In batch mode, the fraction off where the price table has no batch "
    "rate for the model (and off the job's own rates).",
    "pricing.per_image": "USD one image of `prompt.images` costs, as the provider publishes it: "
    "`estimate` counts it for each image before rows are answered (after, images are measured as "
    "the prompt tokens they are billed as). With it alone, tokens keep the list price.",
    "budget": "A spending limit.",
    "budget.max_cost_usd": "The whole job's spending at most, earlier runs included (exit 3 when reached).",
    "checkpoint": "Where the checkpoint lives; default: `OUTPUT.checkpoint.sqlite` beside a local "
    "output, `.batchrun/` beside the job file for a URL output.",
    "dedupe": "Send identical requests once; every row with one gets its answer (`reused_from`).",
    "images": "How the images of `prompt.images` are read and sent. Files, bytes and object-store "
    "images go inline as `data:` URLs (PNG, JPEG, WebP or GIF, told by their bytes); an image that "
    "cannot be sent fails its row (`input_error`).",
    "images.detail": "`low`, `high` or `auto`, sent as `image_url.detail`; not sent by default.",
    "images.max_side": "Resize each image so that its longer side is at most this many pixels "
    "(needs `pip install 'batchrun[images]'`); by default images are sent as they are.",
    "images.fetch": "Download `http(s)://` images and send them inline, instead of their URL.",
    "images.max_mb": "An image larger than this, as sent (after `max_side`), fails its row unsent; "
    "a URL sent as it is is not measured.",
    "mode": "`online` sends each row as a chat request; `batch` sends the rows through the provider's "
    "Batch API, as `--batch` does (see [batch mode](batch-mode.md)).",
    "batches": "How batch mode makes its batches and looks after them.",
    "batches.poll_s": "The longest wait between looks at the live batches (the first look comes after 1 s, "
    "then the wait doubles).",
    "batches.max_lines": "Rows per batch at most; more rows make more batches.",
    "batches.max_mb": "A batch file's size at most, in MB.",
    "batches.add_mb": "What one call adds to a batch at most, in MB (xAI's protocol: a batch is added "
    "to in parts).",
}

HIDDEN = {"job_path", "image_folder"}  # set by batchrun, refused in a job file


def _unwrap(annotation: Any) -> tuple[Any, bool]:
    """The annotation without `| None`, and whether None was allowed."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and type(None) in args:
        rest = [a for a in args if a is not type(None)]
        return (rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]), True  # noqa: UP007
    return annotation, False


def _model(annotation: Any) -> type[BaseModel] | None:
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _type_name(annotation: Any) -> str:
    annotation, _ = _unwrap(annotation)
    origin, args = typing.get_origin(annotation), typing.get_args(annotation)
    if origin is typing.Annotated:
        return "path or URL" if args[0].__name__ == "Location" else _type_name(args[0])
    if origin is Literal:
        return " \\| ".join(f"`{a}`" for a in args)
    if origin in (typing.Union, types.UnionType):
        if {getattr(a, "__name__", "") for a in args} == {"Path", "Url"}:
            return "path or URL"  # storage.Location
        return " or ".join(_type_name(a) for a in args)
    if origin is tuple:
        return f"list of {_type_name(args[0])}s" if _model(args[0]) is None else "list"
    if origin is dict:
        return "mapping"
    if _model(annotation) is not None:
        return "section"
    names = {str: "string", int: "integer", float: "number", bool: "boolean", Path: "path"}
    if annotation in names:
        return names[annotation]
    if getattr(annotation, "__name__", "") == "Location":
        return "path or URL"
    raise ValueError(f"no name for the type {annotation!r}")


def _bounds(metadata: list[Any]) -> str:
    found = []
    for item in metadata:
        for kind, attribute, sign in (
            (annotated_types.Ge, "ge", ">="),
            (annotated_types.Gt, "gt", ">"),
            (annotated_types.Le, "le", "<="),
            (annotated_types.Lt, "lt", "<"),
        ):
            if isinstance(item, kind):
                found.append(f"{sign} {getattr(item, attribute)}")
    return ", ".join(found)


def _default(field: Any, optional: bool) -> str:
    if field.is_required():
        return "required"
    default = field.default
    if default is PydanticUndefined or default is None or default == () or default == {}:
        return "-" if optional or default is None else "empty"
    if isinstance(default, BaseModel):
        return "-"
    if isinstance(default, bool):
        return f"`{str(default).lower()}`"
    if isinstance(default, float) and default.is_integer():
        return f"`{int(default)}`"
    return f"`{default}`"


def _rows(model: type[BaseModel], prefix: str) -> Iterator[tuple[str, str, str]]:
    """(key, type with bounds, default) for each key under `model`, sections before their keys."""
    for name, field in model.model_fields.items():
        if name in HIDDEN:
            continue
        key = f"{prefix}{name}"
        annotation, optional = _unwrap(field.annotation)
        bounds = _bounds(field.metadata)
        type_text = _type_name(annotation) + (f" ({bounds})" if bounds else "")
        yield key, type_text, _default(field, optional)
        inner = _model(annotation)
        if inner is not None:
            yield from _rows(inner, f"{key}.")
            if inner.model_config.get("extra") == "allow":
                yield f"{key}.*", "any", "-"
        elif typing.get_origin(annotation) is tuple and _model(typing.get_args(annotation)[0]):
            yield from _rows(typing.get_args(annotation)[0], f"{key}[].")
        elif typing.get_origin(annotation) is dict:
            yield f"{key}.NAME", "field type", "-"


def job_keys() -> str:
    """The job file's keys as a Markdown table; raises when MEANING and the schema disagree."""
    from batchrun.job import JobSpec

    rows = list(_rows(JobSpec, ""))
    keys = [key for key, _, _ in rows]
    missing, stale = set(keys) - set(MEANING), set(MEANING) - set(keys)
    if missing or stale:
        raise ValueError(
            f"tests/docgen.py MEANING: describe {sorted(missing)}; drop {sorted(stale)} (not in job.py)"
        )
    lines = ["| key | type | default | what it does |", "|---|---|---|---|"]
    lines += [f"| `{key}` | {kind} | {default} | {MEANING[key]} |" for key, kind, default in rows]
    return "\n".join(lines)


def job_key_paths() -> set[str]:
    """Every dotted key of the job file (`params.*`, `output.fields.NAME` as written in MEANING)."""
    from batchrun.job import JobSpec

    return {key for key, _, _ in _rows(JobSpec, "")}


def output_columns() -> str:
    """The output table's columns as a Markdown table, from results.COLUMNS."""
    from batchrun.results import COLUMNS

    lines = [
        "| column | type | what it holds |",
        "|---|---|---|",
        "| `id` | as the input's `id_column`, else integer | the row's id: `input.id_column`, or its "
        "0-based row number |",
        "| *`include_columns`* | as in the input | the input columns `output.include_columns` names |",
        "| *`output.fields`* | as declared | one typed column per field (a `list` is JSON text in CSV) |",
    ]
    for column in COLUMNS:
        if column.in_output:
            lines.append(f"| `{column.name}` | {_dtype(column.polars)} | {column.meaning} |")
    return "\n".join(lines)


def _dtype(dtype: Any) -> str:
    return {"String": "string", "Int64": "integer", "Float64": "float"}.get(str(dtype), str(dtype))


def cli_reference() -> str:
    """Each command's `--help`, as a section with its usage and help text."""
    import click

    from batchrun.cli import main

    def context(command: click.Command, name: str, parent: click.Context | None = None) -> click.Context:
        return click.Context(command, info_name=name, parent=parent, terminal_width=100)

    top = context(main, "batchrun")
    out = ["| command | what it does |", "|---|---|"]
    for name, command in main.commands.items():
        usage = " ".join(command.collect_usage_pieces(context(command, name, top))).replace("|", "\\|")
        default = " (or `batchrun JOB`)" if name == main.default_cmd_name else ""
        short = command.get_short_help_str(limit=200).replace("|", "\\|")
        out.append(f"| [`batchrun {name} {usage}`](#batchrun-{name}){default} | {short} |")
    out.append("")
    for name, command in [("", main), *main.commands.items()]:
        ctx = context(command, name, top) if name else top
        out.append(f"## batchrun {name}".rstrip() + "\n")
        out.append(f"```text\n{command.get_help(ctx)}\n```\n")
    return "\n".join(out).rstrip()


# --- The Python API's keywords: batchrun/api.py's run, Job.define and Job.run (and arun and
# Job.arun, which take run's and Job.run's) take every job key and every run option as a named,
# typed keyword; cog writes their signatures and docstrings from the schema, RunOptions and the
# meanings here (`python -m cogapp -r batchrun/api.py`).

# Keywords of the Python API that are no job key nor RunOptions field: (type, default, meaning).
PYTHON_KEYWORDS = {
    "folder": ("PathLike", '"."', "What relative paths (input, output, checkpoint) are relative to."),
    "workers": ("int | None", "None", "With `ray`: worker actors, sharing the job's concurrency."),
    "return_type": (
        "ReturnType | None",
        "None",
        'The kind of table returned, `"polars"`, `"pandas"` or `"pyarrow"`, in place of the kind given.',
    ),
    "check_model": (
        "bool",
        "True",
        "`False` skips the `GET /models` check, as `endpoint.check_model: false`.",
    ),
}
# What each run option does (RunOptions' fields, the options of `batchrun run`).
OPTION_MEANING = {
    "simulate": "Send to the built-in simulator instead of the endpoint (`--simulate`).",
    "simulate_latency_ms": "With `simulate`: each answer's delay.",
    "fresh": "Drop the checkpoint's answers and send every row again.",
    "retry_failed": "Send only the rows recorded as failed again.",
    "limit": "Only the first N rows (a pilot).",
    "concurrency": "Requests in flight at most, in place of the job's `concurrency`.",
    "output": "An output path or URL in place of the job's `output.path`.",
    "quiet": "No progress and no notes; warnings still show.",
    "grace_s": "After an interrupt, how long the requests in flight may finish.",
    "max_cost_usd": "The whole job's spending at most, in place of `budget.max_cost_usd`.",
    "rows": "Only these rows (0-based), e.g. a random pilot.",
    "checkpoint": "Where the checkpoint lives.",
    "yes": "Send finished rows again when the job changed since its last run (else `JobChanged`).",
    "ray": 'Run on Ray: `True` (a local Ray), `"HOST:PORT"`, or `RayOptions`.',
    "http_client": "Your own `httpx2.AsyncClient` (for `run`: one not yet used on another event loop).",
    "batch": "Send the rows through the provider's Batch API (`--batch`): `True`, or "
    "`BatchOptions(wait=False)`.",
}
OPTION_TYPES = {
    "ray": "RayOptions | bool | str | None",
    "batch": "BatchOptions | bool",
}  # wider than RunOptions': api.py makes one
# Job keys that the Python API takes in more forms than a job file, and what they mean there.
KEY_FORMS = {
    "output": (
        "Mapping[str, Any] | PathLike | None",
        "Where the output table goes: a path or URL, or `{path, format, include_columns, fields}`.",
    ),
    "prompt": (
        "Mapping[str, Any] | str | None",
        'The user template alone (`"Summarize: {text}"`), or `{system, user}` or `{messages}`.',
    ),
    "checkpoint": (
        "PathLike | None",
        "Where the checkpoint lives (default: beside `output`, else in a temporary folder).",
    ),
}
DATA = "The rows: a path or URL, a polars DataFrame or LazyFrame, a pandas DataFrame or pyarrow Table."
# What each function is, before its keywords; its return type.
PYTHON_FUNCTIONS = {
    "run": (
        "Any",
        "Run (or resume) a job over `data`; the rows given, in their order, with the result columns "
        "beside them (as `with_columns` puts them), as the kind of table given. A job key left out "
        "takes its default.",
    ),
    "Job.define": (
        "Job",
        "A job from job-file keys given as arguments, checked as a job file is; a job key left out "
        "(None) takes the job file's default.",
    ),
    "Job.run": (
        "RunResult",
        "Run (or resume) the job; the figures, with the output table as `.table`. Job-wide errors "
        "raise BatchrunError (JobError, EndpointUnavailable...), whose `remedy` names the option "
        "that gets past it, if one does; a job changed since its last run so that finished rows "
        "would be sent again raises JobChanged (with .rows and .cost_usd) unless yes=True.",
    ),
}


def _python_type(annotation: Any) -> str:
    """A job key's type in a Python signature: a section is a mapping of its keys."""
    annotation, _ = _unwrap(annotation)
    if _model(annotation) is not None:
        return "Mapping[str, Any] | None"
    if typing.get_origin(annotation) is Literal:
        return f"Literal[{', '.join(json.dumps(a) for a in typing.get_args(annotation))}] | None"
    names = {str: "str", int: "int", float: "float", bool: "bool"}
    return f"{names[annotation]} | None"


def _job_keywords() -> Iterator[tuple[str, str, str, str]]:
    """(name, type, default, meaning) for each job key: the top-level keys of the schema."""
    from batchrun.job import JobSpec

    for name, field in JobSpec.model_fields.items():
        if name in HIDDEN:
            continue
        if name in KEY_FORMS:
            yield name, *KEY_FORMS[name][:1], "None", KEY_FORMS[name][1]
            continue
        meaning = MEANING[name].split("; ")[0].removesuffix(".") + "."  # the rest is in job-file.md
        inner, default = _model(_unwrap(field.annotation)[0]), _default(field, optional=True)
        if inner is not None:
            meaning += f" Keys: {', '.join(inner.model_fields)}."
        elif default == "required":
            meaning += " Required."
        elif default != "-":
            meaning += f" Default: {default}."
        yield name, _python_type(field.annotation), "None", meaning


def _option_keywords() -> Iterator[tuple[str, str, str, str]]:
    """(name, type, default, meaning) for each run option: RunOptions' fields, then PYTHON_KEYWORDS'."""
    import dataclasses

    from batchrun.runner import RunOptions

    fields = {f.name: f for f in dataclasses.fields(RunOptions)}
    if set(fields) != set(OPTION_MEANING):
        raise ValueError(
            f"tests/docgen.py OPTION_MEANING: describe {sorted(set(fields) - set(OPTION_MEANING))}; "
            f"drop {sorted(set(OPTION_MEANING) - set(fields))} (not in RunOptions)"
        )
    for name, field in fields.items():
        yield name, OPTION_TYPES.get(name, str(field.type)), repr(field.default), OPTION_MEANING[name]
    for name in ("workers", "check_model"):
        yield name, *PYTHON_KEYWORDS[name]


def python_keywords(function: str) -> list[tuple[str, str, str, str]]:
    """The keywords of an API function (a key of PYTHON_FUNCTIONS): (name, type, default, meaning)."""
    folder = ("folder", *PYTHON_KEYWORDS["folder"])
    options = [o for o in _option_keywords() if o[0] != "checkpoint"]  # the Job's own
    if function == "Job.run":
        return options
    keys = [*_job_keywords(), folder]
    if function == "Job.define":
        return keys
    returned = ("return_type", *PYTHON_KEYWORDS["return_type"])
    return [*keys, *(o for o in options if o[0] not in {k[0] for k in keys}), returned]  # a job key as such


def python_api(function: str) -> None:
    """Print (to cog) the signature and docstring of an API function, indented as a method's when
    it is one; the body follows the generated block."""
    import textwrap

    import cog

    returns, intro = PYTHON_FUNCTIONS[function]
    method = function.startswith("Job.")
    name = function.removeprefix("Job.")
    first = {"Job.define": ["cls", "data: Any = None"], "Job.run": ["self"]}
    first_params = first.get(function, ["data: Any = None", "/"])
    params = [
        *first_params,
        "*",
        *(f"{n}: {kind} = {default}" for n, kind, default, _ in python_keywords(function)),
    ]
    lines = ["@classmethod"] if name == "define" else []
    lines += ["@_raised_here"]  # a mistake shows as one line from the call
    lines += [f"def {name}(", *(f"    {p}," for p in params), f") -> {returns}:"]
    width = 110 - (8 if method else 4)  # ruff's line length, less the docstring's indent
    doc = textwrap.wrap(intro, width, initial_indent='"""')
    args = [("data", DATA)] if "data: Any = None" in first_params else []
    args += [(n, meaning) for n, _, _, meaning in python_keywords(function)]
    doc += ["", "Args:"]
    for arg, meaning in args:
        doc += textwrap.wrap(f"{arg}: {meaning}", width, initial_indent="    ", subsequent_indent="        ")
    doc += ['"""']
    lines += [f"    {line}" if line else "" for line in doc]
    cog.outl("\n".join(lines))
