"""Run directories written before the issue-19 redesign still load, evaluate, compress and
resume, with the numbers that the code of their time reported (tests/fixtures/README.md)."""

from __future__ import annotations

import json
import math
import shutil
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import pytest

from vbdropout.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")  # the fixtures were written with one thread

FIXTURES = Path(__file__).parent / "fixtures" / "v0"
EXPECTED = json.loads((FIXTURES / "expected.json").read_text())


def _today(method: str, report: dict[str, Any]) -> dict[str, Any]:
    """A compression report as the code of its time wrote it, with the changes made since
    on purpose: structured VBD's model, without Gaussian-weight layers, reports no log α
    cut (``None``, 2026-12-08) instead of ``"per-layer"``."""
    return {**report, "threshold": None} if method == "vbd_structured" else report


def _same(got: Any, want: Any, where: str = "") -> None:
    """``got`` equals ``want`` down to its leaves; floats to a relative 1e-6."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and sorted(got) == sorted(want), where
        for key in want:
            _same(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert math.isclose(got, want, rel_tol=1e-6, abs_tol=1e-9), f"{where}: {got} != {want}"
    else:
        assert got == want, where


def _old_run(method: str, tmp_path: Path) -> Path:
    """A private copy of the fixture run directory (the commands write into it)."""
    return Path(shutil.copytree(FIXTURES / method, tmp_path / method))


def _json_of(capsys: pytest.CaptureFixture[str], argv: list[str]) -> dict[str, Any]:
    assert main(argv) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out.splitlines()[-1])


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_an_old_run_evaluates_to_its_recorded_numbers(method, tmp_path, capsys):
    result = _json_of(
        capsys, ["eval", str(_old_run(method, tmp_path)), "--device", "cpu", "--json"]
    )
    assert result["method"] == method
    _same({k: result[k] for k in EXPECTED[method]["eval"]}, EXPECTED[method]["eval"])


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_an_old_run_compresses_to_its_recorded_report(method, tmp_path, capsys):
    pytest.importorskip("safetensors")
    out = tmp_path / "compressed"
    report = _json_of(
        capsys, ["compress", str(_old_run(method, tmp_path)), "--out", str(out), "--json"]
    )
    want = dict(EXPECTED[method]["compress"])
    want["weights"] = _today(method, want["weights"])
    files = [f for f in want.pop("files") if f != "shrunk.onnx" or find_spec("onnx")]
    assert sorted(report["files"]) == files
    assert all((out / name).is_file() for name in files)
    _same({k: report[k] for k in want}, want)


@pytest.mark.parametrize("method", sorted(EXPECTED))
def test_an_old_interrupted_run_resumes_to_the_uninterrupted_numbers(method, tmp_path, capsys):
    run = _old_run(method, tmp_path)
    summary = _json_of(capsys, ["train", "--resume", "--out", str(run), "--json"])
    want = {**EXPECTED[method]["resumed"]}
    want["compression"] = _today(method, want["compression"])
    _same(
        {k: summary[k] for k in ("test_error", "test_nll", "compression")},
        {k: want[k] for k in ("test_error", "test_nll", "compression")},
    )
    history = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    for row in history:
        del row["seconds"]
        assert row.pop("replicas", 1) == 1  # the epochs trained now say they trained alone
    _same(history, want["history"])
