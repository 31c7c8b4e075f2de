"""Refusals before launch, in process: the tables the slow tests run through ``btune`` in a subprocess
(test_cli, test_dense, test_serve_cli, test_tp), run through ``tuner.cli.main`` here: exit 2, one line on
stderr that says why, nothing launched and nothing written. (Were a refusal lost, the run would start a
process, which the quick tier does not allow: conftest fails the test.)"""

from pathlib import Path

import pytest
from support import refused
from test_cli import BAD_INPUT
from test_dense import REFUSED_KNOBS
from test_serve_cli import REFUSED_SERVE
from test_tp import REFUSED_TP


@pytest.mark.parametrize(("args", "words"), BAD_INPUT)
def test_bad_input(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
                   args: list[str], words: str) -> None:
    monkeypatch.chdir(tmp_path)
    assert words in refused(capsys, args)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "words"), REFUSED_KNOBS)
def test_dense_knobs_this_machine_cannot_run(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                             words: str) -> None:
    assert words in refused(capsys, ["run", "dense", *args, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "words"), REFUSED_SERVE)
def test_serve_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], words: str) -> None:
    assert words in refused(capsys, ["run", "serve", "--preset", "tiny", *args, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize(("args", "words"), REFUSED_TP)
def test_tensor_parallel_options(tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str],
                                 words: str) -> None:
    assert words in refused(capsys, ["run", *args, "--out", str(tmp_path)])
    assert not list(tmp_path.iterdir())
