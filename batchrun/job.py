"""The job file: its schema, defaults, and errors that name the key and line at fault."""

from __future__ import annotations

import difflib
import ipaddress
import types
import typing
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, NamedTuple

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    PlainValidator,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails

from batchrun.errors import JobError
from batchrun.images import ImageSettings
from batchrun.prompts import PromptTemplates, compile_prompts
from batchrun.storage import WRITE_SCHEMES, Location, Url, location

# Chat-completions request keys we know by name: a `params` key close to one of these
# but not equal is almost surely a typo, so it is rejected instead of passed through.
KNOWN_PARAMS = (
    "temperature",
    "max_tokens",
    "max_completion_tokens",
    "top_p",
    "stop",
    "seed",
    "n",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "top_logprobs",
    "user",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "response_format",
    "reasoning_effort",
    "stream",
    "stream_options",
)
# Keys batchrun sets itself; a job may not override them through params.
RESERVED_PARAMS = {"model": "model", "messages": "prompt"}  # and the job key that sets each

BATCH_DISCOUNT = 0.5  # what a provider batch takes off, where the price table has no batch rate
PYTHON_JOB = Path("<python>")  # the job_path of a job built in Python, which has no file
TableFormat = Literal["csv", "parquet", "jsonl"]
TABLE_SUFFIXES: dict[str, TableFormat] = {
    ".csv": "csv",
    ".parquet": "parquet",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
}


def table_format(path: Location, given: TableFormat | None, key: str, format_key: str | None) -> TableFormat:
    """The format of the table at `path`: `given` (input.format / output.format), else its suffix.

    An unknown suffix is an error, not a guess: a table written in a format its name does not
    say is a surprise later. ValueError names `key` (the path's key) and what would do, including
    `format_key` (the key that can name the format) when there is one.
    """
    named = TABLE_SUFFIXES.get(path.suffix.lower())
    if given is not None and named not in (None, given):
        raise ValueError(f"{key}: {str(path)!r} is a {named} file by its name, but {format_key} is {given}")
    found = given or named
    if found is None:
        hint = f", or name the format with {format_key}: csv, parquet or jsonl" if format_key else ""
        raise ValueError(
            f"{key}: {str(path)!r} is not a table type batchrun knows; "
            f"use .csv, .parquet or .jsonl (or .ndjson){hint}"
        )
    return found


