"""Each bad input of benchmarks/bad_inputs.py, in-process: exit status, no traceback, a one-line message that
names the problem and the fix (`python benchmarks/bad_inputs.py` runs the same cases as real processes)."""
from __future__ import annotations

import importlib.util
import sys
import warnings
from pathlib import Path

import pytest

from visionzoo.cli import main

_spec = importlib.util.spec_from_file_location("bad_inputs", Path(__file__).parents[1] / "benchmarks" / "bad_inputs.py")
bad_inputs = sys.modules["bad_inputs"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bad_inputs)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return bad_inputs.prepare(tmp_path_factory.mktemp("bad"))


@pytest.mark.parametrize("case", bad_inputs.CASES, ids=lambda c: c.name)
def test_bad_input(case, files, monkeypatch, capsys):
    argv, env, case = bad_inputs.filled(case, files)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.chdir(files["tmp"])
    with warnings.catch_warnings(record=True) as caught:  # a warning is one more stderr line in a real process
        warnings.simplefilter("always")
        code = main(argv)  # a traceback would be an exception escaping here
    err = capsys.readouterr().err
    assert bad_inputs.check(case, code, err) == [], err
    assert not caught, [str(w.message)[:200] for w in caught]


@pytest.mark.slow
def test_bad_inputs_as_real_processes():
    """The same cases as separate `python -m visionzoo` processes (about 25 torch imports: minutes)."""
    import os
    import subprocess

    root = Path(__file__).parents[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(root / "src"), os.environ.get("PYTHONPATH", "")])}
    p = subprocess.run([sys.executable, str(root / "benchmarks" / "bad_inputs.py")], capture_output=True, text=True,
                       env=env, timeout=3600)
    assert p.returncode == 0, p.stdout + p.stderr
