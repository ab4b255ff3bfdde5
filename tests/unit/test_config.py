import pytest

from components.config import ConfigError, load_params, parse_set
from components.overrides import _top_level_sections, write_overrides


def test_defaults_load_and_cover_every_section(workdir):
    p = load_params()
    assert p.scrape.sources[0].kind == "synthetic"
    assert p.scrape.sources[0].n >= 1000
    assert p.validate_.min_side > 0 and p.register_.model_name == "tinyldm"


@pytest.mark.parametrize("override, expected", [
    ("vae.epoch=3", "unknown key 'vae.epoch'; allowed here: base_channels"),
    ("vae.loss=foo", "vae.loss: Input should be 'mse', 'bce' or 'l1' (got 'foo')"),
    ("vae.epochs=-1", "vae.epochs: Input should be greater than or equal to 1"),
    ("vae.epochs=many", "vae.epochs: Input should be a valid integer"),
    ("vae.crop=30", "vae: crop: 30 is not a multiple of the down factor 4"),
    ("scrape.sources=[{kind: synthetic, n: 0}]", "scrape.sources.0.n: Input should be greater"),
    ("scrape.sources=[{kind: synthetic, bogus: 1}]",
     "unknown key 'scrape.sources.0.bogus'; allowed here: kind, n, seed, size"),
    ("scrape.sources=[{kind: ftp}]", "scrape.sources.0: Input tag 'ftp'"),
    ("labels.split={train: 0.5, val: 0.1, test: 0.1}", "must add up to 1"),
    ("brand.palette={red: '#zz0000', blue: '#0000ff'}", "not a #rrggbb colour"),
])
def test_bad_values_give_one_line_naming_the_key(workdir, override, expected):
    with pytest.raises(ConfigError) as e:
        load_params(overrides=[override])
    msg = str(e.value)
    assert expected in msg and "\n" not in msg


def test_typo_in_params_file(workdir):
    text = (workdir / "params.yaml").read_text().replace("\nocr:", "\nocrr:")
    (workdir / "params.yaml").write_text(text)
    with pytest.raises(ConfigError, match="unknown key 'ocrr'; allowed here: brand"):
        load_params()


def test_invalid_yaml_and_missing_file(workdir):
    (workdir / "params.yaml").write_text("vae: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params()
    with pytest.raises(ConfigError, match="not found"):
        load_params(workdir / "nope.yaml")


def test_parse_set_nests_and_parses_yaml():
    assert parse_set(["a.b=2", "a.c=[1, x]", "d=true"]) == {"a": {"b": 2, "c": [1, "x"]},
                                                           "d": True}
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_set(["novalue"])


def test_write_overrides_keeps_comments_and_refuses_bad_values(workdir):
    path = workdir / "params.yaml"
    write_overrides(path, ["vae.epochs=2", "scrape.sources=[{kind: synthetic, n: 48}]"])
    text = path.read_text()
    assert "# the prototype used 3" in text
    p = load_params(path)
    assert p.vae.epochs == 2 and p.scrape.sources[0].n == 48
    with pytest.raises(ConfigError):
        write_overrides(path, ["vae.epochs=0"])
    assert load_params(path).vae.epochs == 2


def test_write_overrides_leaves_the_sections_it_does_not_set_as_written(workdir):
    path = workdir / "params.yaml"
    before = path.read_text()
    vocabulary = before[before.index("  vocabulary: ["):before.index("]", before.index(
        "  vocabulary: [")) + 1]
    assert vocabulary.count("\n") >= 2  # a flow list over several lines, as shipped
    write_overrides(path, ["unet.steps=7"])
    after = path.read_text()
    assert vocabulary in after  # ruamel alone would put the list on one line
    assert load_params(path).unet.steps == 7
    old, new = _top_level_sections(before), _top_level_sections(after)
    assert list(old) == list(new) and old.pop("unet") != new.pop("unet") and old == new


def _defaults_against(model: type, data: dict, path: str = "") -> list[str]:
    """Where params.yaml lacks a knob of `model`, or the model's own default says another
    value than params.yaml (one line each)."""
    from pydantic import BaseModel
    from pydantic_core import PydanticUndefined

    problems = []
    for name, field in model.model_fields.items():
        key = field.alias or name
        where = f"{path}.{key}" if path else key
        if key not in data:
            problems.append(f"{where}: not in params.yaml")
            continue
        value, ann = data[key], field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel) and isinstance(value, dict):
            problems += _defaults_against(ann, value, where)
            continue
        if field.default is PydanticUndefined:
            continue
        default = field.default
        if isinstance(default, BaseModel):
            default = default.model_dump(mode="json")
        elif isinstance(default, list):
            default = [d.model_dump(mode="json") if isinstance(d, BaseModel) else d
                       for d in default]
        if default != value:
            problems.append(f"{where}: code says {default!r}, params.yaml {value!r}")
    return problems


def test_params_yaml_holds_every_default_and_the_code_agrees(workdir):
    """One place for defaults: every knob is written in params.yaml, every section of it
    validates, and no pydantic default could silently give another value."""
    import yaml

    from components.config import Params

    load_params()  # every section validates
    data = yaml.safe_load(open("params.yaml"))
    assert _defaults_against(Params, data) == []
    data["sampler"]["steps"] = 7  # the check sees a contradiction (known answer)
    assert _defaults_against(Params, data) == ["sampler.steps: code says 20, params.yaml 7"]
