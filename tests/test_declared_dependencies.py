"""Every third-party module airan and sims import is a distribution pyproject.toml declares.

A dependency that only arrives through another one (jsonschema through ray, torch through vLLM)
breaks the day that one stops pulling it in. Read from the AST: a module-level import needs a
main dependency; an import inside a function (or under `if TYPE_CHECKING:`) may instead come
from an optional extra, which is how the engines load vLLM and llama-cpp-python lazily.
"""
from __future__ import annotations

import ast
import importlib.metadata as md
import re
import sys
import tomllib
from functools import cache
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
# extras airan's own code may never need at run time
TOOL_EXTRAS = {"dev"}
# import name -> distribution, only for optional distributions that are not installed here
# (packages_distributions() knows installed ones only)
NOT_INSTALLED = {"llama_cpp": "llama-cpp-python"}


def _name(requirement: str) -> str:
    return _normalize(re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement).group(1))


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


MAIN = {_name(r) for r in PROJECT["dependencies"]}
EXTRAS = {_name(r) for extra, reqs in PROJECT["optional-dependencies"].items() if extra not in TOOL_EXTRAS for r in reqs}


def _imports(tree: ast.AST):
    """(dotted module, lazy) for every absolute import; lazy = inside a function or TYPE_CHECKING."""

    def walk(node, lazy):
        for child in ast.iter_child_nodes(node):
            child_lazy = lazy or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)) or (
                isinstance(child, ast.If) and "TYPE_CHECKING" in ast.unparse(child.test)
            )
            if isinstance(child, ast.Import):
                yield from ((a.name, lazy) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                yield child.module, lazy
            yield from walk(child, child_lazy)

    yield from walk(tree, False)


@cache
def _providers() -> dict[str, list[str]]:
    return md.packages_distributions()


@cache
def _files(dist: str) -> tuple[str, ...]:
    return tuple(str(f) for f in md.distribution(dist).files or [])


def _distributions(module: str) -> set[str]:
    """Installed distributions that may provide `module` (a namespace package maps to several:
    keep those whose files hold the module's package)."""
    top = module.split(".")[0]
    dists = _providers().get(top, [])
    if len(dists) > 1 and "." in module:
        prefix = "/".join(module.split(".")[:2])
        holding = [d for d in dists if any(f.startswith((prefix + "/", prefix + ".py")) for f in _files(d))]
        dists = holding or dists
    if not dists and top in NOT_INSTALLED:
        dists = [NOT_INSTALLED[top]]
    return {_normalize(d) for d in dists}


def _third_party_imports() -> dict[tuple[str, str], bool]:
    """(file, module) -> whether every import of it in that file is lazy."""
    found: dict[tuple[str, str], bool] = {}
    for package in ("airan", "sims"):
        for path in sorted((ROOT / package).rglob("*.py")):
            for module, lazy in _imports(ast.parse(path.read_text(), str(path))):
                top = module.split(".")[0]
                if top in sys.stdlib_module_names or top in ("airan", "sims", "__future__"):
                    continue
                key = (str(path.relative_to(ROOT)), module)
                found[key] = found.get(key, True) and lazy
    return found


def test_every_third_party_import_is_a_declared_distribution():
    problems = []
    for (file, module), lazy in sorted(_third_party_imports().items()):
        dists = _distributions(module)
        if not dists:
            problems.append(f"{file}: `import {module}`: no installed distribution provides it")
        elif dists & MAIN:
            continue
        elif lazy and dists & EXTRAS:
            continue
        else:
            where = "an optional extra, but imported at module level" if dists & EXTRAS else "undeclared"
            problems.append(f"{file}: `import {module}` needs {' or '.join(sorted(dists))}: {where}")
    assert not problems, ("declare these in pyproject.toml's [project] dependencies (or, when every import "
                          "of it is inside a function, in an optional extra):\n" + "\n".join(problems))  # fmt: skip


def test_the_scanner_sees_lazy_extras_and_module_level_imports():
    found = _third_party_imports()
    assert found[("airan/core/diagnosis.py", "jsonschema")] is False
    assert found[("airan/serving/engine/vllm_engine.py", "vllm.engine.arg_utils")] is True
    assert found[("airan/serving/engine/llamacpp_engine.py", "llama_cpp")] is True
    assert _distributions("google.protobuf") == {"protobuf"}
    assert _distributions("yaml") == {"pyyaml"} and "pyyaml" in MAIN
    assert "llama-cpp-python" in EXTRAS and "pytest" not in EXTRAS
