"""Every fenced code block of README.md and docs/**/*.md, run as a reader would run it.

STYLE.md: "Every docs example is a runnable file that a test executes". One test per block, with the id
``<page>-block<index>-<language>`` (``index`` counts every fenced block of the page, from 0). The blocks of a page
run in order in one working folder, a fresh tmp folder holding a link ``examples`` to the checkout's
``examples/`` (as a checkout's root would), and its Python blocks share one namespace. A block first runs the
earlier blocks of its page that have not run yet, so ``-k README.md-block3`` works on its own.

Directives: HTML comments right before a block (blank lines between are fine; mkdocs does not render them).

- ``<!-- docs-test: skip REASON -->``: the block is not run; the reason shows in ``pytest -rs``.
- ``<!-- docs-test: slow -->``: the block takes longer than ~30 s; it runs under ``pytest -m slow`` only, and a
  block that is not slow never runs it as a prerequisite.
- ``<!-- docs-test: setup COMMAND -->``: a prerequisite the page names in prose only ("a trained run"); the
  shell line COMMAND runs first, under the shell rules below.
- ``<!-- docs-test: excerpt-of PATH -->``: a YAML block quoting a shipped config must be a subset of it.

What runs, by the block's language:

- ``text`` or none: output or a file layout. Not run (one ``-rs`` line for all of them).
- ``python``: executed in the page's namespace (``__name__ == "__main__"``), in the page's folder (on sys.path).
  A top-level bare expression whose comment starts with a shape (``out.actions.shape  # [2, 16] ...``,
  ``# torch.Size([4, 4])``) must have that shape.
- ``yaml``: parsed, then (1) saved where its first-line comment says, or (2) in a "YAML + command pair", when
  the next block is a shell block whose ``routerkit`` command takes a ``.yaml`` file that does not exist yet,
  saved under that name (the next block runs the command); otherwise (3) checked by the schema
  (``parse_config``): a whole config as it is, some sections or a list of ``zoo.models`` entries merged into
  a minimal config.
- ``bash``, ``sh``, ``shell``, ``console`` (``$ `` lines only): each command, see below.
- anything else fails: a new kind of block needs a rule here.

Files: a Python or YAML block whose first line is a comment naming a relative path (``# mypkg/data.py``) is also
saved there, with an empty ``__init__.py`` in each new package folder, as the reader would save it.

Shell lines: comments dropped, ``\\`` continuations joined, ``&&`` and ``;`` split into commands. Per command:

- ``pip``, ``mkdocs``, ``pytest``, ``ruff``, ``mypy``: skipped (installation and tooling, run by CI itself); a
  block of nothing else is reported as skipped.
- ``VAR=value`` prefixes: the command's environment. ``ROUTERKIT_DATA=/path/to/...`` is the data placeholder:
  it becomes the data folder (below) when that has the example's data, else it is dropped and the example's
  tiny fixture stands in. Any other ``/path/to/`` placeholder fails: give the block a skip directive.
- absolute ``/tmp/...`` paths are moved into the page's folder: nothing is written outside it.
- ``cd DIR``: the working folder of the following commands (it must stay inside the page's folder).
- ``routerkit ...``: typer's CliRunner on ``routerkit.cli:app``. ``train CONFIG`` and ``compare CONFIG`` get the
  tiny budget of the config's family (``TINY`` of tests/examples/test_examples.py, built on tests/_tiny.py,
  minus its ``data.params.root`` / ``source`` when the command names its own data) plus ``run.device=cpu`` and
  ``COMPARE_TINY``; a config saved from a block of the page gets tests/_tiny.py's ``tiny_training()`` (its data is
  its own) plus ``COMPARE_TINY``; ``compare RUN_DIR`` gets ``COMPARE_TINY``; ``train --resume``, ``evaluate``,
  ``calibrate``, ``robustness``, ``validate`` and ``list`` run as written (on the tiny run made before them).
- ``python -m MODULE ...`` / ``python FILE ...``: the venv's interpreter, in a subprocess.
- anything else fails ("no rule").

Data: ``$ROUTERKIT_DATA`` if set, else ``../shared/data`` beside the checkout when it exists (mnist/, cifar10/).
Python blocks and commands see it as ``ROUTERKIT_DATA``; ``ROUTERKIT_HOME`` (the trust store) and
``ROUTERKIT_CACHE`` (downloads) point into the tmp folder, never the user's.
"""

