"""Bad input ends in one clear line and exit code 2, with nothing half-written."""

import pytest

from flows.cli import main


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err.startswith("tinyldm: error: ") and "\n" not in err, err
    return err


def test_unknown_stage(workdir, capsys):
    assert main(["stage", "trian"]) == 2
    assert "unknown stage 'trian'; stages: scrape, ocr, validate" in _err(capsys)


def test_params_typo_via_set(workdir, capsys):
    assert main(["params", "--set", "unet.stepz=3"]) == 2
    assert "unknown key 'unet.stepz'; allowed here:" in _err(capsys)


def test_params_prints_validated_values(workdir, capsys):
    assert main(["params", "--set", "vae.epochs=3"]) == 0
    assert "epochs: 3" in capsys.readouterr().out


def test_empty_and_missing_source_folder(workdir, capsys):
    (workdir / "empty").mkdir()
    assert main(["stage", "scrape", "--set",
                 f"scrape.sources=[{{kind: folder, path: '{workdir / 'empty'}'}}]"]) == 2
    assert "has no files matching" in _err(capsys)
    assert main(["stage", "scrape", "--set",
                 "scrape.sources=[{kind: folder, path: /no/such/dir}]"]) == 2
    assert "folder /no/such/dir does not exist" in _err(capsys)
    assert not (workdir / "data" / "raw").exists()


def test_unwritable_output_dir(workdir, capsys):
    (workdir / "data").write_text("a file where the data folder should be")
    assert main(["stage", "scrape", "--set", "scrape.sources=[{kind: synthetic, n: 2}]"]) == 2
    assert "data: cannot write there" in _err(capsys)


def test_stage_before_its_inputs_exist(workdir, capsys):
    assert main(["stage", "labels"]) == 2
    assert "manifest.parquet: missing; run the stage that writes it first" in _err(capsys)


def test_run_refuses_bad_set_without_touching_params(workdir, capsys):
    before = (workdir / "params.yaml").read_text()
    assert main(["run", "--set", "vae.loss=huber"]) == 2
    assert "vae.loss" in _err(capsys)
    assert (workdir / "params.yaml").read_text() == before


def test_labels_and_registry_verbs_fail_in_one_line(workdir, capsys, monkeypatch):
    assert main(["labels", "import"]) == 2
    assert "name the Label Studio export" in _err(capsys)
    assert main(["labels", "import", "nope.json"]) == 2
    assert "nope.json: cannot read it" in _err(capsys)
    assert main(["labels", "stats"]) == 2
    assert "captions.parquet: missing" in _err(capsys)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{workdir}/m.db")
    for verb in (["models"], ["promote", "3"], ["rollback"], ["serve"]):
        assert main(verb) == 2, verb
        assert "no model registered yet; run `tinyldm run` first" in _err(capsys)


@pytest.mark.parametrize("verb", ["run", "stage", "generate", "params", "models", "labels"])
def test_every_verb_accepts_set(verb):
    from flows.cli import build_parser

    p = build_parser()
    extra = {"stage": ["scrape"], "generate": ["x", "--out", "x.png"],
             "labels": ["stats"]}.get(verb, [])
    args = p.parse_args([verb, *extra, "--set", "vae.epochs=2"])
    assert args.set == ["vae.epochs=2"]
