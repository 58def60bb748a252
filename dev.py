"""The README's commands, each setting itself up on a fresh clone (Python 3.11+ and PyPI only).

    python3 dev.py demo     run the sample job on the built-in simulator and print its summary
    python3 dev.py test     what CI runs: the checks below, the docs build, then the tests (extra
                            arguments go to pytest)
    python3 dev.py check    the checks alone: ruff check, ruff format --check, mypy --strict

Each makes `.venv` beside this file and installs the project with its dev extras (the test
tools, ruff, mypy) into it the first time, and again whenever pyproject.toml changes; no shell
needs a venv activated.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
STAMP = VENV / ".batchrun-installed"  # the hash of the pyproject.toml last installed


def ensure_venv() -> None:
    """Create the venv and install the project unless this pyproject.toml is installed already."""
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print(f"dev.py: creating {VENV}", file=sys.stderr)
        venv.create(VENV, with_pip=True)
    print("dev.py: installing batchrun with its dev extras (once)", file=sys.stderr)
    pip = [str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
    quiet = {**os.environ, "PYTHONWARNINGS": "ignore"}  # setuptools' editable-install banner
    subprocess.run([*pip, "--upgrade", "pip"], check=True, env=quiet)
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True, env=quiet)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    python = str(BIN / "python")
    sources = ["batchrun", "tests", "dev.py"]
    checks = [
        [python, "-m", "ruff", "check", *sources],
        [python, "-m", "ruff", "format", "--check", *sources],
        [python, "-m", "mypy"],  # strict, on batchrun/ (pyproject.toml's [tool.mypy])
    ]
    # The docs site (mkdocs.yml): a broken link, reference or docstring fails it. Built into the
    # git-ignored build/site; `mkdocs serve` shows it while editing.
    docs = [
        python,
        "-m",
        "mkdocs",
        "build",
        "--strict",
        "--quiet",
        "--site-dir",
        str(ROOT / "build" / "site"),
    ]
    os.environ.setdefault("NO_MKDOCS_2_WARNING", "1")  # Material's banner about its successor
    commands = {  # extra arguments go to the last command
        "demo": [[str(BIN / "batchrun"), "jobs/summarize.yaml", "--simulate", "--fresh"]],
        "test": [*checks, docs, [python, "-m", "pytest", "-q"]],
        "check": checks,
    }
    if not argv or argv[0] not in commands:
        print(__doc__, file=sys.stderr)
        return 2
    ensure_venv()
    *first, last = commands[argv[0]]
    failed = [subprocess.run(command, cwd=ROOT).returncode for command in first]
    failed.append(subprocess.run([*last, *argv[1:]], cwd=ROOT).returncode)
    return next((code for code in failed if code), 0)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