from __future__ import annotations

import ast
import copy
import importlib
import os
import re
import shlex
import subprocess
import sys
import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests" / "examples"))

from _tiny import tiny_training  # noqa: E402
from test_examples import TINY  # noqa: E402

from routerkit.cli import app  # noqa: E402
from routerkit.config import ExperimentConfig, parse_config  # noqa: E402

PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def _data_folder() -> Path | None:
    env = os.environ.get("ROUTERKIT_DATA")
    if env:
        return Path(env)
    shared = ROOT.parent / "shared" / "data"
    return shared if shared.is_dir() else None


DATA = _data_folder()
DATA_SUBFOLDER = {"battery": "battery", "mnist": "mnist", "cifar": "cifar10", "cityscapes": "cityscapes"}

# `routerkit compare` at a tiny budget (the sweeps, the stop policies and the IDK grid), for every family.
COMPARE_TINY = [
    "compare.sweep_lambdas=[0.0, 0.5]",
    "compare.sweep_policy_epochs=1",
    "compare.stop_epochs=1",
    "compare.stop_alphas=[0.1]",
    "compare.idk_offsets=[0.0]",
    "compare.idk_grid_steps=3",
]

TEXT = {"", "text", "txt", "plain"}
PYTHON = {"python", "py"}
SHELL = {"bash", "sh", "shell", "console"}
YAML = {"yaml", "yml"}
SKIPPED_TOOLS = {"pip", "mkdocs", "pytest", "ruff", "mypy"}  # installation and tooling lines, never run
TEXT_REASON = "```text and unlabelled blocks are output or file layouts: nothing to run"

_FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\s{]*)")
_DIRECTIVE = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<body>.*?)\s*-->\s*$")
_FILE_COMMENT = re.compile(r"^#\s*(?P<path>[\w.-]+(?:/[\w.-]+)*\.(?:py|ya?ml))\s*$")
_ENV = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
# Options of the routerkit commands that take a value (everything else starting with '-' is a flag).
_VALUE_OPTIONS = {"--set", "-s", "--resume", "--run-dir", "--out", "--split", "--checkpoint", "--target-gflops",
                  "--target-share", "--tolerance", "--amount", "--epochs", "--init", "--seed"}  # fmt: skip


# ---------------------------------------------------------------- reading the pages


@dataclass
class Block:
    page: str
    index: int
    lang: str
    text: str
    line: int
    skip: str | None = None
    slow: bool = False
    setup: list[str] = field(default_factory=list)
    excerpt: str | None = None

    @property
    def id(self) -> str:
        return f"{self.page}-block{self.index}-{self.lang or 'plain'}"


def _apply_directive(block: Block, body: str) -> str | None:
    """Set one directive on ``block``; return a problem or None."""
    word, _, rest = body.partition(" ")
    rest = rest.strip()
    if word == "skip" and rest:
        block.skip = rest
    elif word == "slow" and not rest:
        block.slow = True
    elif word == "setup" and rest:
        block.setup.append(rest)
    elif word == "excerpt-of" and rest:
        block.excerpt = rest
    else:
        return f"unknown or incomplete directive <!-- docs-test: {body} --> (skip REASON, slow, setup COMMAND, excerpt-of PATH)"
    return None


def parse_page(path: Path, name: str | None = None) -> tuple[list[Block], list[str]]:
    """The fenced blocks of a markdown page with their directives, and the problems found on the way."""
    name = name or path.relative_to(ROOT).as_posix()
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    problems: list[str] = []
    pending: list[tuple[int, str]] = []
    i = 0
    while i < len(lines):
        line = lines[i]
        directive = _DIRECTIVE.match(line)
        fence = _FENCE.match(line)
        if directive:
            pending.append((i + 1, directive.group("body")))
        elif fence:
            indent, marker = len(fence.group("indent")), fence.group("fence")
            body: list[str] = []
            i += 1
            while i < len(lines) and not (lines[i].strip().startswith(marker) and set(lines[i].strip()) == {marker[0]}):
                body.append(lines[i][indent:] if lines[i][:indent].strip() == "" else lines[i])
                i += 1
            if i == len(lines):
                problems.append(f"{name}:{len(blocks)}: unterminated code fence")
            block = Block(name, len(blocks), fence.group("info").lower(), "\n".join(body) + "\n", i + 1 - len(body))
            for where, text in pending:
                problem = _apply_directive(block, text)
                if problem:
                    problems.append(f"{name}:{where}: {problem}")
            pending = []
            blocks.append(block)
        elif line.strip() and pending:
            problems.extend(f"{name}:{where}: directive not right before a code block" for where, _ in pending)
            pending = []
        i += 1
    problems.extend(f"{name}:{where}: directive not right before a code block" for where, _ in pending)
    return blocks, problems


