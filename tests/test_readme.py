"""Every snippet in README.md works as written: the Python blocks run (offline, the weights file put in the
cache first), and every `visionzoo` command line parses."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

import visionzoo
from visionzoo import pretrained
from visionzoo.cli import build_parser

README = (Path(__file__).parents[1] / "README.md").read_text()
PYTHON = re.findall(r"```python\n(.*?)```", README, re.S)
BASH = re.findall(r"```bash\n(.*?)```", README, re.S)


def _commands() -> list[list[str]]:
    out = []
    for block in BASH:
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            for part in " ".join(words).split(" && "):
                w = part.split()
                if "visionzoo" in w:  # `visionzoo ...` and `torchrun ... -m visionzoo ...`
                    out.append(w[w.index("visionzoo") + 1:])
    return out


def test_the_first_two_commands_are_unchanged():
    assert BASH[0] == "pip install torch==2.13.0 && pip install -e . && visionzoo bench\n"
    assert BASH[1] == 'pip install torch==2.13.0 && pip install -e ".[dev]" && pytest\n'


@pytest.mark.parametrize("argv", _commands(), ids=lambda a: " ".join(a)[:40])
def test_command_lines_parse(argv):
    build_parser().parse_args(argv)


def test_python_snippets_run(tmp_path, monkeypatch):
    assert PYTHON, "README.md has no python block"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("VISIONZOO_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("VISIONZOO_OFFLINE", "1")  # the test never downloads: the file is put where it would go
    for name in set(re.findall(r'create_model\("(\w+)", pretrained=True', "\n".join(PYTHON))):
        spec = pretrained.get_weights(name)
        torch.manual_seed(0)
        visionzoo.save(visionzoo.create_model(name), pretrained.cache_path(spec))
    for code in PYTHON:
        exec(compile(code, "README.md", "exec"), {})
