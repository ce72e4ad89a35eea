"""The engine's shape, checked: one public door, no import circles, a scheduler without tensors.

These read the source (module-level imports, outside `if TYPE_CHECKING:`), so a change that
breaks the layering fails here before it grows into a second scheduler or a hidden circle.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENGINE = ROOT / "engine"
# The backend-free half: no tensor library at import time or run time.
BACKEND_FREE = (
    "engine.scheduler", "engine.phases", "engine.backend", "engine.stream", "engine.options",
    "engine.stats", "engine.errors", "engine.voices", "engine.sampling", "engine.prompt", "engine.text",
    "engine.audio", "engine.checkpoint", "engine.config",
)  # fmt: skip
TENSOR_LIBS = ("torch", "mlx")


def _module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = rel.parts[:-1] if rel.name == "__init__" else rel.parts
    return ".".join(parts)


def _top_level_imports(path: Path) -> set[str]:
    """Modules imported when `path` is imported: module level, not under TYPE_CHECKING."""
    tree = ast.parse(path.read_text())
    out: set[str] = set()

    def visit(nodes: list[ast.stmt]) -> None:
        for node in nodes:
            if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
                visit(node.orelse)
                continue
            if isinstance(node, (ast.If, ast.Try)):
                visit(node.body)
                visit(getattr(node, "orelse", []))
                for h in getattr(node, "handlers", []):
                    visit(h.body)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                out.add(node.module)
                out.update(f"{node.module}.{a.name}" for a in node.names)

    visit(tree.body)
    return out


def _engine_graph() -> dict[str, set[str]]:
    modules = {_module_name(p): p for p in ENGINE.rglob("*.py")}
    return {
        name: {m for m in _top_level_imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }


def test_no_import_circle_in_engine() -> None:
    graph = _engine_graph()
    # A package's __init__ is the public door: it imports its modules, they must not import it.
    for name, deps in graph.items():
        if name != "engine":
            assert "engine" not in deps, f"{name} imports the public door `engine`"
    state: dict[str, int] = {}

    def dfs(node: str, path: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == 1:
                cycle = [*path[path.index(dep) :], dep] if dep in path else [node, dep]
                pytest.fail("import circle: " + " -> ".join(cycle))
            if dep not in state:
                dfs(dep, [*path, dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            dfs(name, [name])


@pytest.mark.parametrize("module", BACKEND_FREE)
def test_backend_free_modules_import_no_tensor_library(module: str) -> None:
    path = ENGINE / (module.split(".", 1)[1].replace(".", "/") + ".py")
    imports = _top_level_imports(path)
    bad = sorted(m for m in imports if m.split(".")[0] in TENSOR_LIBS or m.startswith("engine.torch"))
    bad += sorted(m for m in imports if m.startswith("engine.mlx"))
    assert not bad, f"{module} imports {bad}"


def test_transports_use_only_the_public_door() -> None:
    for path in [*(ROOT / "realtime").rglob("*.py"), *(ROOT / "clients").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):  # function-level imports too
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("engine."):
                pytest.fail(f"{path.relative_to(ROOT)} imports {node.module}: use `from engine import ...`")
            if isinstance(node, ast.Import):
                for a in node.names:
                    assert not a.name.startswith("engine."), f"{path.relative_to(ROOT)} imports {a.name}"


def test_the_product_never_imports_the_tests() -> None:
    for path in [
        *ENGINE.rglob("*.py"),
        *(ROOT / "realtime").rglob("*.py"),
        *(ROOT / "clients").rglob("*.py"),
    ]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom)
                else []
            )
            assert not any(n.split(".")[0] in ("tests", "oracle", "conftest") for n in names), path


def test_engine_files_stay_small() -> None:
    sizes = {p.relative_to(ROOT): len(p.read_text().splitlines()) for p in ENGINE.rglob("*.py")}
    big = {str(p): n for p, n in sizes.items() if n > 600}
    assert not big, f"engine files over 600 lines: {big}"


def test_importing_the_engine_loads_no_tensor_library() -> None:
    code = "import sys, engine; print(sorted(m for m in ('torch', 'mlx') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]", out.stdout
