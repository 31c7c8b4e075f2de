"""The layers: import-linter's contracts hold, every core module is named in them, and the headless modules
(every tuner module outside tuner.tui) load neither textual nor torch when imported for real."""

from __future__ import annotations

import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import ROOT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

APP = "tuner.tui"
HEAVY = ("textual", "torch")  #: what a headless module must not load


def core_modules() -> list[str]:
    """Every module of the console core: tuner and all under it but the app (found on disk, nothing imported)."""
    found = ["tuner"]

    def walk(path: Path, prefix: str) -> None:
        for info in pkgutil.iter_modules([str(path)], prefix):
            if info.name == APP:
                continue
            found.append(info.name)
            if info.ispkg:
                walk(path / info.name.rpartition(".")[2], info.name + ".")

    walk(ROOT / "tuner", "tuner.")
    return sorted(found)


def contracts() -> dict[str, dict]:
    with open(ROOT / "pyproject.toml", "rb") as f:
        return {c["name"]: c for c in tomllib.load(f)["tool"]["importlinter"]["contracts"]}


# -- the contracts -------------------------------------------------------------------------------
def test_import_contracts_hold(capsys):
    from importlinter.cli import lint_imports

    code = lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True)
    out = capsys.readouterr().out
    assert code == 0, out
    assert "Contracts: 4 kept, 0 broken" in out


def test_every_core_module_is_under_the_contracts():
    """A new module outside tuner.tui is a core module: it must be named in the core layer and in both
    forbidden contracts' sources, or the contracts would not look at it."""
    core = core_modules()
    named = contracts()
    layers = [[m.strip() for m in layer.replace("|", ":").split(":")] for layer in
              named["The app above the console core above the workloads"]["layers"]]
    assert layers[0] == [APP] and layers[-1] == ["workloads"]
    # the package itself contains the top layer; a subpackage named in the layer holds its modules (tuner.bench)
    assert sorted(layers[1]) == [m for m in core if m != "tuner" and not any(m.startswith(f"{p}.") for p in layers[1])]
    for name in ("The console core and the workloads never import textual", "The console core never imports torch"):
        contract = named[name]
        assert str(contract.get("as_packages", True)).lower() == "false", name  # sources are single modules
        sources = [m for m in contract["source_modules"] if m.split(".")[0] == "tuner"]
        assert sorted(sources) == core, name
    for contract in named.values():
        assert str(contract.get("allow_indirect_imports", False)).lower() == "false", contract["name"]


# -- the headless modules, imported for real ------------------------------------------------------
# A static graph counts an import inside a function as an import, but cannot prove that a module which
# defers one never runs it on import; these import the modules and look at sys.modules.
_IMPORT_ALL = """
import contextlib, importlib, io, json, sys
heavy, blamed = {heavy!r}, {{}}
sys.argv = ["btune", "--help"]  # tuner.__main__ runs the CLI when imported
for name in {modules!r}:
    with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
        importlib.import_module(name)
    for h in heavy:
        if h in sys.modules and h not in blamed:
            blamed[h] = name
print(json.dumps(blamed))
"""


def _loaded(modules: list[str]) -> dict[str, str]:
    """Heavy module -> the first of ``modules`` whose import loaded it, in one fresh interpreter."""
    res = subprocess.run([sys.executable, "-c", _IMPORT_ALL.format(heavy=HEAVY, modules=modules)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    return json.loads(res.stdout.splitlines()[-1])


@pytest.mark.slow
def test_headless_modules_load_neither_textual_nor_torch():
    assert _loaded(core_modules()) == {}


@pytest.mark.slow
@pytest.mark.parametrize("module", core_modules())
def test_each_headless_module_alone_loads_neither_textual_nor_torch(module):
    assert _loaded([module]) == {}


@pytest.mark.slow
@pytest.mark.parametrize("argv", [["list"], ["list", "--json"], ["run", "dense", "--steps", "x"]])
def test_cli_works_without_textual_or_torch(argv):
    code = ("import sys; sys.modules['textual'] = None; sys.modules['torch'] = None\n"
            "from tuner.cli import main\n"
            f"rc = main({argv!r})\n"
            "sys.exit(rc)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert res.returncode == (2 if "x" in argv else 0), res.stderr
    assert "Traceback" not in res.stderr
