"""Help that shows the knobs (issue 17, item 2) and the export trap (item 5), in process (quick tier):
``btune run WORKLOAD --help`` lists the workload's options after the runner's flags, from the declaration the
app's form reads, with defaults that depend on the preset resolved; ``btune list WORKLOAD`` shows one;
``btune sweep --help`` explains value lists; ``btune export RUN --out runs.csv`` writes runs.csv."""

from pathlib import Path

import orjson
import pytest

from tuner import catalog, cli

DATA = Path(__file__).parent / "data" / "runs"
RUN = DATA / "20261121-063414-dense-775d.json"


def help_text(capsys, monkeypatch, *argv: str) -> str:
    monkeypatch.setenv("COLUMNS", "200")  # one line per option: argparse wraps at the terminal's width
    with pytest.raises(SystemExit) as exc:
        cli.main(list(argv))
    assert exc.value.code == 0
    return capsys.readouterr().out


def entry(out: str, flag: str) -> str:
    """An option's entry in argparse's help, its wrapped lines joined."""
    lines = out.splitlines()
    i = next(n for n, ln in enumerate(lines) if ln.lstrip().startswith(flag + " ") or ln.strip() == flag)
    more = [ln.strip() for ln in lines[i + 1:][:8]]
    cont = []
    for ln in more:
        if not ln or ln.startswith("-"):
            break
        cont.append(ln)
    return " ".join([lines[i].strip(), *cont])


@pytest.mark.parametrize("workload", list(catalog.WORKLOADS))
def test_run_help_lists_the_workloads_options_after_the_runners_flags(capsys, monkeypatch, workload):
    out = help_text(capsys, monkeypatch, "run", workload, "--help")
    spec = catalog.get(workload)
    assert out.startswith(f"usage: btune run {workload} [runner flags] [{workload} options]")
    assert spec.description.split(":")[0] in out
    runner_at, options_at = out.index("--sample-hz"), out.index(f"{workload} options (")
    assert runner_at < options_at
    for opt in spec.all_options():  # every declared option, each with its help text
        assert f"  {opt.flag}" in out[options_at:], opt.flag
        assert opt.help.split(" (")[0][:40] in out, opt.flag


def test_run_help_resolves_preset_defaults(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, "run", "dense", "--help")
    assert "default 0 → 8 (preset tiny)" in out  # --batch-size
    out = help_text(capsys, monkeypatch, "run", "dense", "--preset", "llama-3.1-8b", "--help")
    batch, seq = entry(out, "--batch-size"), entry(out, "--seq-len")
    assert "default 0 → 1 (preset llama-3.1-8b)" in batch and "default 0 → 8192 (preset llama-3.1-8b)" in seq
    out = help_text(capsys, monkeypatch, "run", "moe", "--preset=mixtral-8x7b", "-h")
    router = entry(out, "--router")
    assert "default auto → softmax (preset mixtral-8x7b)" in router
    experts = entry(out, "--num-experts")
    assert "default unset → 8 (preset mixtral-8x7b)" in experts


def test_run_help_refuses_an_unknown_preset_in_one_line(capsys):
    assert cli.main(["run", "dense", "--preset", "huge", "--help"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "'huge' is not allowed" in err[0]


def test_sweep_help_explains_value_lists_with_an_example(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, "sweep", "--help")
    assert "comma-separated list of values" in out and "--batch-size 1,2,4" in out
    assert "example:" in out and "btune sweep dense" in out
    out = help_text(capsys, monkeypatch, "sweep", "serve", "--preset", "llama-3.1-8b,tiny", "--help")
    assert "serve options" in out and "with values as lists a,b,c" in out and "--max-batch" in out
    assert "default 0 → 32 (preset llama-3.1-8b)" in out  # the first preset of the list


def test_list_one_workload(capsys):
    assert cli.main(["list", "moe"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("moe  ") and "dense  " not in out and "--top-k" in out
    assert cli.main(["list", "moe", "--preset", "mixtral-8x7b"]) == 0
    top_k = next(ln for ln in capsys.readouterr().out.splitlines() if ln.lstrip().startswith("--top-k"))
    assert "default unset → 2 (preset mixtral-8x7b)" in top_k
    assert cli.main(["list", "moe", "--json"]) == 0
    (doc,) = orjson.loads(capsys.readouterr().out)
    assert doc["name"] == "moe" and next(o for o in doc["options"] if o["name"] == "top-k")["preset_default"] == 2
    assert cli.main(["list", "nosuch"]) == 2
    assert "unknown workload 'nosuch'" in capsys.readouterr().err


def test_list_every_workload_still_works(capsys):
    assert cli.main(["list"]) == 0
    out = capsys.readouterr().out
    assert all(f"{name}  " in out for name in catalog.WORKLOADS)


def test_preset_defaults_cover_the_options_that_say_the_preset_decides():
    for spec in catalog.WORKLOADS.values():
        resolved = spec.preset_defaults()
        for opt in spec.all_options():
            steps_by_load = opt.name == "steps" and spec.name in ("serve", "tp-validate", "perplexity")
            if "the preset's" in opt.help and not steps_by_load:
                assert opt.dest in resolved, (spec.name, opt.name)


def test_export_out_with_a_file_suffix_writes_that_file(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", str(RUN), "--out", "runs.csv"]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "writing runs.csv" in captured.err and len(captured.err.strip().splitlines()) == 1
    text = (tmp_path / "runs.csv").read_text()
    assert text.splitlines()[0] == "run_id,workload,status,started,options,metric,statistic,value,unit"  # csv
    assert cli.main(["export", str(RUN), "-o", "x.prom"]) == 0  # the suffix picks the format
    assert "# TYPE btune_step_seconds summary" in (tmp_path / "x.prom").read_text()
    assert cli.main(["export", str(RUN), "--format", "json", "-o", "y.csv"]) == 0  # --format wins
    assert orjson.loads((tmp_path / "y.csv").read_bytes())[0]["run_id"] == RUN.stem


def test_export_out_as_a_runs_directory_still_finds_ids(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["export", RUN.stem, "--out", str(DATA), "--format", "csv"]) == 0
    assert capsys.readouterr().out.startswith("run_id,")


def test_export_help_says_what_out_does(capsys, monkeypatch):
    out = help_text(capsys, monkeypatch, "export", "--help")
    assert "--out FILE.csv" in " ".join(out.split()) and "taken as the output file" in " ".join(out.split())
