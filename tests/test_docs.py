"""Every command in the documentation is real, and each one names the test (or the demo) that runs
it.

Pages checked: ``docs/*.md``, the README, ``tools/README.md``, ``dev/README.md`` and the method
study's ``projects/MethodStudy/README.md``. Rule: every ``python tools/<x>.py``,
``python dev/<x>.py`` or ``python -m kd_det...`` / ``python -m method_study...`` line of a fenced
``bash``/``sh`` block (``\\`` continuations joined) must

(a) name an existing script or module;
(b) pass the command's own argument parser, exactly as written (no abbreviated flags). The
    commands run as a user runs them, in a subprocess (one for all commands), each stopped by an
    ``ArgumentParser.parse_args`` that checks the arguments and returns before the command does
    anything;
(c) if it has ``--config-file X``: X exists and ``get_kd_cfg()`` + ``merge_from_file(X)`` +
    ``merge_from_list(opts)`` succeeds, so every documented override key is real; the teacher and
    peer config files the merged config names exist too (a LazyConfig ``.py`` X: ``LazyConfig.load``
    and ``apply_overrides(opts)`` succeed);
(d) on every page but the developers' ``dev/README.md``: be preceded, in its block or in the HTML
    comment lines right above the block, by ``<!-- tested: tests/path.py::test_name -->`` (an
    existing test function, under ``tests/`` or the study's ``projects/MethodStudy/tests/``) or
    ``<!-- tested: make demo -->``. For commands other than ``train_net.py`` at least one named
    test file (or, for ``make demo``, the Makefile/demo sources) must mention the command.

``make ...`` lines and other shell lines are not checked. Besides commands: ``yaml`` blocks must
merge into kd_det's config (unknown keys fail), ``python`` blocks must parse, config keys written
in inline code must exist, and relative links (with their anchors) and the ``tools/``, ``dev/``,
``configs/``, ``kd_det/``, ``tests/`` and ``projects/`` paths named anywhere must exist. Nothing is
trained.
"""

import ast
import functools
import glob
import importlib.util
import json
import os
import re
import shlex
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from typing import List

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = os.path.join(REPO, "docs")
#: Pages outside docs/ that are checked the same way (relative to the repository).
OTHER_PAGES = ("README.md", "tools/README.md", "dev/README.md", "projects/MethodStudy/README.md")
#: Pages whose commands need no ``tested:`` tag: developers' benchmarks and checks.
UNTAGGED_PAGES = ("dev/README.md",)
PAGES = [
    "README.md",
    "getting_started.md",
    "distill_your_detector.md",
    "distill_retinanet.md",
    "own_coco_data.md",
    "online_distillation.md",
    "mixed_sample.md",
    "export_and_deploy.md",
    "multi_gpu.md",
    "troubleshooting.md",
    "tuned_settings.md",
    "performance.md",
    "reproducibility.md",
]
COMMAND_LANGS = ("bash", "sh", "shell")
FENCE_RE = re.compile(r"^\s*(```+|~~~+)\s*([\w+-]*)")
TAG_RE = re.compile(r"<!--\s*tested:\s*(.+?)\s*-->")
ENV_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
#: Packages whose modules docs may run with ``python -m``: kd_det and the method study's.
MODULE_ROOTS = ("kd_det", "method_study")
#: Where the tests that ``tested:`` tags name live.
TEST_DIRS = ("tests/", "projects/MethodStudy/tests/")
# Where ``make demo`` (its set-up included) runs tools: a tool named here is run by the demo.
DEMO_SOURCES = ("Makefile", "tools/demo.py", "kd_det/utils/runs.py")
# Config keys written in inline code, e.g. `MODEL.KD.FEATURE.LEVELS` or `INPUT.MIX.TYPE`.
ROOTS = "MODEL|INPUT|SOLVER|DATASETS|DATALOADER|KD_TRAINER|TEST"
KEY_RE = re.compile(r"(?<![\w.])((?:%s)(?:\.[A-Z][A-Z0-9_]*)+)" % ROOTS)


@dataclass
class Block:
    page: str
    line: int  # 1-based line of the opening fence
    lang: str
    lines: List[str]
    tags_above: List[str] = field(default_factory=list)


@dataclass
class Command:
    page: str
    line: int
    text: str
    argv: List[str]  # after "python": ["tools/x.py", ...] or ["-m", "kd_det.x", ...]
    tags: List[str]

    @property
    def id(self):
        return f"{self.page}:{self.line}"


def _pages():
    return sorted(glob.glob(os.path.join(DOCS, "*.md"))) + [
        os.path.join(REPO, p) for p in OTHER_PAGES
    ]


