"""The house rules that keep the layout true (../shared/DESIGN.md, docs/architecture.md)."""

import ast
import inspect
from pathlib import Path

from components.stages import ENTRIES, entry, stage_names

ROOT = Path(__file__).resolve().parents[2]
CODE = sorted([*(ROOT / "components").rglob("*.py"), *(ROOT / "flows").rglob("*.py")])


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names}
    return found


def test_every_dvc_stage_has_one_entry_named_as_the_stage() -> None:
    assert list(ENTRIES) == stage_names(ROOT / "dvc.yaml")
    for name in ENTRIES:
        func = entry(name)
        assert func.__name__ == name
        assert list(inspect.signature(func).parameters)[0] == "params"


def test_nothing_imports_the_cli_and_components_never_import_flows() -> None:
    for path in CODE:
        imports = _imports(path)
        assert "flows.cli" not in imports, f"{path} imports the CLI module"
        if "components" in path.parts:
            assert not any(i == "flows" or i.startswith("flows.") for i in imports), path


def test_no_module_over_500_lines() -> None:
    long = {str(p.relative_to(ROOT)): n for p in CODE
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long


def test_benches_import_the_package_without_editing_sys_path() -> None:
    for path in (ROOT / "bench").glob("*.py"):
        assert "sys.path" not in path.read_text(), path
