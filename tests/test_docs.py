"""Every example in README.md and docs/ runs, and every option, job key and column they name exists.

The examples are the fenced blocks of each page, run by this file (no plugin), in a copy of the
repository's jobs/ and sample_data/, one folder per page, in page order:

- ```console: lines starting `$ ` are commands, the lines under one its output (stdout and stderr,
  as a terminal shows them). All of a block's commands run in one bash, so `cd` and `export` hold.
  A command must exit 0 unless the next command is `echo $?`, whose output then says the code.
- ```sh / ```bash: commands alone; the block runs under `set -e`.
- ```python: run as a script; a ```text title="Output" block right under it is its stdout.
- ```yaml: a job file, or a part of one: every key must be a job key, and a whole job (input,
  output, model) must load as `batchrun.Job` loads it.
- ```text and ```json are shown, not run (help, output, reports).

A block that cannot run here (a real key, a cluster, another program) is marked on the line
before it: `<!-- not run: the reason -->`, which neither GitHub nor MkDocs shows.

Shown output is compared after masking what differs from run to run or machine to machine:
the folder the page ran in (shown as /path/to/batchrun), durations (`0.2 s`), the page's size
(`86 KiB`), the version of genai-prices. A line `...` stands for any lines. Runs draw no report
page (BATCHRUN_REPORT_PAGE=0, as in every test; tests/test_html_report.py draws it), so the
`report:` line's `, ....report.html` is dropped from both sides.

Why a test of its own rather than Sybil or pytest-examples: the shell sessions are the most of
the examples, and they need a bash of their own per block (`cd`, `export`, `echo $?`), output
compared with masks, and the simulator's sandbox; pytest-examples runs Python alone, and Sybil
would need a custom parser for all of that anyway. This file is that parser, in ~150 lines.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import click
import pytest
import yaml

from batchrun.cli import main
from batchrun.results import COLUMNS
from tests.docgen import job_key_paths

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHOWN_ONLY = {"text", "json"}
RUN = {"console", "sh", "bash", "python", "yaml"}
NOT_RUN = re.compile(r"<!-- not run: (?P<reason>.+?) -->")
SHOWN_PATH = "/path/to/batchrun"


@dataclass
class Block:
    page: Path
    line: int  # 1-based, of the opening fence
    lang: str
    info: str
    body: str
    not_run: str | None  # the reason, when marked

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> list[Block]:
    """The fenced blocks of a page, with the `not run` mark of the line before each."""
    found, lines = [], page.read_text().splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"^(\s*)(```+)(.*)$", lines[i])
        if not fence:
            i += 1
            continue
        indent, ticks, info = fence.group(1), fence.group(2), fence.group(3).strip()
        before = next((lines[j] for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        mark = NOT_RUN.search(before)
        start, i = i, i + 1
        body = []
        while i < len(lines) and lines[i].strip() != ticks:
            body.append(lines[i].removeprefix(indent))
            i += 1
        found.append(
            Block(
                page,
                start + 1,
                info.split()[0] if info else "",
                info,
                "\n".join(body) + "\n",
                mark and mark.group("reason"),
            )
        )
        i += 1
    return found


def prose(page: Path) -> str:
    """The page without its fenced blocks, HTML comments and cog's generated parts."""
    text = page.read_text()
    text = re.sub(r"<!-- \[\[\[cog.*?\[\[\[end\]\]\] -->", "", text, flags=re.S)
    text = re.sub(r"<!--.*?-->", "", text, flags=re.S)
    return re.sub(r"^([ \t]*)(```+).*?^\1\2[ \t]*$", "", text, flags=re.S | re.M)


def spans(page: Path) -> list[str]:
    """The inline code spans of a page's prose."""
    return re.findall(r"(?<!`)`([^`\n]+)`(?!`)", prose(page))


# --- running the examples ------------------------------------------------------------------------


def sandbox(tmp: Path) -> Path:
    for folder in ("jobs", "sample_data"):
        shutil.copytree(ROOT / folder, tmp / folder)
    return tmp


def environment(home: Path) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("BATCHRUN_", "RELAYDANCE_", "OPENAI_", "RAY_"))
        and name.upper() not in {"HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY"}
        and name.upper() not in {"SSL_CERT_FILE", "SSL_CERT_DIR"}
    }
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["BATCHRUN_REPORT_PAGE"] = "0"
    env["PYTHONWARNINGS"] = "ignore"
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr in the order a terminal shows them
    return env