def parse_blocks(path):
    """Fenced code blocks of a Markdown file, with the ``tested`` tags right above each."""
    with open(path) as f:
        lines = f.read().splitlines()
    page = os.path.relpath(path, REPO)
    blocks, i = [], 0
    while i < len(lines):
        m = FENCE_RE.match(lines[i])
        if m is None:
            i += 1
            continue
        fence, lang = m.group(1), m.group(2).lower()
        tags, j = [], i - 1
        while j >= 0 and lines[j].strip().startswith("<!--"):  # comment lines above the fence
            tags = TAG_RE.findall(lines[j]) + tags
            j -= 1
        body, k = [], i + 1
        while k < len(lines) and not lines[k].strip().startswith(fence[:3]):
            body.append(lines[k])
            k += 1
        blocks.append(Block(page, i + 1, lang, body, tags))
        i = k + 1
    return blocks


def _logical_lines(block):
    """``(line number, text)`` with backslash continuations joined."""
    out, buf, start = [], "", None
    for n, raw in enumerate(block.lines, start=block.line + 1):
        if start is None:
            start = n
        s = raw.rstrip()
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        out.append((start, buf + s))
        buf, start = "", None
    if buf:
        out.append((start, buf))
    return out


def _python_argv(text):
    """``argv`` after the interpreter if ``text`` runs a kd_det tool or module, else None."""
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        raise AssertionError(f"cannot split shell line {text!r}: {e}")
    while tokens and ENV_RE.match(tokens[0]):
        tokens = tokens[1:]
    if len(tokens) < 2 or os.path.basename(tokens[0]) not in ("python", "python3"):
        return None
    if tokens[1].startswith(("tools/", "dev/")):
        return tokens[1:]
    if tokens[1] == "-m" and len(tokens) > 2 and tokens[2].split(".")[0] in MODULE_ROOTS:
        return tokens[1:]
    return None


def collect_commands():
    commands = []
    for path in _pages():
        for block in parse_blocks(path):
            if block.lang not in COMMAND_LANGS:
                continue
            inside = []
            for n, text in _logical_lines(block):
                inside += TAG_RE.findall(text)
                argv = _python_argv(text)
                if argv is not None:
                    tags = block.tags_above + inside
                    commands.append(Command(block.page, n, text.strip(), argv, tags))
    return commands


COMMANDS = collect_commands()


# ------------------------------------------------------------------------------------------------
# Each command's own parser, run as a user runs the command, and stopped once it has parsed
# ------------------------------------------------------------------------------------------------
#: Runs in a subprocess: for each ``[id, argv]`` (``["tools/x.py", ...]`` or ``["-m", "pkg.x",
#: ...]``) it runs the command as ``__main__`` with ``ArgumentParser.parse_args`` replaced by one
#: that checks the arguments (no abbreviated flags) and stops the command, and writes
#: ``{id: {"error": ..., "config_file": ..., "opts": [...]}}`` as JSON to the file it is given.
PARSE_ONLY = r"""
import argparse, contextlib, importlib.util, io, json, os, runpy, sys

class Parsed(BaseException):
    pass

def parse_only(self, args=None, namespace=None):
    args = sys.argv[1:] if args is None else list(args)
    known = set(self._option_string_actions)
    for tok in args:
        flag = tok.split("=", 1)[0]
        if tok.startswith("--") and flag not in known:
            raise Parsed({"error": f"{flag} is not an option of {self.prog} ({sorted(known)})"})
    err = io.StringIO()
    try:
        with contextlib.redirect_stderr(err):
            ns = argparse._original_parse_args(self, args, namespace)
    except SystemExit:
        raise Parsed({"error": f"argument parser rejected {args}: {err.getvalue()}"})
    raise Parsed({"error": None, "config_file": getattr(ns, "config_file", "") or "",
                  "opts": [str(o) for o in (getattr(ns, "opts", None) or [])]})

argparse._original_parse_args = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = parse_only
out = {}
todo, result, cwd = sys.argv[1], sys.argv[2], os.getcwd()
for cid, argv in json.load(open(todo)):
    os.chdir(cwd)  # a command may have moved
    module = argv[1] if argv[0] == "-m" else None
    rest = argv[2:] if module else argv[1:]
    try:
        origin = importlib.util.find_spec(module).origin if module else argv[0]
        source = open(origin).read()
        if "ArgumentParser" not in source and "default_argument_parser" not in source:
            out[cid] = {"error": f"takes no arguments, got {rest}" if rest else None, "opts": []}
            continue
        sys.argv = [origin] + rest
        if module:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
        else:
            runpy.run_path(argv[0], run_name="__main__")
        out[cid] = {"error": "returned without parsing its arguments"}
    except Parsed as p:
        out[cid] = p.args[0]
    except BaseException as e:  # the command failed before its parser: say how
        out[cid] = {"error": f"{type(e).__name__}: {e}"}
json.dump(out, open(result, "w"))
"""


