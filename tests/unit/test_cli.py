"""The `tinyldm` command: bad input ends in one clear line and exit code 1, with nothing
half-written; a mistyped command line is a usage error, exit code 2; every verb takes
--set and --params."""

import re
from importlib import metadata
from pathlib import Path

import pytest
import typer
import yaml

from flows.cli import app, main

ROOT = Path(__file__).resolve().parents[2]
ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyldm: error: ") and "\n" not in err, err
    return err


def _verbs(group=None, prefix=()) -> list[tuple[str, ...]]:
    """Every command of the app, e.g. ("run",), ("labels", "import")."""
    group = group or typer.main.get_command(app)
    out = []
    for name, cmd in sorted(group.commands.items()):
        sub = getattr(cmd, "commands", None)
        out += _verbs(cmd, (*prefix, name)) if sub is not None else [(*prefix, name)]
    return out


# ---------------------------------------------------------------- the command line
def test_version(capsys):
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"tinyldm {metadata.version('tinyldm')}\n"


def test_stage_help_lists_every_stage_of_dvc_yaml(capsys):
    assert main(["stage", "--help"]) == 0
    out = ANSI.sub("", capsys.readouterr().out)
    stages = list(yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"])
    assert stages
    for name in stages:
        assert re.search(rf"\b{name}\b", out), (name, out)


def test_usage_errors_exit_2_in_typers_words(capsys):
    assert main(["stage", "nosuchstage"]) == 2
    err = capsys.readouterr().err
    assert "nosuchstage" in err and "tinyldm: error:" not in err, err
    assert main(["labels", "import"]) == 2  # no FILE
    err = capsys.readouterr().err
    assert "missing argument" in err.lower() and "tinyldm: error:" not in err, err
    assert main(["params", "--sett", "vae.epochs=2"]) == 2
    assert "--sett" in capsys.readouterr().err


def test_a_user_error_is_one_line_and_exit_1(workdir, capsys):
    assert main(["params", "--set", "unet.stepz=3"]) == 1
    captured = capsys.readouterr()
    assert captured.err.count("\n") == 1 and captured.out == "", captured
    assert "unknown key 'unet.stepz'; allowed here:" in captured.err


def test_ctrl_c_is_one_line_and_exit_130(workdir, capsys, monkeypatch):
    def interrupted(params):
        raise KeyboardInterrupt

    monkeypatch.setattr("components.labelling.labels.stats", interrupted)
    assert main(["labels", "stats"]) == 130
    assert capsys.readouterr().err == ("tinyldm: interrupted; finished stages are kept, run "
                                       "again to resume\n")


@pytest.mark.parametrize("verb", _verbs(), ids=" ".join)
def test_every_verb_takes_set_and_params(verb, workdir, capsys):
    """--set and --params reach the params loader of every verb, before it does anything."""
    args = {("stage",): ["scrape"], ("generate",): ["a red square", "--out", "x.png"],
            ("promote",): ["3"], ("schedule",): ["--cron", "0 3 * * 1"],
            ("labels", "import"): ["export.json"]}.get(verb, [])
    assert main([*verb, *args, "--set=vae.epochz=2"]) == 1
    assert "unknown key 'vae.epochz'" in _err(capsys)
    assert main([*verb, *args, "--set", "vae.epochs=2", "--params", "other.yaml"]) == 1
    assert "other.yaml: not found" in _err(capsys)
    assert not (workdir / "x.png").exists()


def test_models_is_a_plain_table_when_not_a_terminal(workdir, capsys, monkeypatch):
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    rows = [{"version": 2, "aliases": "champion", "gate": "passed", "fd": 12.3456,
             "vae_psnr": None, "commit": "abcdef12"},
            {"version": 1, "aliases": "", "gate": "rejected: fd worse", "fd": 15.0,
             "vae_psnr": 28.0, "commit": "12345678"}]
    monkeypatch.setattr("components.ship.registry.list_models", lambda params: rows)
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out, repr(out)
    header, rule, *lines = out.splitlines()
    assert header.split() == list(rows[0]) and set(rule) == {"─"}
    assert [line.split() for line in lines] == [  # one line a version, 4 significant digits
        ["2", "champion", "passed", "12.35", "-", "abcdef12"],
        ["1", "-", "rejected:", "fd", "worse", "15", "28", "12345678"]]


# ---------------------------------------------------------------- bad input, one line
def test_params_typo_via_set(workdir, capsys):
    assert main(["params", "--set", "unet.stepz=3"]) == 1
    assert "unknown key 'unet.stepz'; allowed here:" in _err(capsys)


def test_params_prints_validated_values(workdir, capsys):
    assert main(["params", "--set", "vae.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_empty_and_missing_source_folder(workdir, capsys):
    (workdir / "empty").mkdir()
    assert main(["stage", "scrape", "--set",
                 f"scrape.sources=[{{kind: folder, path: '{workdir / 'empty'}'}}]"]) == 1
    assert "has no files matching" in _err(capsys)
    assert main(["stage", "scrape", "--set",
                 "scrape.sources=[{kind: folder, path: /no/such/dir}]"]) == 1
    assert "folder /no/such/dir does not exist" in _err(capsys)
    assert not (workdir / "data" / "raw").exists()


def test_unwritable_output_dir(workdir, capsys):
    (workdir / "data").write_text("a file where the data folder should be")
    assert main(["stage", "scrape", "--set", "scrape.sources=[{kind: synthetic, n: 2}]"]) == 1
    assert "data: cannot write there" in _err(capsys)


def test_stage_before_its_inputs_exist(workdir, capsys):
    assert main(["stage", "labels"]) == 1
    assert "manifest.parquet: missing; run the stage that writes it first" in _err(capsys)


def test_run_refuses_bad_set_without_touching_params(workdir, capsys):
    before = (workdir / "params.yaml").read_text()
    assert main(["run", "--set", "vae.loss=huber"]) == 1
    assert "vae.loss" in _err(capsys)
    assert (workdir / "params.yaml").read_text() == before


def test_labels_and_registry_verbs_fail_in_one_line(workdir, capsys, monkeypatch):
    assert main(["labels", "import", "nope.json"]) == 1
    assert "nope.json: cannot read it" in _err(capsys)
    assert main(["labels", "stats"]) == 1
    assert "captions.parquet: missing" in _err(capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/m.db")
    for verb in (["models"], ["promote", "3"], ["rollback"], ["serve"]):
        assert main(verb) == 1, verb
        assert "no model registered yet; run `tinyldm run` first" in _err(capsys)


def test_the_run_summary_shows_the_evaluations_numbers(workdir) -> None:
    """Known answers: each line reads the key evaluate writes (a renamed metric would show
    n/a, as the text recall once did)."""
    from components.contracts import metrics_path, write_json
    from flows.pipeline import summary

    write_json(metrics_path("evaluate"), {
        "fd": 0.75, "kid": 0.0023, "detail_ratio_800": 1.84, "text_word_recall": 0.125,
        "text_word_recall_real": 0.486, "text_exact_typeset": 1.0,
        "prompt_adherence_background": 1.0})
    write_json(metrics_path("vae"), {"val_psnr": 28.54})
    text = summary([{"stage": "vae", "ran": True, "seconds": 3.0}])
    assert "FD 0.750, KID 0.0023, detail at 800 px 1.84" in text
    assert "word recall 0.125 (real images 0.486), typeset exact 1.000" in text
    assert "VAE PSNR:     28.54 dB" in text and "background 1.000" in text
