"""`tinyldm run --set KEY=VALUE` and `--profile NAME`: the values written into params.yaml
(so DVC records exactly what ran), keeping the file's comments and the text of every
section no override touches. A profile (profiles/NAME.yaml) is a named set of them."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from components.config import load_params, parse_set
from components.contracts import UserError, atomic_write_text

PROFILES = Path("profiles")


def profile_sets(names: list[str] | None, folder: Path = PROFILES) -> list[str]:
    """The --set values of each named profile, in order: profiles/NAME.yaml maps dotted
    keys to YAML values (`vae.image_size: 128`)."""
    import yaml

    out: list[str] = []
    for name in names or []:
        path = folder / f"{name}.yaml"
        if not path.is_file():
            have = sorted(f.stem for f in folder.glob("*.yaml")) if folder.is_dir() else []
            raise UserError(f"profile {name!r}: no {path}; profiles here: "
                            f"{', '.join(have) or 'none'}")
        sets = yaml.safe_load(path.read_text()) or {}
        if not isinstance(sets, dict):
            raise UserError(f"{path}: write it as dotted keys and values, "
                            "e.g. 'vae.image_size: 128'")
        out += [f"{k}={json.dumps(v)}" for k, v in sets.items()]  # JSON is YAML
    return out


def write_overrides(path: Path | str, overrides: list[str]) -> None:
    """Persist --set values into params.yaml, keeping its comments (ruamel round trip),
    so DVC records exactly what ran."""
    from ruamel.yaml import YAML

    if not overrides:
        return
    load_params(path, overrides)  # validate first: never write a broken params.yaml
    ry = YAML()
    ry.preserve_quotes = True
    ry.width = 4096  # never re-wrap a long line (a template, a prompt)
    ry.indent(mapping=2, sequence=4, offset=2)  # lists stay indented as written
    path = Path(path)
    original = path.read_text()
    doc = ry.load(original)

    def apply(node, over):
        for k, v in over.items():
            if isinstance(v, dict) and isinstance(node.get(k), dict):
                apply(node[k], v)
            else:
                node[k] = v

    over = parse_set(overrides)
    apply(doc, over)
    buf = io.StringIO()
    ry.dump(doc, buf)
    # ruamel re-flows what it re-emits (a flow list written over several lines becomes
    # one): the sections no override touched keep their text exactly as the user wrote it
    before = _top_level_sections(original)
    text = "".join(before[k] if k not in over and k in before else block
                   for k, block in _top_level_sections(buf.getvalue()).items())
    atomic_write_text(path, text)


def _top_level_sections(text: str) -> dict[str | None, str]:
    """A YAML mapping's text split at its top-level keys: {key: its lines} in order, the
    lines before the first key under None."""
    sections: dict[str | None, str] = {None: ""}
    key = None
    for line in text.splitlines(keepends=True):
        if m := re.match(r"([A-Za-z_][\w-]*):", line):
            key = m.group(1)
            sections[key] = ""
        sections[key] += line
    return sections