def masked(text: str, folder: Path) -> list[str]:
    text = text.replace(str(folder), SHOWN_PATH)
    text = re.sub(r"\b\d+(?:\.\d+)? s\b", "N s", text)
    text = re.sub(r"\(\d[\d,]* KiB\)", "(N KiB)", text)
    text = re.sub(r"genai-prices \d+\.\d+\.\d+", "genai-prices N", text)  # its bundled price table
    text = re.sub(r"^(report: \S+\.report\.json), \S+\.report\.html$", r"\1", text, flags=re.M)
    return [line.rstrip() for line in text.strip("\n").splitlines()]


def matches(shown: list[str], got: list[str]) -> bool:
    """Whether `got` is `shown`, a `...` line in `shown` standing for any lines."""
    pattern = "".join("(?:.*\n)*?" if line == "..." else re.escape(line) + "\n" for line in shown)
    return re.fullmatch(pattern, "".join(line + "\n" for line in got)) is not None


@dataclass
class Command:
    text: str
    shown: list[str]


def console_commands(body: str) -> list[Command]:
    commands: list[Command] = []
    lines = body.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("$ "):
            text = line[2:]
            while text.endswith("\\") and i + 1 < len(lines):
                i += 1
                text = text[:-1] + " " + lines[i].strip()
            commands.append(Command(text, []))
        elif commands:
            commands[-1].shown.append(line.rstrip())
        else:
            raise AssertionError(f"a console block starts with output, not a `$ ` command: {line!r}")
        i += 1
    return commands


