"""Every command line the README, docs/, the recipes and the commands' `--help` show is one
its command accepts.

Users copy commands from the docs: a flag, recipe argument or config field renamed since a
page was written would fail at their first try. Each documented `vit-train` and `vit-bench`
line goes through its command's own parsing (`cli.parse_flags`: the flags, the recipe with
its arguments, every `--config.KEY=VALUE`), the run's field checks
(`config.check_run_fields`) and, for `vit-bench compile`, the target's name; each
`vit-predict`, `vit-export`, `vit-fewshot` and `vit-visualize` line through its argparse
parser. Lines with placeholders (`...`, `[optional flags]`, `a|b`, `<url>`, an upper-case
name such as TARGET, DIR or `depth=D`) are templates and are left out. Nothing runs: no JAX
is loaded, no data or checkpoint read. And every config field the pages name in prose, or
the commands' messages name as a flag, is one of vit_jax/config.py's.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from collections.abc import Iterator
from importlib.metadata import entry_points
from pathlib import Path

import pytest

from vit_jax import cli
from vit_jax.config import field_default

ROOT = Path(__file__).resolve().parents[1]
# The pages, and the recipes' and modules' docstrings (a command's --help prints its own).
PAGES = [
    ROOT / "README.md",
    *sorted((ROOT / "docs").glob("*.md")),
    ROOT / "launch" / "README.md",
    *sorted((ROOT / "configs").glob("*.py")),
    *sorted((ROOT / "vit_jax").rglob("*.py")),
]
ABSL_COMMANDS = ("vit-train", "vit-bench")  # absl flags and recipes.
ARGPARSE_COMMANDS = ("vit-predict", "vit-export", "vit-fewshot", "vit-visualize")

_FENCED = re.compile(r"^```[^\n]*\n(.*?)^```", re.M | re.S)
_INLINE = re.compile(r"`([^`]+)`")
_START = re.compile(r"^(?:[A-Z_]+=\S+\s+)*(vit-[a-z]+)\s")  # Environment settings first.
_TEMPLATE = re.compile(r"\.\.\.|[\[|<]|(?:^|[\s=:,])[A-Z][A-Z_]*(?=$|[\s,])")


def _command(text: str) -> str | None:
    """The command `text` starts with (environment settings dropped), or None."""
    text = " ".join(text.split())
    found = _START.match(text + " ")
    return text[found.start(1) :] if found else None


def _shell_commands(block: str) -> Iterator[str]:
    """Each command of a shell block: continuation lines joined, comments dropped."""
    for line in re.sub(r"\\\n", " ", block).splitlines():
        for part in re.split(r"&&|;|\s\|\s", re.sub(r"\s#.*$", "", line)):
            if (command := _command(part.strip())) is not None:
                yield command


def documented_commands() -> list[tuple[str, str]]:
    """(page, command line) for each vit_jax command in a code block, an indented block or
    an inline code span of `PAGES`, templates left out."""
    found = []
    for page in PAGES:
        text = page.read_text()
        blocks = _FENCED.findall(text)
        prose = _FENCED.sub("", text)
        indented = re.findall(r"^ {4,}(vit-[a-z]+ (?:.*\\\n)*.*)$", prose, re.M)
        spans = [" ".join(s.split()) for s in _INLINE.findall(prose) if _command(s) is not None]
        for block in [*blocks, *indented, *spans]:
            for command in _shell_commands(block):
                if not _TEMPLATE.search(command) and len(command.split()) > 2:
                    found.append((str(page.relative_to(ROOT)), command))
    return found


# Run as `python -c PARSE_PROBE NAME` with a JSON list of command lines on stdin: parses each
# as console script NAME (vit-train or vit-bench) parses it and prints, as JSON, the error of
# each (null where it is accepted).
PARSE_PROBE = """
import json, sys
from importlib.metadata import entry_points
from absl import flags
from vit_jax import cli
from vit_jax.bench import targets
from vit_jax.config import check_run_fields

