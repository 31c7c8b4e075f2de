"""The core/UI split: import-linter's contracts hold, and the headless parts run without textual or torch."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_import_contracts_hold():
    exe = shutil.which("lint-imports") or str(Path(sys.executable).parent / "lint-imports")
    res = subprocess.run([exe, "--config", str(ROOT / "pyproject.toml")], capture_output=True, text=True, cwd=ROOT)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Contracts: 2 kept, 0 broken" in res.stdout


@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["run", "dense", "--steps", "x"]])
def test_cli_works_without_textual_or_torch(argv):
    code = ("import sys; sys.modules['textual'] = None; sys.modules['torch'] = None\n"
            "from tuner.cli import main\n"
            f"rc = main({argv!r})\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == (2 if "x" in argv else 0), res.stderr
    assert "Traceback" not in res.stderr
