"""Every import, ``kdet.<name>`` and tool command README.md shows runs as shown (in fresh processes).

The names are extracted from the README itself: ``import`` / ``from .. import`` lines of its
python code blocks, ``kdet.a.b`` names in code blocks and inline code, and ``tools/X.py``
commands (``--help`` must run, and every ``--flag`` the README gives that command must be
one the tool accepts).
"""

import json
import os
import re
import subprocess
import sys

import pytest
from _helpers import REPO

README = (REPO / "README.md").read_text()
FENCED = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
INLINE = re.compile(r"`([^`\n]+)`")


def code_blocks(language=None):
    return [body for lang, body in FENCED.findall(README) if language is None or lang == language]


def inline_code():
    return INLINE.findall(FENCED.sub("", README))


def import_lines():
    lines = []
    for block in code_blocks("python"):
        lines += [line.strip() for line in block.splitlines() if re.match(r"\s*(from\s+\S+\s+)?import\s", line)]
    return sorted(set(lines))


def kdet_names():
    text = "\n".join(code_blocks() + inline_code())
    return sorted(set(re.findall(r"(?<![\w/])kdet(?:\.[A-Za-z_]\w*)+", text)))


def tool_commands():
    """``{tool path: set of --flags the README uses with it}``."""
    commands = {}
    for text in ["\n".join(code_blocks())] + inline_code():
        for line in text.replace("\\\n", " ").splitlines():
            for match in re.finditer(r"(tools/\w+\.py)([^;&|]*)", line):
                flags = set(re.findall(r"(?<![\w-])(--[a-z][\w-]*)", match.group(2)))
                commands.setdefault(match.group(1), set()).update(flags)
    return commands


def fresh_python(script):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "recipes")]))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=str(REPO),
                          env=env, timeout=600)


RESOLVE = """
import importlib, json, sys
failures = {}
for line in json.loads(sys.argv[1] if len(sys.argv) > 1 else %r):
    try:
        exec(line, {})
    except Exception as err:
        failures[line] = f"{type(err).__name__}: {err}"
for name in %r:
    parts, obj = name.split("."), None
    for cut in range(len(parts), 0, -1):        # the longest importable module prefix
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
            break
        except ImportError:
            continue
    try:
        for attr in parts[cut:]:
            obj = getattr(obj, attr)
    except AttributeError as err:
        failures[name] = f"AttributeError: {err}"
print(json.dumps(failures))
"""


def test_readme_mentions_something_to_check():
    assert "from kdet.metrics import coco_evaluate" in import_lines() or "kdet.metrics.coco_evaluate" in kdet_names()
    assert len(import_lines()) >= 5 and len(kdet_names()) >= 3 and "tools/train.py" in tool_commands()


def test_readme_imports_and_names_resolve_in_a_fresh_process():
    lines = import_lines() + ["from kdet.metrics import coco_evaluate"]   # the name issue 11 found broken
    proc = fresh_python(RESOLVE % (json.dumps(lines), kdet_names()))
    assert proc.returncode == 0, proc.stderr[-3000:]
    failures = json.loads(proc.stdout.strip().splitlines()[-1])
    assert failures == {}, failures


@pytest.mark.parametrize("tool", sorted(tool_commands()))
def test_readme_tool_commands_accept_their_flags(tool):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run([sys.executable, str(REPO / tool), "--help"], capture_output=True, text=True,
                          cwd=str(REPO), env=env, timeout=600)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    unknown = {flag for flag in tool_commands()[tool] if flag not in proc.stdout}
    assert not unknown, f"README gives {tool} flags its --help does not list: {sorted(unknown)}"
