"""Engine modules use each other's public names only: a leading underscore means
"this module's business", and importing it elsewhere is how copies of one concept
started to drift apart (issue: one set lifecycle)."""

from __future__ import annotations

import ast
from pathlib import Path

ENGINE = Path(__file__).resolve().parents[2] / "plugins" / "module_utils"


def private_imports(path: Path) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.ImportFrom) and node.level >= 1:
            found.extend(
                "%s: from %s%s import %s"
                % (path.name, "." * node.level, node.module or "", alias.name)
                for alias in node.names
                if alias.name.startswith("_") and not alias.name.startswith("__")
            )
        if isinstance(node, ast.Attribute) and node.attr.startswith("_"):
            base = node.value
            # module._name on a module imported with "from . import module"
            if isinstance(base, ast.Name) and base.id in _sibling_modules(path):
                found.append("%s: %s.%s" % (path.name, base.id, node.attr))
    return found


def _sibling_modules(path: Path) -> set[str]:
    return {p.stem for p in path.parent.glob("*.py")} - {path.stem}


def test_no_engine_module_imports_another_ones_private_names():
    offenders = [line for path in sorted(ENGINE.glob("*.py")) for line in private_imports(path)]
    assert offenders == []


def test_the_check_sees_a_private_import(tmp_path):
    (tmp_path / "a.py").write_text("def _x():\n    pass\n")
    (tmp_path / "b.py").write_text("from .a import _x\nfrom . import a\na._x()\n")
    assert private_imports(tmp_path / "b.py") == ["b.py: from .a import _x", "b.py: a._x"]
