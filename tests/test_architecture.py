"""The package's shape, held in CI: layers, no private cross-imports, one backend type test, rules written once."""

from __future__ import annotations

import ast
import importlib
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "labkit"


def _modules():
    for path in sorted(PACKAGE.rglob("*.py")):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        yield path, name.removesuffix(".__init__"), ast.parse(path.read_text(), filename=str(path))


def test_layers_contract_holds():
    """import-linter's layers contract (pyproject [tool.importlinter]): no upward import, no cycle across layers."""
    exe = Path(sys.executable).with_name("lint-imports")
    command = [str(exe)] if exe.exists() else [shutil.which("lint-imports") or "lint-imports"]
    result = subprocess.run(command, cwd=PACKAGE.parent, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-2000:]
    assert "1 kept, 0 broken" in result.stdout


def test_no_import_cycle():
    import grimp

    graph = grimp.build_graph("labkit")
    cycles = [
        (a, b)
        for a in graph.modules
        for b in graph.find_modules_directly_imported_by(a)
        if graph.chain_exists(importer=b, imported=a)
    ]
    assert not cycles, f"import cycles: {sorted(cycles)[:10]}"


def test_no_module_imports_another_modules_private_names():
    offenders = []
    for path, module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("labkit") and node.level == 0:
                for alias in node.names:
                    if alias.name.startswith("_") and node.module != module:
                        offenders.append(f"{path.name}:{node.lineno} imports {node.module}.{alias.name}")
    assert not offenders, offenders


BACKEND_TYPES = {"Backend", "LabModel", "PlainHFBackend", "VLLMModel", "HuggingFaceRuns"}


def test_one_backend_type_test():
    """Only labkit.backends.backend_of asks what kind of handle a model is; everything else calls methods."""
    offenders = []
    for path, module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) in ("isinstance", "issubclass"):
                names = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)} | {
                    n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)
                }
                if names & BACKEND_TYPES and module != "labkit.backends":
                    offenders.append(f"{module}:{node.lineno} isinstance(..., {sorted(names & BACKEND_TYPES)})")
            if isinstance(node, ast.Constant) and node.value in ("labkit_engine", "is_engine_model"):
                offenders.append(f"{module}:{node.lineno} {node.value!r}")
            if isinstance(node, ast.Name) and node.id in ("is_engine_model", "lab_model_or_none") and module != "labkit.models":
                offenders.append(f"{module}:{node.lineno} {node.id}")
    assert not offenders, offenders


def _callers_of(name: str) -> set[str]:
    found = set()
    for _path, module, tree in _modules():
        for node in ast.walk(tree):
            if isinstance(node, ast.Call) and (getattr(node.func, "id", None) == name or getattr(node.func, "attr", None) == name):
                found.add(module)
    return found


def test_the_position_rule_and_the_mask_merge_are_written_once():
    """Both backends call the one copy in labkit.interventions (HF hooks and the vLLM worker / driver)."""
    definitions = {
        name: [module for _p, module, tree in _modules() for node in ast.walk(tree)
               if isinstance(node, ast.FunctionDef) and node.name == name]
        for name in ("steering_positions", "merge_selections", "encode_prompt", "eos_token_ids", "default_prepend_bos")
    }
    assert definitions["steering_positions"] == ["labkit.interventions"]
    assert definitions["merge_selections"] == ["labkit.interventions"]
    assert definitions["encode_prompt"] == ["labkit.tokens"]
    assert definitions["default_prepend_bos"] == ["labkit.tokens"]
    assert {"labkit.backends.hf_steering", "labkit.engines.vllm_worker"} <= _callers_of("steering_positions")
    assert {"labkit.backends.hf_masking", "labkit.engines.vllm", "labkit.moe.masking"} <= _callers_of("merge_selections")
    assert {"labkit.models", "labkit.engines.vllm_load"} <= _callers_of("default_prepend_bos")


def test_every_hook_goes_through_the_registrar():
    """Plain torch hook registration appears only in labkit.backends.hooks (and the vLLM worker's install)."""
    offenders = []
    for _path, module, tree in _modules():
        for node in ast.walk(tree):
            attr = getattr(getattr(node, "func", None), "attr", None)
            if isinstance(node, ast.Call) and attr in ("register_forward_hook", "register_forward_pre_hook"):
                if module not in ("labkit.backends.hooks", "labkit.engines.vllm_worker"):
                    offenders.append(f"{module}:{node.lineno} {attr}")
    assert not offenders, offenders


def test_engine_modules_import_without_vllm():
    """The engine's driver and worker import only public labkit names, checked on every machine."""
    for name in ("labkit.engines.vllm", "labkit.engines.vllm_worker", "labkit.engines.vllm_capture", "labkit.engines.vllm_load",
                 "labkit.engines.vllm_requests"):
        importlib.import_module(name)


@pytest.mark.parametrize("module", ["labkit.checks", "labkit.tokens", "labkit.interventions"])
def test_foundation_modules_stay_small(module):
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    assert len(path.read_text().splitlines()) <= 500
