"""The pack's layers, read from the source with `ast` (function-local imports included, relative ones and
`comfyui_streamline.`-absolute ones): core < host < families < techniques < nodes, with testing/ and tools/
on top. No import cycle; core/ is plain torch; the techniques and the nodes reach a family only through
families/registry.py and never ask which family a model is; the node files stay thin."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PKG = "comfyui_streamline"
FOLDERS = ("core", "host", "families", "techniques", "nodes", "testing", "tools", "tinyvideo", "tinywan")
# lower layers first; a module may import its own layer and those below it
LAYERS = {"core": 0, "tinyvideo": 0, "tinywan": 0, "host": 1, "families": 2, "techniques": 3, "nodes": 4,
          "testing": 5, "tools": 6}
NODE_FILE_MAX_LINES = 250
NODE_FUNCTION_MAX_LINES = 40
# core/offload.py pins host buffers through ComfyUI's pinned-memory API when it runs inside ComfyUI (a guarded,
# function-local import: without ComfyUI it registers them with the CUDA runtime itself)
CORE_OPTIONAL_HOST_API = {"core.offload"}
PENDING = pytest.mark.xfail(strict=True, reason="not there yet in the layout refactor (issue 23)")


def _modules() -> dict[str, Path]:
    found = {}
    for folder in FOLDERS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts = parts[:-1]
            found[".".join(parts)] = path
    return found


MODULES = _modules()


def _imports(module: str, path: Path) -> set[str]:
    """The pack's modules `module` imports anywhere in its source (a `from X import name` of a submodule
    counts as that submodule)."""
    package = module.split(".") if path.name == "__init__.py" else module.split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        targets = []
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == PKG or node.module.startswith(PKG + ".")):
                target = node.module[len(PKG) + 1:]
            else:
                continue
            for alias in node.names:
                sub = f"{target}.{alias.name}" if target else alias.name
                targets.append(sub if sub in MODULES else target)
        elif isinstance(node, ast.Import):
            targets = [a.name[len(PKG) + 1:] for a in node.names if a.name.startswith(PKG + ".")]
        found.update(t for t in targets if t in MODULES and t != module)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    index, low, stack, on_stack, cycles = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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
                cycles.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return cycles


def _external_imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Import):
            names.update(a.name.split(".")[0] for a in node.names)
    return names


def _in(module: str, folder: str) -> bool:
    return module == folder or module.startswith(folder + ".")


def test_the_graph_sees_the_pack():
    assert {"core.slicing", "host.options", "families.registry", "nodes.extension"} <= set(MODULES)
    assert any(GRAPH.values())


def test_no_import_cycle():
    assert _cycles() == []


def test_core_is_plain_torch():
    for module, path in MODULES.items():
        if _in(module, "core"):
            host_api = {"comfy"} if module in CORE_OPTIONAL_HOST_API else set()
            assert not _external_imports(path) & ({"comfy", "comfy_api", "comfy_extras", "nodes"} - host_api), module
            assert not {m for m in GRAPH[module] if not _in(m, "core")}, module


def test_layers_only_import_downward():
    wrong = [f"{module} -> {target}" for module, targets in GRAPH.items() for target in targets
             if LAYERS[target.split(".")[0]] > LAYERS[module.split(".")[0]]]
    assert wrong == []


@pytest.mark.parametrize("layer", ["techniques", "nodes"])
def test_techniques_and_nodes_reach_families_through_the_registry(layer):
    wrong = [f"{module} -> {target}" for module, targets in GRAPH.items() if _in(module, layer)
             for target in targets if _in(target, "families") and target not in ("families", "families.registry")]
    assert wrong == []


@pytest.mark.parametrize("layer", ["techniques", "nodes"])
def test_no_family_switch_outside_families(layer):
    pattern = re.compile(r"\bfamily\s*[!=]=|\bfamily\s+(not\s+)?in\s*\(")
    hits = [f"{path.relative_to(ROOT)}:{n}" for module, path in MODULES.items() if _in(module, layer)
            for n, line in enumerate(path.read_text().splitlines(), 1) if pattern.search(line)]
    assert hits == []


# what several families share (a family folder may import these); families/registry.py imports every family
FAMILY_SHARED = ("families.unet_common", "families.dit", "families.family", "families.registry")


def _family_folder(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if parts[0] == "families" and len(parts) > 2 else None


def test_a_family_imports_no_other_family():
    wrong = [f"{module} -> {target}" for module, targets in GRAPH.items() if _family_folder(module) is not None
             for target in targets if _family_folder(target) not in (None, _family_folder(module))
             and not any(_in(target, shared) for shared in FAMILY_SHARED)]
    assert wrong == []


def test_node_files_are_thin():
    long_files, long_functions = [], []
    for module, path in MODULES.items():
        if not _in(module, "nodes"):
            continue
        text = path.read_text()
        if len(text.splitlines()) > NODE_FILE_MAX_LINES:
            long_files.append(module)
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                if node.end_lineno - node.lineno + 1 > NODE_FUNCTION_MAX_LINES:
                    long_functions.append(f"{module}.{node.name}")
    assert long_files == [] and long_functions == []