# input.path / output.path: a local path, or a URL kept as written (see storage.py).
TablePath = Annotated[Location, PlainValidator(location), PlainSerializer(str, return_type=str)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: TablePath  # a file, a glob of files, a folder of Parquet files, or a URL of one of these
    id_column: str | None = None  # without it, the 0-based row number is the id
    # A null in a prompt column: stop before sending (error), record the row `skipped` unsent
    # (skip), or render it as "" (empty).
    on_null: Literal["error", "skip", "empty"] = "error"
    messages_column: str | None = None  # a column holding each row's JSON list of chat messages
    format: TableFormat | None = None  # where path's suffix does not say it (e.g. data.csv.gz)


class EnumField(_Strict):
    enum: tuple[str, ...]


FIELD_TYPES = ("string", "integer", "number", "boolean", "list")
FieldType = Literal["string", "integer", "number", "boolean", "list"] | EnumField


def _field_type(value: Any) -> Any:
    """One clear message for a bad field type, instead of one per branch of the union."""
    if isinstance(value, str) and value in FIELD_TYPES:
        return value
    if isinstance(value, dict) and set(value) == {"enum"}:
        options = value["enum"]
        if isinstance(options, list) and options and all(isinstance(o, str) for o in options):
            return EnumField(enum=tuple(options))
        raise ValueError("enum takes a non-empty list of strings")
    raise ValueError(f"unknown type {value!r}; use {', '.join(FIELD_TYPES)}, or {{enum: [a, b, ...]}}")


class OutputSpec(_Strict):
    path: TablePath
    format: TableFormat | None = None  # where path's suffix does not say it
    include_columns: tuple[str, ...] = ()  # input columns copied next to each answer
    # Typed columns parsed from each answer (JSON content, or the first tool call's arguments).
    fields: dict[str, Annotated[FieldType, BeforeValidator(_field_type)]] = {}


class MessageTemplate(_Strict):
    role: Literal["system", "user", "assistant", "tool"]
    content: str  # a template, like prompt.user


class PromptSpec(_Strict):
    """Either `user` (with an optional `system`) or a whole `messages` list of templates."""

    system: str | None = None
    user: str | None = None  # `{column}` placeholders; `{{` and `}}` for literal braces
    messages: tuple[MessageTemplate, ...] | None = Field(default=None, min_length=1)
    # Columns holding images, sent after the text of the (last) user message, in this order.
    images: tuple[str, ...] | None = Field(default=None, min_length=1)

    @model_validator(mode="after")
    def _one_form(self) -> PromptSpec:
        if self.messages is not None and (self.user is not None or self.system is not None):
            raise ValueError("give either messages or system/user, not both")
        return self


class ImagesSpec(_Strict):
    """How the cells of prompt.images are read and sent."""

    detail: Literal["low", "high", "auto"] | None = None  # sent as image_url.detail; default: not sent
    max_side: int | None = Field(default=None, ge=1)  # resized (Pillow) so the longer side is at most this
    fetch: bool = False  # download http(s) URLs and send them inline, instead of the URL
    max_mb: float = Field(default=20.0, gt=0)  # an image larger than this, as sent, fails its row


class Params(BaseModel):
    """Request parameters; keys beyond the checked ones pass through to the request body."""

    model_config = ConfigDict(extra="allow", frozen=True)

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | tuple[str, ...] | None = None
    tools: tuple[dict[str, Any], ...] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(v, tuple) and not 1 <= len(v) <= 4:
            raise ValueError("stop takes a string or a list of 1 to 4 strings")
        return v

    @field_validator("tools", mode="before")
    @classmethod
    def _function_tools(cls, v: Any) -> Any:
        """OpenAI's function schema: [{type: function, function: {name, parameters?}}]."""
        if not isinstance(v, list) or not v:
            raise ValueError("tools takes a list of {type: function, function: {name, parameters}}")
        for i, tool in enumerate(v):
            function = tool.get("function") if isinstance(tool, dict) else None
            if not isinstance(function, dict) or tool.get("type", "function") != "function":
                raise ValueError(f"tools[{i}] must be {{type: function, function: {{name, parameters}}}}")
            if not isinstance(function.get("name"), str) or not function["name"]:
                raise ValueError(f"tools[{i}].function needs a name")
            if not isinstance(function.get("parameters", {}), dict):
                raise ValueError(f"tools[{i}].function.parameters must be a JSON schema object")
        return v

    def body(self) -> dict[str, Any]:
        """The keys to merge into the request body, unset ones left out."""
        body = self.model_dump(exclude_none=True, mode="json")
        if body.get("stream") and "stream_options" not in body:
            body["stream_options"] = {"include_usage": True}  # else a stream carries no usage
        return body


class EndpointSpec(_Strict):
    base_url: str = "https://relaydance.com/v1"
    api_key_env: str = "RELAYDANCE_API_KEY"
    timeout_s: float = Field(default=120.0, gt=0)
    allow_insecure_http: bool = False  # plain http:// beyond loopback sends the key in clear text
    check_model: bool = True  # false: skip GET /models, for gateways that serve models they do not list
    # An answer longer than this fails its row (response_too_large), read no further: memory stays bounded.
    max_response_mb: float = Field(default=32.0, gt=0)
    # Batch mode's protocol: OpenAI's (files), xAI's (batches added to), or whichever the endpoint answers in.
    batch_api: Literal["openai", "xai", "auto"] = "auto"

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or not urllib.parse.urlsplit(v).hostname:
            raise ValueError("base_url must start with http:// or https:// and name a host")
        return v.rstrip("/")

    @model_validator(mode="after")
    def _no_key_in_clear_text(self) -> EndpointSpec:
        url = urllib.parse.urlsplit(self.base_url)
        if url.scheme == "http" and not _is_loopback(url.hostname or "") and not self.allow_insecure_http:
            raise ValueError(
                "plain http:// to a host other than this machine would send the API key in clear "
                "text; use https://, or set endpoint.allow_insecure_http: true"
            )
        return self


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class RetrySpec(_Strict):
    max_attempts: int = Field(default=6, ge=1)
    max_parse_attempts: int = Field(default=3, ge=1)  # answers asked for while output.fields do not fit
    initial_backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)
    # How long one outage may last (no answer at all, or 502/503/504) before the job stops, exit 4.
    max_outage_s: float = Field(default=1800.0, gt=0)


