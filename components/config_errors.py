"""A pydantic ValidationError of params.yaml as one line per problem, each naming the
dotted key and what is allowed there (config.load_params raises it as a ConfigError)."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError


def allowed_keys(root: type[BaseModel], tagged: dict[str, type[BaseModel]], loc: tuple
                 ) -> str:
    """Names of the keys allowed at `loc` (the parent of an unknown key); `tagged`: the
    models of a discriminated union by their tag."""
    node: Any = root
    for part in loc:
        if isinstance(part, int):
            continue
        if node is None and part in tagged:  # discriminated union tag
            node = tagged[part]
            continue
        fields = getattr(node, "model_fields", {})
        f = next((fi for n, fi in fields.items() if (fi.alias or n) == part), None)
        if f is None:
            return ""
        ann = f.annotation
        node = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
    if node is None:
        return ""
    return ", ".join(sorted(fi.alias or n for n, fi in node.model_fields.items()))


def format_errors(err: ValidationError, source: str, root: type[BaseModel],
                  tagged: dict[str, type[BaseModel]]) -> str:
    lines = []
    for e in err.errors():
        raw = tuple(e["loc"])
        # drop the union tag pydantic inserts after a list index: scrape.sources.0.synthetic.n
        loc = tuple(p for i, p in enumerate(raw)
                    if not (i and isinstance(raw[i - 1], int) and p in tagged))
        key = ".".join(str(p) for p in loc) or "(top level)"
        if e["type"] == "extra_forbidden":
            allowed = allowed_keys(root, tagged, raw[:-1])
            lines.append(f"{source}: unknown key '{key}'"
                         + (f"; allowed here: {allowed}" if allowed else ""))
        else:
            msg = e["msg"].removeprefix("Value error, ")
            got = e.get("input")
            shown = "" if isinstance(got, dict | list) or got is None else f" (got {got!r})"
            lines.append(f"{source}: {key}: {msg}{shown}")
    return "; ".join(lines)