def run_console(block: Block, folder: Path, env: dict[str, str]) -> None:
    commands = console_commands(block.body)
    script = ["set +e", "__rc=0"]
    for n, command in enumerate(commands):
        script += [
            f"printf '\\n@@{n}@@\\n'",
            "(exit $__rc)",  # so that `echo $?` says the previous command's code
            f"{{ {command.text}\n}} 2>&1",
            "__rc=$?",
            f"echo $__rc > .rc{n}",
        ]
    done = subprocess.run(
        ["bash", "-c", "\n".join(script)], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    parts = re.split(r"\n@@(\d+)@@\n", "\n" + done.stdout)
    outputs = {int(parts[k]): parts[k + 1] for k in range(1, len(parts) - 1, 2)}
    for n, command in enumerate(commands):
        got = outputs.get(n, "")
        code = int((folder / f".rc{n}").read_text())
        (folder / f".rc{n}").unlink()
        next_is_echo = n + 1 < len(commands) and commands[n + 1].text.strip() == "echo $?"
        assert code == 0 or next_is_echo, f"{block.where}: `{command.text}` exited {code}:\n{got}"
        if command.shown and not matches(masked("\n".join(command.shown), folder), masked(got, folder)):
            pytest.fail(
                f"{block.where}: `{command.text}` printed\n{got}\nbut the page shows\n"
                + "\n".join(command.shown)
            )


def run_python(block: Block, output: Block | None, folder: Path, env: dict[str, str]) -> None:
    script = folder / f"example_{block.line}.py"
    script.write_text(block.body)
    done = subprocess.run(
        [sys.executable, script.name], cwd=folder, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, f"{block.where}: the example failed:\n{done.stdout}\n{done.stderr}"
    if output is not None and not matches(masked(output.body, folder), masked(done.stdout, folder)):
        pytest.fail(f"{block.where}: the example printed\n{done.stdout}\nbut the page shows\n{output.body}")


def check_yaml(block: Block, folder: Path) -> None:
    from batchrun.errors import JobError
    from batchrun.job import job_from_mapping

    data = yaml.safe_load(block.body)
    assert isinstance(data, dict), f"{block.where}: a yaml block is a job file or a part of one"
    unknown = sorted(k for k in yaml_keys(data) if not known_key(k))
    assert unknown == [], f"{block.where}: no such job keys: {unknown}"
    if {"input", "output", "model"} <= set(data):
        try:
            job_from_mapping(data, folder)
        except JobError as exc:
            pytest.fail(f"{block.where}: the job does not load: {exc}")


def yaml_keys(data: object, prefix: str = "") -> list[str]:
    """The dotted keys of a job mapping, down to the keys whose values the user chooses."""
    if not isinstance(data, dict):
        return []
    keys = []
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if dotted in ("params", "output.fields"):
            keys += [f"{dotted}.{k}" for k in value or {}]  # tools' schemas and field names are free
        elif dotted == "prompt.messages" and isinstance(value, list):
            for item in value:
                keys += yaml_keys(item, "prompt.messages[].")
        else:
            keys += yaml_keys(value, dotted + ".")
    return keys


def known_key(dotted: str) -> bool:
    paths = job_key_paths()
    if dotted in paths:
        return True
    parent, _, _ = dotted.rpartition(".")
    return f"{parent}.*" in paths or f"{parent}.NAME" in paths


PAGE_IDS = [str(page.relative_to(ROOT)) for page in PAGES]


@pytest.mark.timeout(900)
@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_example_runs(page: Path, tmp_path: Path) -> None:
    folder, env = sandbox(tmp_path), environment(tmp_path)
    found = blocks(page)
    for i, block in enumerate(found):
        if block.not_run or block.lang in SHOWN_ONLY:
            continue
        if block.lang == "console":
            run_console(block, folder, env)
        elif block.lang in ("sh", "bash"):
            done = subprocess.run(
                ["bash", "-ec", block.body], cwd=folder, env=env, capture_output=True, text=True, timeout=300
            )
            assert done.returncode == 0, f"{block.where}: failed:\n{done.stdout}\n{done.stderr}"
        elif block.lang == "python" and 'title="In' in block.info:
            continue  # a notebook cell: tests/test_notebook.py runs them in a Jupyter kernel
        elif block.lang == "python":
            after = found[i + 1] if i + 1 < len(found) else None
            output = after if after is not None and 'title="Output"' in after.info else None
            run_python(block, output, folder, env)
        elif block.lang == "yaml":
            check_yaml(block, folder)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_every_block_is_run_or_marked(page: Path) -> None:
    for block in blocks(page):
        assert block.lang in RUN | SHOWN_ONLY, (
            f"{block.where}: fence language {block.lang!r}; use one of {sorted(RUN | SHOWN_ONLY)}"
        )
        if block.not_run is not None:
            assert len(block.not_run) > 10, f"{block.where}: say why it is not run"


# --- what the pages name must exist ---------------------------------------------------------------


def options_of(command: click.Command) -> set[str]:
    return {opt for p in command.params for opt in p.opts + p.secondary_opts if opt.startswith("--")} | {
        "--help"
    }


ALL_OPTIONS = set().union(*(options_of(c) for c in main.commands.values())) | {"--version", "--help"}


def batchrun_flags(command: str) -> list[tuple[str, set[str]]]:
    """The `--flags` of each `batchrun ...` in a shell line, with the options its command takes."""
    found = []
    for part in re.split(r"&&|\|\||;|\|", command):
        try:
            words = shlex.split(part, comments=True)
        except ValueError:
            words = part.split()
        if not words or words[0] != "batchrun":
            continue
        sub = main.commands.get(words[1]) if len(words) > 1 else None
        allowed = options_of(sub or main.commands["run"]) | ({"--version"} if len(words) == 2 else set())
        found += [(w.split("=", 1)[0], allowed) for w in words[1:] if w.startswith("--")]
    return found


def benchmark_flags(command: str) -> list[tuple[str, str]]:
    """The `--flags` of `python tests/benchmarks/X.py ...`, with the script's source."""
    words = command.split()
    for i, word in enumerate(words):
        if word.startswith("tests/benchmarks/") and word.endswith(".py"):
            source = (ROOT / word).read_text()
            return [(w.split("=", 1)[0], source) for w in words[i + 1 :] if w.startswith("--")]
    return []


def shell_lines(page: Path) -> list[str]:
    lines = []
    for block in blocks(page):
        if block.lang == "console":
            lines += [c.text for c in console_commands(block.body)]
        elif block.lang in ("sh", "bash"):
            lines += block.body.splitlines()
    return lines + spans(page)


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_documented_options_exist(page: Path) -> None:
    wrong = []
    for line in shell_lines(page):
        wrong += [f"{flag} (in `{line}`)" for flag, allowed in batchrun_flags(line) if flag not in allowed]
        wrong += [
            f"{flag} (in `{line}`)" for flag, source in benchmark_flags(line) if f'"{flag}"' not in source
        ]
    for span in spans(page):  # a flag on its own: `--max-cost`, `--max-cost N`, `--ray [ADDRESS]`
        flag = re.match(r"^(--[a-z][a-z0-9_-]*)", span)
        if flag and flag.group(1) not in ALL_OPTIONS:
            wrong.append(f"{flag.group(1)} (in `{span}`)")
    assert wrong == [], f"{page.name} names options no command has: {wrong}"


JOB_ROOTS = {
    "input",
    "output",
    "prompt",
    "params",
    "endpoint",
    "retry",
    "rate_limit",
    "pricing",
    "budget",
}


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_documented_job_keys_exist(page: Path) -> None:
    wrong = []
    for span in spans(page):
        key = span.split(":", 1)[0].strip()
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+", key) and key.split(".")[0] in JOB_ROOTS and key[-3:] != ".py":
            if not known_key(key):
                wrong.append(span)
        elif ": " in span and span.split(":")[0] in JOB_ROOTS:  # `budget: {max_cost_usd: N}`
            try:
                data = yaml.safe_load(span)
            except yaml.YAMLError:
                continue
            wrong += [f"{k} (in `{span}`)" for k in yaml_keys(data) if not known_key(k)]
    assert wrong == [], f"{page.name} names job keys the schema lacks: {wrong}"


OUTPUT_COLUMNS = {c.name for c in COLUMNS if c.in_output} | {"id"}


def sample_columns() -> set[str]:
    """Columns a page may name besides the output's: the sample inputs' and the sample jobs' fields."""
    names = set()
    for table in (ROOT / "sample_data").glob("*.csv"):
        names |= set(table.read_text().splitlines()[0].split(","))
    for job in (ROOT / "jobs").glob("*.yaml"):
        names |= set(yaml.safe_load(job.read_text())["output"].get("fields", {}))
    return names


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_documented_columns_exist(page: Path) -> None:
    """`x` column, column `x`, `x` and `y` columns: each a column of the output, or of the samples."""
    text = prose(page)
    named = re.findall(r"`([a-z_]+)`(?: and `[a-z_]+`)? columns?\b", text)
    named += re.findall(r"`[a-z_]+` and `([a-z_]+)` columns\b", text)
    named += re.findall(r"\bcolumns? `([a-z_]+)`", text)
    wrong = sorted(set(named) - OUTPUT_COLUMNS - sample_columns())
    assert wrong == [], f"{page.name} names columns batchrun does not write: {wrong}"


# --- user pages hold no development diary ------------------------------------------------------


FIRST_PERSON = re.compile(r"\b(I|I'm|I've|me|my|we|We|our|Our|us)\b")
ISSUE = re.compile(r"(?<![\w&/])#\d+\b")
COMMIT = re.compile(r"\b(?=[0-9a-f]*[a-f])(?=[0-9a-f]*[0-9])[0-9a-f]{7,40}\b")
TIME_OF_DAY = re.compile(r"\b\d{2}:\d{2}(?::\d{2})?\b")


@pytest.mark.parametrize("page", PAGES, ids=PAGE_IDS)
def test_no_development_diary(page: Path) -> None:
    text = page.read_text()
    assert ISSUE.findall(text) == [], f"{page.name}: issue numbers belong in CHANGELOG.md and git"
    assert COMMIT.findall(text) == [], f"{page.name}: commit hashes belong in CHANGELOG.md and git"
    words = prose(page)
    words = re.sub(r"`[^`\n]*`", "", words)
    assert FIRST_PERSON.findall(words) == [], f"{page.name}: first person: {FIRST_PERSON.findall(words)}"
    assert TIME_OF_DAY.findall(words) == [], f"{page.name}: times of day: {TIME_OF_DAY.findall(words)}"


def test_readme_is_short() -> None:
    assert (ROOT / "README.md").stat().st_size <= 12 * 1024


def test_every_page_is_in_the_site() -> None:
    nav = (ROOT / "mkdocs.yml").read_text()
    missing = [p.name for p in PAGES[1:] if p.name not in nav]
    assert missing == [], f"pages mkdocs.yml's nav does not list: {missing}"