class RateLimitSpec(_Strict):
    """The key's limits; requests are paced evenly over the minute to stay within them.

    Without either, batchrun finds the rate itself: it backs off on 429s (fewer requests in
    flight) and grows back while answers succeed.
    """

    requests_per_minute: int | None = Field(default=None, ge=1, strict=True)
    # Each request reserves its estimated prompt tokens plus max_tokens; usage settles the difference.
    tokens_per_minute: int | None = Field(default=None, ge=1, strict=True)


class PricingSpec(_Strict):
    """The job's own rates (USD per million tokens), or a discount off the list price; and what
    a provider batch takes off where the price table has no batch rate, and what an image is
    expected to cost, for estimates made before any row is answered."""

    input_per_million: float | None = Field(default=None, ge=0)
    output_per_million: float | None = Field(default=None, ge=0)
    cached_input_per_million: float | None = Field(default=None, ge=0)  # default: the input rate
    discount: float | None = Field(default=None, ge=0, lt=1)  # 0.3: 30% below list
    batch_discount: float = Field(default=BATCH_DISCOUNT, ge=0, lt=1)  # batch mode: 0.5, half price
    # USD per image as the provider publishes it; answers bill images as prompt tokens all the same
    per_image: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _rates_or_discount(self) -> PricingSpec:
        rates = (self.input_per_million, self.output_per_million, self.cached_input_per_million)
        if self.discount is not None and any(r is not None for r in rates):
            raise ValueError("give either rates or a discount off the list price, not both")
        extras_only = bool(self.model_fields_set) and self.model_fields_set <= {"batch_discount", "per_image"}
        if self.discount is None and not extras_only and None in rates[:2]:
            raise ValueError("give input_per_million and output_per_million, or a discount")
        return self


class BatchSpec(_Strict):
    """Batch mode (mode: batch): how batches are made and looked after."""

    poll_s: float = Field(default=60.0, gt=0)  # the longest wait between looks at live batches
    max_lines: int = Field(default=50_000, ge=1)  # lines per batch file (OpenAI's limit)
    max_mb: float = Field(default=200.0, gt=0)  # a batch file's size (OpenAI's limit)
    add_mb: float = Field(default=25.0, gt=0)  # what one call adds to a batch (xAI's limit)


class BudgetSpec(_Strict):
    max_cost_usd: float = Field(gt=0)  # the whole job's spending, resumed runs included