name = sys.argv[1]
(entry,) = entry_points(group="console_scripts", name=name)
entry.load()  # Its module defines the command's flags.
command = sys.modules[entry.module]

def check(argv):
    for flag in [f for f in flags.FLAGS if f.startswith("config.")]:
        delattr(flags.FLAGS, flag)  # The previous line's overrides.
    flags.FLAGS.unparse_flags()
    sys.argv = argv
    rest = cli.parse_flags(entry.module)
    if flags.FLAGS.config is not None:
        check_run_fields(flags.FLAGS.config)
    if name == "vit-bench":
        assert len(rest) == 2 and rest[1] in command.MODES, f"not a mode: {rest[1:]}"
        if rest[1] == "compile" and flags.FLAGS.target:
            targets.parse_target(flags.FLAGS.target, flags.FLAGS.slices)
    else:
        assert rest == [name], f"unexpected arguments {rest[1:]}"

errors = []
for line in json.load(sys.stdin):
    try:
        check(line)
        errors.append(None)
    except Exception as e:
        errors.append(f"{type(e).__name__}: {e}")
print(json.dumps(errors))
"""


def _refusals(commands: list[tuple[str, str]], check) -> list[str]:
    """'page: command line' and its error for each line `check` refuses; `check` takes the
    lines' arguments and gives an error or None for each."""
    errors = check([shlex.split(line) for _, line in commands])
    pairs = zip(commands, errors, strict=True)
    return [f"{page}: {line}\n    {error}" for (page, line), error in pairs if error]


def _of(name: str) -> list[tuple[str, str]]:
    return [(page, line) for page, line in documented_commands() if line.split()[0] == name]


@pytest.mark.parametrize("name", ABSL_COMMANDS)
def test_each_documented_recipe_command_parses_as_its_command_parses_it(name):
    commands = _of(name)
    assert len(commands) >= 8, commands  # The extraction found the pages' commands.

    def check(lines):
        probe = subprocess.run(
            [sys.executable, "-c", PARSE_PROBE, name],
            input=json.dumps(lines),
            capture_output=True,
            text=True,
            cwd=ROOT,  # The docs name recipes by their path in the repository.
        )
        assert probe.returncode == 0, probe.stderr
        return json.loads(probe.stdout.splitlines()[-1])

    refused = _refusals(commands, check)
    assert not refused, "\n".join(refused)


def test_each_documented_checkpoint_command_parses_as_its_command_parses_it(monkeypatch, capsys):
    commands = [c for name in ARGPARSE_COMMANDS for c in _of(name)]
    assert {line.split()[0] for _, line in commands} == set(ARGPARSE_COMMANDS), commands
    monkeypatch.setattr(cli, "run", lambda prog, body, memory_lever=None: 0)  # Parse only.

    def check(lines):
        errors = []
        for name, *args in lines:
            (entry,) = entry_points(group="console_scripts", name=name)
            try:
                entry.load()(args)
                errors.append(None)
            except SystemExit:
                errors.append(capsys.readouterr().err.strip())
        return errors

    refused = _refusals(commands, check)
    assert not refused, "\n".join(refused)


# A config field as the pages name it (`config.batch_size`, `--config.model.dtype=...`); the
# recipes and modules are read for `--config.KEY` alone (their code reads `config.KEY` too).
_FIELD = re.compile(r"(?<![\w./-])(--)?config\.([a-z_][\w.]*\w)")


def test_each_config_field_the_pages_and_messages_name_exists():
    def exists(key: str) -> bool:
        try:
            field_default(key)
            return True
        except KeyError:
            return False

    named = [
        (page, found[2])
        for page in PAGES
        for found in _FIELD.finditer(page.read_text())
        if (found[1] or page.suffix == ".md") and found[2] != "json"  # A hub's config.json.
    ]
    assert len(named) > 100, named  # The pages' fields were found.
    missing = sorted(
        {f"{page.relative_to(ROOT)}: config.{key}" for page, key in named if not exists(key)}
    )
    assert not missing, "\n".join(missing)
