"""The code's shape, checked so that it cannot drift: every module of src/preftune has a test file that mirrors
it (``test_<module>.py``, ``test_<package>_<module>.py`` or ``test_<package>.py``, else one named in
:data:`MIRRORS`), and no import cycle joins its modules (function-level imports included)."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SRC = REPO / "src"
TESTS = REPO / "tests"

#: Modules whose tests live in a file of another name: module (relative to src/preftune) -> test file.
MIRRORS = {
    "_coercion.py": "test_configio.py",  # moved from _configio.py; tested by tests/test_configio.py
    "checkpoint_files.py": "test_checkpoint.py",
    "checkpoint_state.py": "test_checkpoint.py",  # moved from checkpoint.py; tested by tests/test_checkpoint.py
    "config_checks.py": "test_config.py",  # moved from config.py; tested by tests/test_config.py
    "data/entry.py": "test_data_load.py",
    "data/errors.py": "test_data_load.py",
    "data/digest.py": "test_data_cache.py",
    "data/hub.py": "test_data_sources.py",
    "data/spec.py": "test_data_load.py",
    "data/textfiles.py": "test_data_load.py",
    "data/unpaired_load.py": "test_data_unpaired.py",
    "fingerprint.py": "test_runfolder.py",
    "geneval.py": "test_loop.py",
    "loopspec.py": "test_loop.py",
    "model/arch.py": "test_architectures.py",
    "model/flex.py": "test_model_attention.py",  # values on CPU; gradients in test_gpu.py
    "model/probe.py": "test_model_layout.py",
    "modelcard.py": "test_trainer.py",
    "runlock.py": "test_runfolder.py",  # moved from runfolder.py; tested by tests/test_runfolder.py
    "sampling_backends.py": "test_sampling.py",  # moved from sampling.py; tested by tests/test_sampling.py
}


def _modules() -> list[Path]:
    return sorted(
        p.relative_to(SRC / "preftune")
        for p in (SRC / "preftune").rglob("*.py")
        if p.name not in ("__init__.py", "__main__.py")
    )


def test_every_module_has_a_mirroring_test_file():
    tests = {p.name for p in TESTS.glob("test_*.py")}
    missing = []
    for rel in _modules():
        name = rel.stem.lstrip("_")
        candidates = {f"test_{name}.py"}
        if len(rel.parts) > 1:
            package = rel.parts[0]
            candidates |= {f"test_{package}_{name}.py", f"test_{package}.py"}
        if not candidates & tests and MIRRORS.get(rel.as_posix()) not in tests:
            missing.append(rel.as_posix())
    assert not missing, f"modules without a test file (add one, or a MIRRORS entry): {missing}"
    stale = [m for m in MIRRORS if not (SRC / "preftune" / m).is_file()]
    assert not stale, f"MIRRORS names modules that are gone: {stale}"


def _import_graph() -> dict[str, set[str]]:
    """module -> the modules of src/ it imports anywhere in its body (a package's own __init__ left out:
    importing ``preftune`` from ``preftune.x`` is not an edge)."""
    files = {}
    for p in SRC.rglob("*.py"):
        parts = list(p.relative_to(SRC).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        files[".".join(parts)] = p

    def resolve(name: str) -> str | None:
        while name and name not in files:
            name = name.rpartition(".")[0]
        return name or None

    graph: dict[str, set[str]] = {m: set() for m in files}
    for module, path in files.items():
        package = module if path.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                target = resolve(name)
                own_package = (
                    module.startswith(f"{target}.") and files[target].name == "__init__.py"
                )
                if target and target != module and not own_package:
                    graph[module].add(target)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def test_no_import_cycle():
    assert _cycles(_import_graph()) == []


def test_the_cycle_check_sees_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