class JobSpec(_Strict):
    """A validated job; paths are absolute (resolved against the job file's folder)."""

    input: InputSpec
    output: OutputSpec
    model: str = Field(min_length=1)
    prompt: PromptSpec = PromptSpec()
    params: Params = Params()
    endpoint: EndpointSpec = EndpointSpec()
    concurrency: int = Field(default=16, ge=1, le=4096)
    retry: RetrySpec = RetrySpec()
    rate_limit: RateLimitSpec = RateLimitSpec()
    stall_warning_s: float = Field(default=300.0, gt=0)  # warn when no row finished for this long
    pricing: PricingSpec | None = None  # default: the model's list price (genai-prices)
    budget: BudgetSpec | None = None
    checkpoint: Path | None = None  # default: beside a local output; for a URL output, see plan.py
    dedupe: bool = False  # identical requests sent once; every row with one gets its answer
    images: ImagesSpec | None = None  # how prompt.images are read and sent
    mode: Literal["online", "batch"] = "online"  # batch: through the provider's Batch API
    batches: BatchSpec = BatchSpec()  # how batch mode makes and watches its batches
    job_path: Path = Path("job.yaml")  # set by load_job, not read from the file
    # Set by the Python API for a table in memory (its relative image paths are the caller's);
    # None: relative image paths are read from the folder that holds the input.
    image_folder: Path | None = None

    @model_validator(mode="after")
    def _known_table_formats(self) -> JobSpec:
        if self.input.path.suffix:  # else it may be a folder: sources.py checks it once it is found
            table_format(self.input.path, self.input.format, "input.path", "input.format")
        output = self.output.path
        if isinstance(output, Url) and output.scheme not in WRITE_SCHEMES:
            raise ValueError(
                f"output.path: polars cannot write {output.scheme}:// URLs; write to s3://, gs:// or "
                "az://, or to a local path"
            )
        table_format(self.output.path, self.output.format, "output.path", "output.format")
        return self

    @model_validator(mode="after")
    def _something_to_send(self) -> JobSpec:
        prompt, column = self.prompt, self.input.messages_column
        if column is None and prompt.user is None and prompt.messages is None:
            raise ValueError(
                "prompt: nothing to send; give prompt.user, prompt.messages or input.messages_column"
            )
        if column is not None and (prompt.user is not None or prompt.messages is not None):
            raise ValueError(
                "input.messages_column: it holds each row's whole conversation; drop prompt.user and "
                "prompt.messages (prompt.system may stay, it is sent first)"
            )
        return self

    @model_validator(mode="after")
    def _images_in_a_user_message(self) -> JobSpec:
        prompt = self.prompt
        if prompt.images is None:
            return self
        if self.input.messages_column is not None:
            raise ValueError(
                "prompt.images: the images go in the job's user message; input.messages_column "
                "holds each row's whole conversation, as text"
            )
        if prompt.messages is not None and not any(m.role == "user" for m in prompt.messages):
            raise ValueError("prompt.images: prompt.messages has no user message to hold the images")
        return self

    def prompt_templates(self) -> PromptTemplates:
        messages = [(m.role, m.content) for m in self.prompt.messages or ()]
        images = self.image_settings() if self.prompt.images else None
        return compile_prompts(
            self.prompt.system, self.prompt.user, messages, self.input.messages_column, images
        )

    def image_settings(self) -> ImageSettings:
        given = self.images or ImagesSpec()
        return ImageSettings(
            self.prompt.images or (),
            self.image_folder or input_folder(self.input.path),
            given.detail,
            given.max_side,
            given.fetch,
            given.max_mb,
        )


HIDDEN_KEYS = ("job_path", "image_folder")  # set by batchrun, refused in a job file


def input_folder(path: Location) -> Location:
    """The folder that holds the input (a file, a glob, a folder): relative image paths start there."""
    if isinstance(path, Url):
        return Url(path.text[: path.text.rstrip("/").rfind("/") + 1])
    return path.parent