PARSED = {path.relative_to(ROOT).as_posix(): parse_page(path) for path in PAGES}
BLOCKS = [block for blocks, _ in PARSED.values() for block in blocks]


# ---------------------------------------------------------------- shell lines


def shell_commands(text: str, lang: str) -> list[list[str]]:
    """The commands of a shell block: comments dropped, continuations joined, split at ``&&`` and ``;``."""
    lines = text.splitlines()
    if lang == "console":
        lines = [line[2:] for line in lines if line.startswith("$ ")]
    joined = re.sub(r"\\\n", " ", "\n".join(lines))
    commands: list[list[str]] = []
    for line in joined.splitlines():
        lexer = shlex.shlex(line, posix=True, punctuation_chars=";&|")
        lexer.whitespace_split = True
        current: list[str] = []
        for token in lexer:
            if token in ("&&", ";"):
                commands.append(current)
                current = []
            elif token and set(token) <= set(";&|"):
                raise AssertionError(f"no rule for {token!r} in shell line {line!r}: use && or ;, or skip the block")
            else:
                current.append(token)
        commands.append(current)
    return [c for c in commands if c]


def _positionals(args: list[str]) -> list[str]:
    """Positional arguments of a routerkit sub-command's arguments (after the sub-command)."""
    out, skip_next = [], False
    for arg in args:
        if skip_next:
            skip_next = False
        elif arg in _VALUE_OPTIONS:
            skip_next = True
        elif not arg.startswith("-"):
            out.append(arg)
    return out


class BlockFailed(AssertionError):
    """A documented path did not work; the message says which command and shows its output."""


@contextmanager
def _chdir(folder: str | Path) -> Iterator[None]:
    before = os.getcwd()
    os.chdir(folder)
    try:
        yield
    finally:
        os.chdir(before)


# ---------------------------------------------------------------- Python blocks

_SHAPE_COMMENT = re.compile(r"#\s*(?:torch\.Size\()?\[(?P<dims>\d+(?:\s*,\s*\d+)*)\]")


def _check_shape(value: Any, expected: tuple[int, ...], source: str) -> Any:
    shape = tuple(int(d) for d in (value.shape if hasattr(value, "shape") else value))
    if shape != expected:
        raise BlockFailed(f"`{source}` has shape {list(shape)}, the docs say {list(expected)}")
    return value


def with_shape_checks(source: str, filename: str, first_line: int = 1) -> Any:
    """Compile a Python block (tracebacks name the page's lines); a top-level bare expression whose comment starts
    with a shape (``out.actions.shape  # [2, 16] ...`` or ``# torch.Size([4, 4])``) must have that shape."""
    tree = ast.parse(source, filename)
    lines = source.splitlines()
    for i, node in enumerate(tree.body):
        if not isinstance(node, ast.Expr) or node.end_lineno is None or node.end_col_offset is None:
            continue
        after = lines[node.end_lineno - 1].encode()[node.end_col_offset :].decode().strip()
        match = _SHAPE_COMMENT.match(after)
        if match:
            expected = [int(d) for d in match.group("dims").split(",")]
            text = ast.get_source_segment(source, node) or ""
            args: list[ast.expr] = [node.value, ast.Constant(tuple(expected)), ast.Constant(text)]
            call = ast.Call(ast.Name("__docs_shape__", ast.Load()), args, [])
            tree.body[i] = ast.copy_location(ast.Expr(call), node)
    tree = ast.increment_lineno(ast.fix_missing_locations(tree), first_line - 1)
    return compile(tree, filename, "exec")


# ---------------------------------------------------------------- YAML blocks

_MINIMAL = {
    "data": {"factory": "battery_plugin:build_data"},
    "zoo": {"models": [{"name": "f0", "model": "unet", "params": {"dropout": 0.1}}, {"name": "f1", "model": "unet"}]},
}


