"""docs/ARCHITECTURE.md is complete and true (issue 18 point 7).

- Every module under ``resunet/`` has its line in the layout, and the layout names no module that is
  gone.
- No module imports a higher floor, or a sibling on its own floor: the floors are read from the layout
  itself (the number beside each top-level module and sub-package), imports are parsed with ``ast``
  (imports inside functions count the same), and the only exception is the one the document states
  (training -> inference, for held-out prediction).
- The document points to no file outside the repository.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "ARCHITECTURE.md"
PACKAGE = REPO / "resunet"
#: (importing unit, imported unit) pairs allowed upwards; each must be stated in the document
DOCUMENTED_EXCEPTIONS = {("training", "inference"): "**`training` may import `inference`**"}


def _layout() -> tuple[set[str], dict[str, int]]:
    """(paths named in the layout block, relative to the repository; floor of each resunet unit)."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"^```\n(resunet/.*?)^```$", text, re.S | re.M)
    assert match, "docs/ARCHITECTURE.md has no layout block starting with resunet/"
    paths: set[str] = set()
    floors: dict[str, int] = {}
    parents: dict[int, str] = {}
    for line in match.group(1).splitlines():
        indent = len(line) - len(line.lstrip(" "))
        tokens = line.split()
        if not tokens or indent > 4 or indent % 2 or not re.fullmatch(r"[\w.]+/?", tokens[0]):
            continue  # a continuation line of a description
        name = tokens[0]
        path = (parents[indent - 2] if indent else "") + name
        if name.endswith("/"):
            parents[indent] = path
        paths.add(path.rstrip("/"))
        if indent == 2 and parents.get(0) == "resunet/" and len(tokens) > 1 and tokens[1].isdigit():
            floors[name.rstrip("/").removesuffix(".py")] = int(tokens[1])
    floors.setdefault("resunet", floors.pop("__init__", 0))
    return paths, floors


def _modules() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if "__pycache__" not in p.parts)


def _unit(dotted: str) -> str:
    """``resunet.serve.jobs`` -> ``serve``; ``resunet`` -> ``resunet``; ``resunet.errors`` -> ``errors``."""
    parts = dotted.split(".")
    return parts[1] if len(parts) > 1 else "resunet"


def _module_name(path: Path, root: Path = REPO) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, root: Path = REPO) -> list[tuple[int, str]]:
    """(line, imported module) for every resunet import in ``path``, relative imports resolved."""
    name = _module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                found.append((node.lineno, ".".join(base + ([node.module] if node.module else []))))
            else:
                found.append((node.lineno, node.module or ""))
    return [(line, mod) for line, mod in found if mod == "resunet" or mod.startswith("resunet.")]


def _unnamed(modules: list[Path], named: set[str], root: Path = REPO) -> list[str]:
    rel = (p.relative_to(root).as_posix() for p in modules)
    return sorted(m for m in rel if m not in named and not m.startswith("resunet/data/"))


def _violations(modules: list[Path], floors: dict[str, int], root: Path = REPO) -> list[str]:
    wrong = []
    for path in modules:
        src = _unit(_module_name(path, root))
        for line, target in _imports(path, root):
            dst = _unit(target)
            if dst == src or (src, dst) in DOCUMENTED_EXCEPTIONS:
                continue
            if dst not in floors or floors[dst] >= floors[src]:
                wrong.append(f"{path.relative_to(root)}:{line} imports {target} (floor {floors.get(dst)}) from"
                             f" {src} (floor {floors[src]})")
    return wrong


def test_every_module_is_named_in_the_layout_and_every_named_module_exists():
    named, _ = _layout()
    modules = {p.relative_to(REPO).as_posix() for p in _modules()}
    missing = _unnamed(_modules(), named)
    assert not missing, f"docs/ARCHITECTURE.md's layout lacks a line for: {', '.join(missing)}"
    stale = sorted(p for p in named if p.startswith("resunet/") and p.endswith(".py") and p not in modules)
    assert not stale, f"docs/ARCHITECTURE.md's layout names modules that do not exist: {', '.join(stale)}"
    other = sorted(p for p in named if p.startswith("resunet/") and not (REPO / p).exists())
    assert not other, f"docs/ARCHITECTURE.md's layout names missing paths: {', '.join(other)}"


def test_every_unit_has_a_floor():
    _, floors = _layout()
    units = {_unit(_module_name(p)) for p in _modules()}
    assert not sorted(units - set(floors)), f"no floor in the layout for {sorted(units - set(floors))}"


def test_no_module_imports_a_higher_floor_or_a_sibling():
    _, floors = _layout()
    text = DOC.read_text(encoding="utf-8")
    for pair, sentence in DOCUMENTED_EXCEPTIONS.items():
        assert sentence in text, f"the exception {pair} is allowed here but not stated in docs/ARCHITECTURE.md"
    wrong = _violations(_modules(), floors)
    assert not wrong, "imports against the floors of docs/ARCHITECTURE.md:\n" + "\n".join(wrong)


def test_the_checks_see_a_violation(tmp_path):
    """The checks above are not vacuous: an unlisted io module importing the CLI (inside a function, and
    relatively) or a sibling on its floor is reported."""
    named, floors = _layout()
    probe = tmp_path / "resunet" / "io" / "probe.py"
    probe.parent.mkdir(parents=True)
    probe.write_text("from . import volume\n\ndef f():\n    from resunet.cli import main\n    from ..nets import ResUNet\n"
                     "    from ..evaluation import metrics\n    return main\n", encoding="utf-8")
    wrong = _violations([probe], floors, root=tmp_path)
    assert [w.split(" from ")[0] for w in wrong] == [
        "resunet/io/probe.py:4 imports resunet.cli (floor 8)",
        "resunet/io/probe.py:5 imports resunet.nets (floor 3)",
        "resunet/io/probe.py:6 imports resunet.evaluation (floor 3)",
    ]
    sibling = tmp_path / "resunet" / "serve" / "probe.py"
    sibling.parent.mkdir(parents=True)
    sibling.write_text("import resunet.webui.auth\n", encoding="utf-8")
    assert _violations([sibling], floors, root=tmp_path) == [
        "resunet/serve/probe.py:1 imports resunet.webui.auth (floor 7) from serve (floor 7)"]
    assert _unnamed([probe, sibling], named, root=tmp_path) == ["resunet/io/probe.py", "resunet/serve/probe.py"]


def test_the_document_points_to_no_file_outside_the_repository():
    text = DOC.read_text(encoding="utf-8")
    assert "shared/" not in text and "/work/" not in text and "DESIGN.md" not in text
    for target in re.findall(r"\]\(([^)#\s]+)", text):
        if re.match(r"[a-z]+://", target):
            continue
        resolved = (DOC.parent / target).resolve()
        assert resolved.is_relative_to(REPO) and resolved.exists(), f"docs/ARCHITECTURE.md links to {target}"
    for name in re.findall(r"`((?:docs|bench|tests|data|app)/[\w./-]+)`", text):
        if "*" in name or "<" in name:
            continue
        assert (REPO / name).exists(), f"docs/ARCHITECTURE.md names {name}, which is not in the repository"