def load_job(path: Path | str) -> JobSpec:
    """Read, validate and resolve a job file, or raise JobError naming the key and line."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JobError("job file not found", path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise JobError(f"cannot read job file ({exc})", path) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or "not valid YAML"
        raise JobError(f"invalid YAML: {problem}", path, mark.line + 1 if mark else None) from None
    if not isinstance(data, dict):
        raise JobError("a job file must be a YAML mapping (input:, output:, model:, prompt:)", path)
    return _validated(data, text, path, path.parent.resolve())


def job_from_mapping(data: Mapping[str, Any], folder: Path) -> JobSpec:
    """A job given as a mapping of job-file keys (the Python API), relative paths resolved
    against `folder`: the same checks as a job file's, so it is refused exactly alike; its
    errors name the key, and "<python>" for the file, as Python names code with no file."""
    return _validated(dict(data), "", PYTHON_JOB, folder.resolve())


def _validated(data: dict[str, Any], text: str, path: Path, base: Path) -> JobSpec:
    for hidden in HIDDEN_KEYS:
        if hidden in data:
            raise JobError(f"unknown key '{hidden}'", path, _line_of(text, (hidden,)))
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _job_error(exc, text, path) from None
    _check_param_typos(spec.params, text, path)
    _check_templates(spec, text, path)
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": _resolved(spec.input.path, base)}),
            "output": spec.output.model_copy(update={"path": _resolved(spec.output.path, base)}),
            "checkpoint": spec.checkpoint and base / spec.checkpoint,
            "job_path": path if path == PYTHON_JOB else path.resolve(),
        }
    )


def _resolved(path: Location, base: Path) -> Location:
    return base / path if isinstance(path, Path) else path


def _check_templates(spec: JobSpec, text: str, path: Path) -> None:
    """A template that cannot be parsed is the job file's fault: name its file and line."""
    try:
        spec.prompt_templates()
    except JobError as exc:
        key = str(exc).split(":", 1)[0].removeprefix("prompt.").split("[", 1)[0]
        raise JobError(exc.message, path, _line_of(text, ("prompt", key)), key=f"prompt.{key}") from None


def _check_param_typos(params: Params, text: str, path: Path) -> None:
    for key in params.model_extra or {}:
        if key in RESERVED_PARAMS:
            raise JobError(
                f"params.{key} is set by batchrun; use the job's `{RESERVED_PARAMS[key]}` key instead",
                path,
                _line_of(text, ("params", key)),
                key=f"params.{key}",
            )
        if key in KNOWN_PARAMS:
            continue
        close = difflib.get_close_matches(key, KNOWN_PARAMS, n=1, cutoff=0.8)
        if close:
            raise JobError(
                f"unknown key '{key}' in params; did you mean '{close[0]}'?",
                path,
                _line_of(text, ("params", key)),
                key=f"params.{key}",
            )


Key = str | int  # a mapping key, or a list index


class _Problem(NamedTuple):
    keys: tuple[Key, ...]  # the job keys at fault, outermost first
    message: str
    kind: str  # pydantic's error type
    meant: tuple[Key, ...] | None = None  # for an unknown key: the key it was probably meant to be


def _job_error(exc: ValidationError, text: str, path: Path) -> JobError:
    """Turn pydantic's first complaint into one line a person can act on."""
    errors = exc.errors()
    missing = {_walk(err["loc"])[0] for err in errors if err["type"] == "missing"}
    problems = [_problem(err, missing) for err in errors]
    # A misspelt required key is also reported missing: count it once, as the typo, and
    # report unknown keys first since they usually explain what else went wrong.
    meant = {p.meant for p in problems if p.meant}
    problems = [p for p in problems if not (p.kind == "missing" and p.keys in meant)]
    # A list whose item is wrong is also reported too short: keep only the innermost complaint.
    problems = [
        p
        for p in problems
        if not any(len(q.keys) > len(p.keys) and q.keys[: len(p.keys)] == p.keys for q in problems)
    ]
    problems.sort(key=lambda p: p.kind != "extra_forbidden")
    # Each branch of a union (e.g. `stop`) reports the same key: one problem, not several.
    unique: dict[tuple[Key, ...], _Problem] = {}
    for problem in problems:
        unique.setdefault(problem.keys, problem)
    first, more = next(iter(unique.values())), len(unique) - 1
    suffix = f" (and {more} more problem{'s' if more > 1 else ''})" if more else ""
    return JobError(first.message + suffix, path, _line_of(text, first.keys), key=_dotted(first.keys))


def _inside(inner: tuple[Key, ...], outer: tuple[Key, ...]) -> bool:
    return len(inner) > len(outer) and inner[: len(outer)] == outer