def _merge(base: dict[str, Any], part: dict[str, Any]) -> dict[str, Any]:
    for key, value in part.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value
    return base


def _not_in(part: Any, whole: Any, where: str) -> list[str]:
    """Where ``part`` is not a subset of ``whole`` (mappings: keys and values; lists: item by item)."""
    if isinstance(part, dict):
        if not isinstance(whole, dict):
            return [f"{where or '.'}: a mapping in the docs, {whole!r} in the file"]
        return [
            p
            for k, v in part.items()
            for p in (_not_in(v, whole[k], f"{where}.{k}") if k in whole else [f"{where}.{k}: missing"])
        ]
    if isinstance(part, list):
        if not isinstance(whole, list) or len(part) != len(whole):
            return [f"{where}: {part!r} in the docs, {whole!r} in the file"]
        return [p for i, (a, b) in enumerate(zip(part, whole, strict=True)) for p in _not_in(a, b, f"{where}.{i}")]
    return [] if part == whole else [f"{where}: {part!r} in the docs, {whole!r} in the file"]


def check_yaml_fragment(data: Any, where: str) -> None:
    """Validate a YAML block by the schema: a whole config, some of its sections, or ``zoo.models`` entries."""
    sections = set(ExperimentConfig.model_fields)
    if isinstance(data, dict) and data and set(data) <= sections:
        raw = data if {"data", "zoo"} <= set(data) else _merge(copy.deepcopy(_MINIMAL), data)
    elif isinstance(data, list) and data and all(isinstance(item, dict) and "model" in item for item in data):
        raw = copy.deepcopy(_MINIMAL)
        raw["zoo"]["models"] += data
    else:
        raise BlockFailed(
            f"{where}: a YAML block that is neither a config, config sections ({', '.join(sorted(sections))}) nor zoo.models "
            "entries; add a rule to this test or a <!-- docs-test: skip REASON --> comment"
        )
    parse_config(raw, where)


# ---------------------------------------------------------------- running a page


