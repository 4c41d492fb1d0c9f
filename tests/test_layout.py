"""The layout of functions/ (design/layout.md): stage folders on floors, a module imports only from its own
floor or below, no circle of imports, providers know nothing of AWS, and nothing lives outside a stage folder.

The checker reads source with `ast` instead of importing it, so deferred imports inside functions count (they
are still a design dependency) and a broken module cannot hide the rest. The synthetic trees at the bottom
prove each check can fail."""

from __future__ import annotations

import ast
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# The floor map of design/layout.md. A new stage folder must be added here on purpose, or the placement check
# fails: where a folder sits decides what it may import.
FLOORS = dict(core=0, providers=1, records=2, calling=3, intake=4, tracking=5, postcall=6, crm=6, insight=6)
AWS_SDKS = {"boto3", "botocore"}
UPWARD_HINT = "move the shared code down to a floor both can import, or hand the work up through a queue"


@dataclass(frozen=True)
class Import:
    importer: str  # dotted module name of the importing file
    path: str  # that file, relative to the repository
    line: int
    text: str  # the statement, for the message
    target: str  # the module it resolves to (a submodule if the imported name is one)


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def stage(module: str) -> str:
    """The folder right under functions/ ("" for the package root itself)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def floor(module: str) -> int | None:
    # The package root runs before every module, so it sits below core and may import nothing of ours.
    return -1 if stage(module) == "" else FLOORS.get(stage(module))


def ours(module: str) -> bool:
    return module == "functions" or module.startswith("functions.")


def scan(root: Path) -> tuple[set[str], list[Import]]:
    """Every module under functions/ and every import statement in it, at any depth of the syntax tree."""
    files = sorted(p for p in (root / "functions").rglob("*.py") if "__pycache__" not in p.parts)
    modules = {module_name(p.relative_to(root)) for p in files}
    found = []
    for path in files:
        rel = path.relative_to(root)
        importer = module_name(rel)
        package = importer if path.name == "__init__.py" else importer.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(rel))):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:  # relative: `.` is the importer's package, each further dot one package up
                    anchor = package.split(".")[: package.count(".") + 2 - node.level]
                    base = ".".join([*anchor, *([node.module] if node.module else [])])
                # `from functions.core import store` depends on the module store, not on the package core.
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in modules else base for a in node.names]
            else:
                continue
            for target in dict.fromkeys(targets):
                found.append(Import(importer, rel.as_posix(), node.lineno, ast.unparse(node), target))
    return modules, found


def floor_violations(root: Path) -> list[str]:
    modules, imports = scan(root)
    problems = []
    for imp in imports:
        src, dst = floor(imp.importer), floor(imp.target)
        if not ours(imp.target) or src is None:
            continue  # an importer in an unmapped folder is reported by the placement check
        where = f"{imp.path}:{imp.line}: `{imp.text}`"
        if imp.target not in modules:
            problems.append(f"{where} imports {imp.target}, which is no module under functions/ (moved or misspelt?)")
        elif dst is not None and dst > src:
            problems.append(
                f"{where}: {stage(imp.importer) or 'the package root'} (floor {src}) imports "
                f"{stage(imp.target)}/ (floor {dst}), a higher floor; {UPWARD_HINT}"
            )
    return problems


def import_circles(root: Path) -> list[str]:
    _, imports = scan(root)
    graph: dict[str, set[str]] = {}
    edges: dict[tuple[str, str], Import] = {}  # the first statement behind each edge, to name in the message
    for imp in imports:
        if ours(imp.target) and imp.target != imp.importer:
            graph.setdefault(imp.importer, set()).add(imp.target)
            edges.setdefault((imp.importer, imp.target), imp)
    circles = set()
    for start in graph:  # the shortest circle through each module; one rotation of each is kept
        came_from, todo = {}, deque([start])
        while todo and start not in came_from:
            for succ in sorted(graph.get(node := todo.popleft(), ())):
                if succ not in came_from:
                    came_from[succ] = node
                    todo.append(succ)
        if start in came_from:
            circle = [start]
            while (prev := came_from[circle[0]]) != start:
                circle.insert(0, prev)
            first = circle.index(min(circle))
            circles.add(tuple(circle[first:] + circle[:first]))
    problems = []
    for circle in sorted(circles):
        steps = [edges[(a, b)] for a, b in zip(circle, circle[1:] + circle[:1], strict=True)]
        chain, where = " -> ".join([*circle, circle[0]]), "".join(f"    {e.path}:{e.line}: `{e.text}`\n" for e in steps)
        problems.append(f"import circle {chain} (deferred imports count too):\n{where}  break one: {UPWARD_HINT}")
    return problems


def aws_in_providers(root: Path) -> list[str]:
    _, imports = scan(root)
    return [
        f"{imp.path}:{imp.line}: `{imp.text}`: providers/ know HTTP and the provider's wire format and "
        f"nothing of DynamoDB or SQS; do the AWS part in records/ or in the stage that calls the provider"
        for imp in imports
        if stage(imp.importer) == "providers" and imp.target.partition(".")[0] in AWS_SDKS
    ]


def misplaced(root: Path) -> list[str]:
    entries = sorted((root / "functions").iterdir())
    folders = [e.name for e in entries if e.is_dir() and e.name != "__pycache__" and e.name not in FLOORS]
    strays = [e.name for e in entries if e.suffix == ".py" and e.name != "__init__.py"]
    return [
        f"functions/{name} sits in the functions/ root: move it into the stage folder it belongs to" for name in strays
    ] + [
        f"functions/{name}/ is on no floor: place it deliberately (the floor map in design/layout.md and FLOORS in "
        f"tests/test_layout.py) or move its modules into a stage folder"
        for name in folders
    ]


CHECKS = [floor_violations, import_circles, aws_in_providers, misplaced]


# One test per rule, so a failure names the rule; all problems of a rule are listed at once.
@pytest.mark.parametrize("check", CHECKS, ids=lambda check: check.__name__)
def test_the_real_tree_keeps_the_layout(check):
    problems = check(ROOT)
    assert not problems, f"{len(problems)} layout problem(s):\n" + "\n".join(problems)


# --- the checker itself, on synthetic trees -----------------------------------------------------------------


def tree(tmp_path: Path, files: dict[str, str]) -> Path:
    """A fake repository whose functions/ holds `files` (paths relative to functions/)."""
    for rel, source in {"__init__.py": "", **files}.items():
        (tmp_path / "functions" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "functions" / rel).write_text(source, encoding="utf-8")
    return tmp_path


def test_a_clean_tree_passes(tmp_path):
    files = {
        "core/store.py": "import json\n",
        "providers/beeline/client.py": "from functions.core import store\n",
        "calling/dialer.py": "from functions.providers.beeline import client\nfrom . import schedule\n",
        "calling/schedule.py": "from ..core.store import json\n",
    }
    root = tree(tmp_path, files)
    assert [p for check in CHECKS for p in check(root)] == []


def test_an_upward_import_is_named_with_file_line_and_statement(tmp_path):
    files = {
        "core/store.py": "import os\n\n\ndef put():\n    from ..calling import dialer\n",
        "calling/dialer.py": "import functions.calling.gone\n",
    }
    root = tree(tmp_path, files)
    assert floor_violations(root) == [  # files in path order: calling/ before core/
        "functions/calling/dialer.py:1: `import functions.calling.gone` imports functions.calling.gone, which is no "
        "module under functions/ (moved or misspelt?)",
        "functions/core/store.py:5: `from ..calling import dialer`: core (floor 0) imports calling/ (floor 3), "
        f"a higher floor; {UPWARD_HINT}",
    ]


def test_a_circle_through_a_deferred_import_is_named_in_order(tmp_path):
    files = {
        "calling/dialer.py": "def f():\n    from functions.tracking import tracker\n",
        "tracking/tracker.py": "from functions.calling import dialer\n",
    }
    root = tree(tmp_path, files)
    [problem] = import_circles(root)
    assert problem.startswith(
        "import circle functions.calling.dialer -> functions.tracking.tracker -> "
        "functions.calling.dialer (deferred imports count too):\n    functions/calling/dialer.py:2: "
    )
    assert "functions/tracking/tracker.py:1: `from functions.calling import dialer`" in problem


def test_aws_sdks_in_providers_are_reported(tmp_path):
    files = {
        "providers/beeline/client.py": "import boto3\n",
        "providers/salesrender/orders.py": "def f():\n    from botocore import config\n",
        "records/calls.py": "import boto3\n",  # records/ may use AWS; only providers/ may not
    }
    root = tree(tmp_path, files)
    found = [p.split("`")[0] for p in aws_in_providers(root)]
    assert found == ["functions/providers/beeline/client.py:1: ", "functions/providers/salesrender/orders.py:2: "]


def test_a_stray_module_and_an_unmapped_folder_are_reported(tmp_path):
    root = tree(tmp_path, {"helpers.py": "", "reports/daily.py": "", "core/x.py": ""})
    assert [p.split(" ")[0] for p in misplaced(root)] == ["functions/helpers.py", "functions/reports/"]