def _problem(err: ErrorDetails, missing: set[tuple[Key, ...]]) -> _Problem:
    """One complaint in words; an unknown key is matched first with a required key that is
    `missing` (`modle` means the missing `model`, not `mode`)."""
    loc = err["loc"]
    if err["type"] in ("extra_forbidden", "invalid_key"):
        scope, model = _walk(loc[:-1])
        key = loc[-1]
        where = f" in {_dotted(scope)}" if scope else ""
        keys = (*scope, str(key))
        if err["type"] == "invalid_key":
            return _Problem(keys, f"key {key!r}{where} is not a string", err["type"])
        allowed = [k for k in model.model_fields if k not in HIDDEN_KEYS] if model else []
        close = difflib.get_close_matches(str(key), allowed, n=3, cutoff=0.6)
        close = [c for c in close if (*scope, c) in missing] or close
        hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(allowed)}"
        meant = (*scope, close[0]) if close else None
        return _Problem(keys, f"unknown key '{key}'{where}{hint}", err["type"], meant)
    keys, _ = _walk(loc)
    reason = str(err["msg"]).removeprefix("Value error, ")
    if not keys:  # a check across keys: its message starts with the key at fault
        return _Problem(tuple(reason.split(":", 1)[0].split(".")), reason, err["type"])
    if err["type"] == "missing":
        where = f" in {_dotted(keys[:-1])}" if keys[:-1] else ""
        return _Problem(keys, f"missing required key '{keys[-1]}'{where}", err["type"])
    got = err.get("input")
    got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
    return _Problem(keys, f"{_dotted(keys)}: {reason}{got_text}", err["type"])


def _walk(loc: tuple[Key, ...]) -> tuple[tuple[Key, ...], type[BaseModel] | None]:
    """The job keys in a pydantic location (list indexes and mapping keys kept, union branch
    tags dropped), and the section model at its end, if it ends on one."""
    keys: list[Key] = []
    kind = "model"
    model: type[BaseModel] | None = JobSpec
    for part in loc:
        if kind == "model" and isinstance(part, str) and model is not None and part in model.model_fields:
            kind, model = _shape(model.model_fields[part].annotation)
        elif not ((kind == "list" and isinstance(part, int)) or (kind == "dict" and isinstance(part, str))):
            break
        else:
            kind = "model" if model is not None else "value"
        keys.append(part)
    return tuple(keys), model if kind == "model" else None


def _shape(annotation: Any) -> tuple[str, type[BaseModel] | None]:
    """What a field holds: a section (model), a list or mapping (of models?), or a plain value."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1:
        annotation, args = args[0], list(typing.get_args(args[0]))
    origin = typing.get_origin(annotation)
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "model", annotation
    if origin in (tuple, list, dict):
        item = args[-1] if args and args[-1] is not Ellipsis else args[0] if args else None
        held = item if isinstance(item, type) and issubclass(item, BaseModel) else None
        return ("dict" if origin is dict else "list"), held
    return "value", None


def _dotted(keys: tuple[Key, ...]) -> str:
    return "".join(f"[{k}]" if isinstance(k, int) else f".{k}" for k in keys).lstrip(".")


def key_line(path: Path, keys: tuple[Key, ...]) -> int | None:
    """The line of a key in a job file already loaded, for errors found after loading."""
    try:
        return _line_of(path.read_text(encoding="utf-8"), keys)
    except OSError:
        return None


def _line_of(text: str, keys: tuple[Key, ...]) -> int | None:
    """The 1-based line of the deepest key of `keys` that exists in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
        if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
            line = node.start_mark.line + 1
            continue
        if not isinstance(node, yaml.MappingNode):
            break
        for key_node, value_node in node.value:
            if key_node.value == key:
                line = key_node.start_mark.line + 1
                node = value_node
                break
        else:
            break
    return line


def without_model_check(spec: JobSpec) -> JobSpec:
    """The job with endpoint.check_model off (`check_model=False`, the CLI's --no-check-model)."""
    return spec.model_copy(update={"endpoint": spec.endpoint.model_copy(update={"check_model": False})})