class Page:
    """One page's working folder, namespace and the outcome of each block run so far."""

    def __init__(self, name: str, folder: Path, blocks: list[Block]) -> None:
        self.name, self.folder, self.blocks = name, folder, blocks
        self.saved: set[Path] = set()  # files written from blocks
        self.cwd = str(folder)
        self.namespace: dict[str, Any] = {"__name__": "__main__"}
        self.outcome: dict[int, str | None] = {}  # None: ran; a string: why it was skipped; failures raise
        self.failed: set[int] = set()
        self.fixtures = 0
        folder.mkdir(parents=True)
        (folder / "examples").symlink_to(ROOT / "examples", target_is_directory=True)

    # -- order

    def run_through(self, block: Block) -> str | None:
        """Run the earlier runnable blocks that have not run, then ``block``; return a skip reason or None."""
        for earlier in self.blocks[: block.index]:
            if earlier.index in self.outcome or earlier.skip or earlier.lang in TEXT or (earlier.slow and not block.slow):
                continue
            if earlier.index in self.failed:
                return f"{block.id}: runs after {earlier.id}, which failed"
            self._run(earlier)
        return self._run(block)

    def _run(self, block: Block) -> str | None:
        try:
            for command in block.setup:
                for tokens in shell_commands(command, "bash"):
                    self.command(tokens)
            if block.lang in PYTHON:
                outcome = self.python(block)
            elif block.lang in YAML:
                outcome = self.yaml(block)
            elif block.lang in SHELL:
                outcome = self.shell(block)
            else:
                raise BlockFailed(f"{block.id}: no rule for ```{block.lang} blocks: add one to this test or skip the block")
        except BaseException:
            self.failed.add(block.index)
            raise
        self.outcome[block.index] = outcome
        return outcome

    # -- files

    def _save(self, relative: str, text: str) -> Path:
        target = (Path(self.cwd) / relative).resolve()
        if not target.is_relative_to(self.folder.resolve()):
            raise BlockFailed(f"{self.name}: {relative} is outside the page's folder")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text, encoding="utf-8")
        if target.suffix == ".py":
            parent = target.parent
            while parent != Path(self.cwd).resolve() and parent.is_relative_to(self.folder.resolve()):
                (parent / "__init__.py").touch(exist_ok=True)
                parent = parent.parent
            for name, module in list(sys.modules.items()):  # a rewritten file is imported afresh
                if getattr(module, "__file__", None) and Path(module.__file__).resolve() == target:
                    del sys.modules[name]
        importlib.invalidate_caches()
        self.saved.add(target)
        return target

    def _file_comment(self, block: Block) -> str | None:
        match = _FILE_COMMENT.match(block.text.splitlines()[0] if block.text.strip() else "")
        return match.group("path") if match else None

    # -- languages

    def python(self, block: Block) -> None:
        relative = self._file_comment(block)
        if relative:
            self._save(relative, block.text)
        code = with_shape_checks(block.text, str(ROOT / block.page), block.line)
        self.namespace["__docs_shape__"] = _check_shape
        sys.path.insert(0, self.cwd)
        try:
            with _chdir(self.cwd):
                exec(code, self.namespace)
        finally:
            sys.path.remove(self.cwd)

    def yaml(self, block: Block) -> None:
        try:
            data = yaml.safe_load(block.text)
        except yaml.YAMLError as err:
            raise BlockFailed(f"{block.id}: not valid YAML: {err}") from None
        if block.excerpt:
            whole = yaml.safe_load((ROOT / block.excerpt).read_text(encoding="utf-8"))
            problems = _not_in(data, whole, "")
            if problems:
                raise BlockFailed(f"{block.id} quotes {block.excerpt} but differs from it:\n  " + "\n  ".join(problems))
        relative = self._file_comment(block) or self._paired_file(block)
        if relative:
            self._save(relative, block.text)
            return
        check_yaml_fragment(data, block.id)

    def _paired_file(self, block: Block) -> str | None:
        """The YAML file a shell block right after this one runs ``routerkit`` on, if it does not exist yet."""
        after = self.blocks[block.index + 1] if block.index + 1 < len(self.blocks) else None
        if after is None or after.lang not in SHELL or after.skip:
            return None
        for tokens in shell_commands(after.text, after.lang):
            while tokens and _ENV.match(tokens[0]):
                tokens = tokens[1:]
            if tokens[:1] == ["routerkit"]:
                for arg in _positionals(tokens[2:]):
                    if arg.endswith((".yaml", ".yml")) and not (Path(self.cwd) / arg).exists():
                        return arg
        return None

    def shell(self, block: Block) -> str | None:
        skipped: list[str] = []
        commands = shell_commands(block.text, block.lang)
        for tokens in commands:
            if not self.command(tokens):
                skipped.append(" ".join(tokens))
        if skipped and len(skipped) == len(commands):
            tools = ", ".join(sorted({s.split()[0] for s in skipped}))
            return f"{block.id}: only {tools} lines (installation and tooling, skipped by rule)"
        return None

    # -- commands

    def command(self, tokens: list[str]) -> bool:
        """Run one shell command; False when a rule skips it."""
        line = " ".join(tokens)
        env: dict[str, str | None] = {}
        while tokens and _ENV.match(tokens[0]):
            key, _, value = tokens[0].partition("=")
            env[key] = value
            tokens = tokens[1:]
        if not tokens:
            raise BlockFailed(f"`{line}`: no rule for a bare assignment (use VAR=value COMMAND)")
        if tokens[0] in SKIPPED_TOOLS:
            print(f"$ {line}\n(skipped by rule: {tokens[0]} lines are not run)")
            return False
        if "ROUTERKIT_DATA" in env and str(env["ROUTERKIT_DATA"]).startswith("/path/to/"):
            env["ROUTERKIT_DATA"] = str(DATA) if DATA is not None else None
        tmp = f"{self.folder}/tmp/"
        written = tokens
        tokens = [re.sub(r"(^|=)/tmp/", lambda m: m.group(1) + tmp, t) for t in tokens]
        env = {k: (re.sub(r"^/tmp/", tmp, v) if v else v) for k, v in env.items()}
        placeholders = [t for t in tokens if "/path/to/" in t]
        if placeholders:
            raise BlockFailed(f"`{line}`: placeholder {placeholders[0]!r}; give the block a <!-- docs-test: skip REASON -->")
        (self.folder / "tmp").mkdir(exist_ok=True)
        print(f"$ {line}")
        if tokens != written:
            print(f"  (as: {shlex.join(tokens)})")
        if tokens[0] == "cd":
            target = os.path.normpath(os.path.join(self.cwd, tokens[1] if len(tokens) > 1 else str(self.folder)))
            if not (target + os.sep).startswith(str(self.folder) + os.sep) or not os.path.isdir(target):
                raise BlockFailed(f"`{line}`: {target} is not a folder inside the page's folder {self.folder}")
            self.cwd = target
        elif tokens[0] == "routerkit":
            self.routerkit(tokens[1:], env, line)
        elif tokens[0] in ("python", "python3"):
            self.subprocess([sys.executable, *tokens[1:]], env, line)
        else:
            raise BlockFailed(f"`{line}`: no rule to run {tokens[0]!r}; add one to this test or skip the block")
        return True

    def _tiny(self, config: str, args: list[str], env: dict[str, str | None]) -> list[str]:
        """The tiny budget of ``config``'s family, minus the fixture's data when the command names its own."""
        family = Path(config).stem.split("_")[0]
        if (Path(self.cwd) / config).resolve() in self.saved:
            return ["run.device=cpu", *tiny_training(), *COMPARE_TINY]  # a config the page wrote: its own data
        if family not in TINY:
            raise BlockFailed(
                f"no tiny budget for {config}: add its family {family!r} to TINY in tests/examples/test_examples.py"
            )
        self.fixtures += 1
        fixture = self.folder / ".tiny" / str(self.fixtures)
        fixture.mkdir(parents=True)
        items = TINY[family](fixture)
        data_env = env.get("ROUTERKIT_DATA")
        names_data = any(a.startswith("data.params.root=") for a in args) or bool(
            data_env and (Path(data_env) / DATA_SUBFOLDER.get(family, family)).is_dir()
        )
        if names_data:
            items = [i for i in items if not i.startswith(("data.params.root=", "data.params.source="))]
        return ["run.device=cpu", *items, *COMPARE_TINY]

    def routerkit(self, args: list[str], env: dict[str, str | None], line: str) -> None:
        sub = args[0] if args else ""
        positionals = _positionals(args[1:])
        extra: list[str] = []
        if sub == "train" and "--resume" not in args and positionals:
            extra = self._tiny(positionals[0], args, env)
        elif sub == "compare" and positionals:
            target = Path(self.cwd) / positionals[0]
            extra = COMPARE_TINY if (target / "config.yaml").exists() else self._tiny(positionals[0], args, env)
        full = [*args, *(x for item in extra for x in ("-s", item))]
        print(f"  (run as: routerkit {shlex.join(full)}" + (f"; env {env})" if env else ")"))
        with _chdir(self.cwd):
            result = CliRunner().invoke(app, full, env=env)
        print(result.output[-3000:])
        if result.exit_code != 0:
            trace = ""
            if result.exc_info and not isinstance(result.exception, SystemExit):
                trace = "".join(traceback.format_exception(*result.exc_info))[-4000:]
            raise BlockFailed(
                f"`{line}` exited {result.exit_code} (run as `routerkit {' '.join(full)}` in {self.cwd}):\n"
                f"{result.output[-4000:]}\n{trace}"
            )

    def subprocess(self, argv: list[str], env: dict[str, str | None], line: str) -> None:
        full_env = {k: v for k, v in {**os.environ, **env}.items() if v is not None}
        proc = subprocess.run(argv, cwd=self.cwd, env=full_env, capture_output=True, text=True, timeout=600)
        print(proc.stdout[-3000:], proc.stderr[-3000:])
        if proc.returncode != 0:
            raise BlockFailed(f"`{line}` exited {proc.returncode} in {self.cwd}:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")