@functools.lru_cache(maxsize=None)
def parsed_commands():
    """``{command id: result}`` of :data:`PARSE_ONLY` for every documented command, from one
    subprocess in the repository root (the commands' own working directory)."""
    with tempfile.TemporaryDirectory() as tmp:
        todo, result = os.path.join(tmp, "todo.json"), os.path.join(tmp, "parsed.json")
        runnable = [c for c in COMMANDS if _exists(c)]
        with open(todo, "w") as f:
            json.dump([[c.id, c.argv] for c in runnable], f)
        # As `python dev/x.py` does, a script's own folder is where its sibling imports resolve.
        folders = sorted({os.path.dirname(c.argv[0]) for c in runnable if c.argv[0] != "-m"})
        env = dict(
            os.environ,
            OMP_NUM_THREADS="1",
            MPLBACKEND="Agg",
            PYTHONPATH=os.pathsep.join(
                [os.path.join(REPO, d) for d in folders] + [os.environ.get("PYTHONPATH", "")]
            ),
        )
        proc = subprocess.run([sys.executable, "-c", PARSE_ONLY, todo, result], cwd=REPO,
                              env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        with open(result) as f:
            return json.load(f)


def _exists(cmd):
    """(a): the script or module of ``cmd`` exists."""
    if cmd.argv[0] == "-m":
        return importlib.util.find_spec(cmd.argv[1]) is not None
    return os.path.isfile(os.path.join(REPO, cmd.argv[0]))


def check_config(config_file, opts):
    """(c): the config file exists and the command's overrides merge into it."""
    from kd_det.config import get_kd_cfg
    from kd_det.modeling.teacher import MODEL_ZOO_PREFIX

    if not config_file and not opts:
        return
    if config_file.endswith(".py"):  # a LazyConfig: it runs when loaded (the page says so)
        from detectron2.config import LazyConfig

        path = os.path.join(REPO, config_file)
        assert os.path.isfile(path), f"--config-file {config_file} does not exist"
        LazyConfig.apply_overrides(LazyConfig.load(path), opts)  # an unknown key raises
        return
    cfg = get_kd_cfg()
    if config_file:
        path = os.path.join(REPO, config_file)
        assert os.path.isfile(path), f"--config-file {config_file} does not exist"
        cfg.merge_from_file(path)
    if opts:
        cfg.merge_from_list(opts)  # an unknown key raises "Non-existent key: ..."
    teacher = cfg.MODEL.KD.TEACHER.CONFIG_FILE
    if teacher and not teacher.startswith(MODEL_ZOO_PREFIX):
        assert os.path.isfile(os.path.join(REPO, teacher)), f"teacher config {teacher} missing"
    for peer in cfg.MODEL.ONLINE_KD.PEERS:
        assert os.path.isfile(os.path.join(REPO, peer)), f"peer config {peer} missing"


def _read(relpath):
    with open(os.path.join(REPO, relpath)) as f:
        return f.read()


def check_tags(cmd, tool_stem):
    """(d): at least one tag; every tag names make demo or an existing test function."""
    if cmd.page in UNTAGGED_PAGES and not cmd.tags:
        return
    assert cmd.tags, (
        f"{cmd.id}: `{cmd.text}` has no <!-- tested: tests/...py::test_name --> or "
        "<!-- tested: make demo --> comment in its block or right above it"
    )
    mentions = []
    for tag in cmd.tags:
        if tag == "make demo":
            mentions.append(any(tool_stem in _read(p) for p in DEMO_SOURCES))
            continue
        assert "::" in tag, f"{cmd.id}: tag {tag!r} is not 'tests/<file>.py::<test>'"
        relpath, name = tag.split("::", 1)
        assert relpath.startswith(TEST_DIRS) and relpath.endswith(".py"), f"{cmd.id}: {tag!r}"
        assert os.path.isfile(os.path.join(REPO, relpath)), f"{cmd.id}: no file {relpath}"
        source = _read(relpath)
        assert re.search(
            rf"^\s*def {re.escape(name)}\(", source, re.M
        ), f"{cmd.id}: {relpath} has no test function {name}"
        mentions.append(tool_stem in source)
    if tool_stem != "train_net":  # train_net is the generic entry; its tags name the feature
        assert any(mentions), f"{cmd.id}: none of {cmd.tags} runs {tool_stem}"


# ------------------------------------------------------------------------------------------------
# Tests
# ------------------------------------------------------------------------------------------------
def test_pages_exist_and_index_links_them():
    for page in PAGES:
        assert os.path.isfile(os.path.join(DOCS, page)), f"docs/{page} is missing"
    index = _read("docs/README.md")
    for page in PAGES[1:]:
        assert f"]({page})" in index, f"docs/README.md does not link {page}"
    assert len(COMMANDS) >= 20, f"only {len(COMMANDS)} commands found in docs/*.md"


@pytest.mark.parametrize("cmd", COMMANDS, ids=[c.id for c in COMMANDS])
def test_documented_command(cmd):
    # (a) the script or module exists
    if cmd.argv[0] == "-m":
        target = cmd.argv[1]
        assert _exists(cmd), f"{cmd.id}: no module {target}"
        stem = target.rsplit(".", 1)[-1]
    else:
        target = cmd.argv[0]
        assert re.fullmatch(r"(tools|dev)/\w+\.py", target), f"{cmd.id}: {target} is not a script"
        assert _exists(cmd), f"{cmd.id}: {target} does not exist"
        stem = os.path.basename(target)[:-3]
    # (d) before anything heavy: the cheapest check fails first
    check_tags(cmd, stem)
    # (b) the command's own parser accepts the arguments
    parsed = parsed_commands()[cmd.id]
    assert parsed["error"] is None, f"{cmd.id}: {target}: {parsed['error']}"
    # (c) config file and overrides
    check_config(parsed.get("config_file", ""), parsed.get("opts", []))


def _blocks(lang):
    return [b for p in _pages() for b in parse_blocks(p) if b.lang == lang]


@pytest.mark.parametrize("block", _blocks("yaml"), ids=lambda b: f"{b.page}:{b.line}")
def test_yaml_snippet_is_a_valid_config_fragment(block):
    from detectron2.config import CfgNode

    from kd_det.config import get_kd_cfg

    data = yaml.safe_load("\n".join(block.lines))
    assert isinstance(data, dict), "a yaml snippet must be a config mapping"
    data.pop("_BASE_", None)
    get_kd_cfg().merge_from_other_cfg(CfgNode(data))  # unknown keys / wrong types raise


@pytest.mark.parametrize("block", _blocks("python"), ids=lambda b: f"{b.page}:{b.line}")
def test_python_snippet_parses(block):
    ast.parse("\n".join(block.lines))


def _inline_code(text):
    text = re.sub(r"^\s*(```|~~~).*?^\s*\1", "", text, flags=re.M | re.S)  # drop fenced blocks
    return re.findall(r"`([^`\n]+)`", text)


def test_config_keys_in_inline_code_exist():
    from kd_det.config import get_kd_cfg

    cfg = get_kd_cfg()
    bad = []
    for path in _pages():
        with open(path) as f:
            spans = _inline_code(f.read())
        for span in spans:
            if "Non-existent" in span:  # a quoted error about a deliberately wrong key
                continue
            for key in KEY_RE.findall(span):
                node = cfg
                for part in key.split("."):
                    if not hasattr(node, "keys") or part not in node:
                        bad.append(f"{os.path.basename(path)}: {key}")
                        break
                    node = node[part]
    assert not bad, "config keys that do not exist: " + ", ".join(sorted(set(bad)))


def _anchors(path):
    """GitHub-style anchors of a Markdown file's headings."""
    with open(path) as f:
        text = re.sub(r"^\s*(```|~~~).*?^\s*\1", "", f.read(), flags=re.M | re.S)
    out = set()
    for heading in re.findall(r"^#+\s+(.+?)\s*$", text, re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower())
        out.add(slug.replace(" ", "-"))
    return out


def test_links_and_repository_paths_exist():
    bad = []
    for path in _pages():
        with open(path) as f:
            text = f.read()
        page = os.path.relpath(path, REPO)
        for target in re.findall(r"\]\(([^)\s]+)\)", text):
            if re.match(r"^(https?:|mailto:)", target):
                continue
            rel, _, anchor = target.partition("#")
            full = os.path.normpath(os.path.join(os.path.dirname(path), rel)) if rel else path
            if not os.path.exists(full):
                bad.append(f"{page}: link {target}")
            elif anchor and full.endswith(".md") and anchor not in _anchors(full):
                bad.append(f"{page}: anchor {target}")
        for rel in re.findall(
            r"(?<![\w/.])((?:tools|dev|configs|kd_det|tests|projects)/[\w./-]+\.(?:py|yaml))", text
        ):
            if not os.path.exists(os.path.join(REPO, rel)):
                bad.append(f"{page}: path {rel}")
    assert not bad, "missing targets: " + ", ".join(bad)
