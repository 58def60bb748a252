"""The job file: its schema, defaults, and errors that name the key and line at fault."""

from __future__ import annotations

import difflib
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from batchrun.errors import JobError

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
RESERVED_PARAMS = ("model", "messages")

SUPPORTED_TABLES = (".csv", ".parquet", ".jsonl", ".ndjson")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InputSpec(_Strict):
    path: Path
    id_column: str | None = None  # without it, the 0-based row number is the id


class OutputSpec(_Strict):
    path: Path
    include_columns: tuple[str, ...] = ()  # input columns copied next to each answer


class PromptSpec(_Strict):
    system: str | None = None
    user: str  # `{column}` placeholders; `{{` and `}}` for literal braces


class Params(BaseModel):
    """Request parameters; keys beyond the checked ones pass through to the request body."""

    model_config = ConfigDict(extra="allow", frozen=True)

    temperature: float | None = Field(default=None, ge=0, le=2)
    max_tokens: int | None = Field(default=None, ge=1)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | tuple[str, ...] | None = None

    @field_validator("stop")
    @classmethod
    def _at_most_four(cls, v: str | tuple[str, ...] | None) -> str | tuple[str, ...] | None:
        if isinstance(v, tuple) and not 1 <= len(v) <= 4:
            raise ValueError("stop takes a string or a list of 1 to 4 strings")
        return v

    def body(self) -> dict[str, Any]:
        """The keys to merge into the request body, unset ones left out."""
        return self.model_dump(exclude_none=True, mode="json")


class EndpointSpec(_Strict):
    base_url: str = "https://relaydance.com/v1"
    api_key_env: str = "RELAYDANCE_API_KEY"
    timeout_s: float = Field(default=120.0, gt=0)

    @field_validator("base_url")
    @classmethod
    def _http_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")) or len(v.split("://", 1)[1]) == 0:
            raise ValueError(f"base_url must start with http:// or https:// (got {v!r})")
        return v.rstrip("/")


class RetrySpec(_Strict):
    max_attempts: int = Field(default=6, ge=1)
    initial_backoff_s: float = Field(default=1.0, ge=0)
    max_backoff_s: float = Field(default=60.0, ge=0)


class JobSpec(_Strict):
    """A validated job; paths are absolute (resolved against the job file's folder)."""

    input: InputSpec
    output: OutputSpec
    model: str = Field(min_length=1)
    prompt: PromptSpec
    params: Params = Params()
    endpoint: EndpointSpec = EndpointSpec()
    concurrency: int = Field(default=16, ge=1, le=4096)
    retry: RetrySpec = RetrySpec()
    job_path: Path = Path("job.yaml")  # set by load_job, not read from the file


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
    if "job_path" in data:
        raise JobError("unknown key 'job_path'", path, _line_of(text, ("job_path",)))
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as exc:
        raise _job_error(exc, text, path) from None
    _check_param_typos(spec.params, text, path)
    base = path.parent.resolve()
    _check_table_suffix(spec.input.path, "input", text, path)
    _check_table_suffix(spec.output.path, "output", text, path)
    return spec.model_copy(
        update={
            "input": spec.input.model_copy(update={"path": base / spec.input.path}),
            "output": spec.output.model_copy(update={"path": base / spec.output.path}),
            "job_path": path.resolve(),
        }
    )


def _check_table_suffix(table: Path, key: str, text: str, path: Path) -> None:
    if table.suffix.lower() not in SUPPORTED_TABLES:
        raise JobError(
            f"{key}.path {str(table)!r}: unsupported table type; use .csv, .parquet or .jsonl",
            path,
            _line_of(text, (key, "path")),
        )


def _check_param_typos(params: Params, text: str, path: Path) -> None:
    for key in params.model_extra or {}:
        if key in RESERVED_PARAMS:
            raise JobError(
                f"params.{key} is set by batchrun; use the job's `{key}`/`prompt` keys instead",
                path,
                _line_of(text, ("params", key)),
            )
        if key in KNOWN_PARAMS:
            continue
        close = difflib.get_close_matches(key, KNOWN_PARAMS, n=1, cutoff=0.8)
        if close:
            raise JobError(
                f"unknown key '{key}' in params; did you mean '{close[0]}'?",
                path,
                _line_of(text, ("params", key)),
            )


def _job_error(exc: ValidationError, text: str, path: Path) -> JobError:
    """Turn pydantic's first complaint into one line a person can act on."""
    errors = exc.errors()
    err = errors[0]
    keys = tuple(str(p) for p in err["loc"] if not isinstance(p, int))
    more = (
        f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
        if len(errors) > 1
        else ""
    )
    where = ".".join(keys[:-1])
    if err["type"] == "extra_forbidden":
        key = keys[-1]
        allowed = _allowed_keys(keys[:-1])
        close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
        hint = (
            f"; did you mean '{close[0]}'?" if close else f"; expected one of: {', '.join(allowed)}"
        )
        scope = f" in {where}" if where else ""
        msg = f"unknown key '{key}'{scope}{hint}"
    elif err["type"] == "missing":
        scope = f" in {where}" if where else ""
        msg = f"missing required key '{keys[-1]}'{scope}"
    else:
        got = err.get("input")
        got_text = f" (got {got!r})" if not isinstance(got, dict | list) else ""
        reason = str(err["msg"]).removeprefix("Value error, ")
        msg = f"{'.'.join(keys)}: {reason}{got_text}"
    return JobError(msg + more, path, _line_of(text, keys))


def _allowed_keys(keys: tuple[str, ...]) -> list[str]:
    model: type[BaseModel] = JobSpec
    for key in keys:
        annotation = model.model_fields[key].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return []
        model = annotation
    return [k for k in model.model_fields if k != "job_path"]


def _line_of(text: str, keys: tuple[str, ...]) -> int | None:
    """The 1-based line of the deepest key of `keys` that exists in the YAML text."""
    try:
        node = yaml.compose(text)
    except yaml.YAMLError:
        return None
    line = None
    for key in keys:
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