def _registries() -> list[Any]:
    """Every registry of the routerkit modules imported so far."""
    import routerkit.cli  # noqa: F401  (the registries `routerkit list` shows)
    from routerkit._registry import Registry

    found: dict[int, Any] = {}
    for name, module in list(sys.modules.items()):
        if name.split(".")[0] == "routerkit" and module is not None:
            found.update((id(v), v) for v in list(vars(module).values()) if isinstance(v, Registry))
    return list(found.values())


def _restore_registries(before: dict[int, dict[str, Any]]) -> None:
    """Undo what the pages registered (``@register_router`` in a block): names added by code outside
    routerkit are removed, names that existed get their old entry back."""
    for reg in _registries():
        entries = reg._entries
        old = before.get(id(reg), {})
        for key, obj in list(entries.items()):
            if key in old:
                entries[key] = old[key]
            elif str(getattr(obj, "__module__", "")).split(".")[0] != "routerkit":
                del entries[key]


@pytest.fixture(scope="module")
def docs_pages(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Page]]:
    """Pages created on first use; afterwards sys.path, sys.modules and the registries are as before."""
    root = tmp_path_factory.mktemp("docs")
    pages: dict[str, Page] = {}
    saved_path = list(sys.path)
    registries = {id(reg): dict(reg._entries) for reg in _registries()}
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ROUTERKIT_HOME", str(root / "home"))
        mp.setenv("ROUTERKIT_CACHE", str(root / "cache"))
        mp.setenv("MPLBACKEND", "Agg")
        if DATA is not None:
            mp.setenv("ROUTERKIT_DATA", str(DATA))
        else:
            mp.delenv("ROUTERKIT_DATA", raising=False)

        def get(name: str) -> Page:
            if name not in pages:
                _forget_modules_under(root)  # a page's mypkg is not another page's
                pages[name] = Page(name, root / re.sub(r"[^\w.-]+", "_", name), PARSED[name][0])
            return pages[name]

        yield get
    sys.path[:] = saved_path
    _restore_registries(registries)
    _forget_modules_under(root)


def _forget_modules_under(folder: Path) -> None:
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(folder.resolve()):
            del sys.modules[name]
    importlib.invalidate_caches()


# ---------------------------------------------------------------- the tests


def test_directives_are_well_formed() -> None:
    problems = [problem for _, page_problems in PARSED.values() for problem in page_problems]
    assert not problems, "\n".join(problems)
    assert len(PARSED) > 1 and BLOCKS, "no pages or no code blocks found"


@pytest.mark.parametrize("block", [pytest.param(b, marks=[pytest.mark.slow] if b.slow else [], id=b.id) for b in BLOCKS])
def test_docs_block(block: Block, docs_pages: Callable[[str], Page]) -> None:
    if block.lang in TEXT:
        pytest.skip(TEXT_REASON)
    if block.skip:
        pytest.skip(f"{block.id}: {block.skip}")
    reason = docs_pages(block.page).run_through(block)
    if reason:
        pytest.skip(reason)


# A page using the rules that the docs pages have no instance of yet: a `# path` Python block saved as a
# plugin, and a YAML + command pair (the YAML saved under the name the command uses).
PAIR_PAGE = """
```python
# mypkg/data.py
import torch

from routerkit.data import DataBundle, Split


def build_data(seed: int = 0) -> DataBundle:
    gen = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        images = torch.rand(n, 1, 8, 8, generator=gen)
        return Split(images, (images[:, 0] > 0.5).long())

    return DataBundle(split(12), split(4), split(4), class_names=["background", "foreground"])
```

```yaml
run: {name: pair}
data: {factory: mypkg.data:build_data}
partitioner: {name: patch_grid, params: {rows: 2, cols: 2}}
zoo:
  models:
    - {name: f0, model: toy_segmenter, params: {width: 2, dropout: 0.3}}
    - {name: f1, model: toy_segmenter, params: {width: 4}}
uncertainty: {name: mc_dropout, params: {num_passes: 2}}
```

```bash
routerkit validate my.yaml
routerkit train my.yaml && routerkit evaluate runs/pair
```
"""


def test_yaml_command_pair_and_saved_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "pair.md").write_text(PAIR_PAGE, encoding="utf-8")
    blocks, problems = parse_page(tmp_path / "pair.md", "pair.md")
    assert not problems and [b.lang for b in blocks] == ["python", "yaml", "bash"]
    monkeypatch.setenv("ROUTERKIT_HOME", str(tmp_path / "home"))
    page = Page("pair.md", tmp_path / "page", blocks)
    saved_path = list(sys.path)
    try:
        assert page.run_through(blocks[2]) is None
    finally:
        sys.path[:] = saved_path
        _forget_modules_under(tmp_path)
    assert (tmp_path / "page" / "mypkg" / "__init__.py").is_file()
    assert (tmp_path / "page" / "my.yaml").read_text(encoding="utf-8") == blocks[1].text
    assert (tmp_path / "page" / "runs" / "pair" / "metrics" / "test.json").is_file()
