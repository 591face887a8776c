"""The package's shape, held in CI: layers, no private cross-imports, one backend type test, rules written once, sizes."""

from __future__ import annotations

import ast
import importlib
import io
import shutil
import subprocess
import sys
import tokenize
from pathlib import Path

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
    """Plain torch hook registration appears only in labkit.backends.registrar (and the vLLM worker's install)."""
    offenders = []
    for _path, module, tree in _modules():
        for node in ast.walk(tree):
            attr = getattr(getattr(node, "func", None), "attr", None)
            if isinstance(node, ast.Call) and attr in ("register_forward_hook", "register_forward_pre_hook"):
                if module not in ("labkit.backends.registrar", "labkit.engines.vllm_worker"):
                    offenders.append(f"{module}:{node.lineno} {attr}")
    assert not offenders, offenders


def test_engine_modules_import_without_vllm():
    """The engine's driver and worker import only public labkit names, checked on every machine."""
    for name in ("labkit.engines.vllm", "labkit.engines.vllm_worker", "labkit.engines.vllm_capture", "labkit.engines.vllm_load",
                 "labkit.engines.vllm_requests"):
        importlib.import_module(name)


# --- sizes a newcomer reads in one sitting -------------------------------------------------------
#
# Modules: at most MAX_MODULE_LINES physical lines (every line of the file).
# Functions and methods: at most MAX_FUNCTION_LINES *code* lines — the lines from the first
# decorator to the last line of the body that hold a Python token other than a comment, leaving
# out blank lines, comment-only lines and the lines of docstrings (the function's own and those of
# functions / classes nested in it). A nested function counts toward its enclosing function and is
# also held to the limit itself.
MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 80

#: Named exceptions, each with its reason. Module keys are dotted module names; function keys are
#: ``module:qualified.name``. An entry that no longer exceeds its limit fails
#: test_size_exceptions_are_still_needed: delete it then.
SIZE_EXCEPTIONS: dict[str, str] = {}


def _code_lines(source: str, tree: ast.Module) -> set[int]:
    """Line numbers holding code: a token that is not a comment / newline / indent, outside docstrings."""
    skip = {tokenize.COMMENT, tokenize.NL, tokenize.NEWLINE, tokenize.INDENT, tokenize.DEDENT, tokenize.ENDMARKER}
    lines: set[int] = set()
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type not in skip:
            lines.update(range(token.start[0], token.end[0] + 1))
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                lines -= set(range(first.lineno, first.end_lineno + 1))
    return lines


def _function_sizes(source: str, tree: ast.Module):
    """``(qualified name, code lines)`` of every function and method, nested ones included."""
    code = _code_lines(source, tree)

    def visit(node, prefix):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef)):
                start = min([d.lineno for d in child.decorator_list] + [child.lineno])
                yield prefix + child.name, sum(1 for line in code if start <= line <= child.end_lineno)
                yield from visit(child, f"{prefix}{child.name}.")
            elif isinstance(child, ast.ClassDef):
                yield from visit(child, f"{prefix}{child.name}.")

    yield from visit(tree, "")


def _size_offenders() -> dict[str, str]:
    offenders = {}
    for path, module, tree in _modules():
        source = path.read_text()
        n_lines = len(source.splitlines())
        if n_lines > MAX_MODULE_LINES:
            offenders[module] = f"{path.relative_to(PACKAGE.parent)}: {n_lines} lines > {MAX_MODULE_LINES}"
        for name, size in _function_sizes(source, tree):
            if size > MAX_FUNCTION_LINES:
                offenders[f"{module}:{name}"] = f"{module}:{name}: {size} code lines > {MAX_FUNCTION_LINES}"
    return offenders


def test_modules_and_functions_stay_readable_in_one_sitting():
    """No module over 500 lines, no function over 80 code lines, except the named SIZE_EXCEPTIONS."""
    unexcused = [why for key, why in sorted(_size_offenders().items()) if key not in SIZE_EXCEPTIONS]
    assert not unexcused, (
        "split along a real seam (a submodule, named steps), or add a named exception with its reason: "
        + "; ".join(unexcused)
    )


def test_size_exceptions_are_still_needed():
    stale = sorted(set(SIZE_EXCEPTIONS) - set(_size_offenders()))
    assert not stale, f"these size exceptions are within the limits now; delete them from SIZE_EXCEPTIONS: {stale}"


SIZE_RULE_EXAMPLE = '''
@decorator
def f(x):
    """A docstring

    over three lines."""
    # a comment

    def g():
        """nested docstring"""
        return (1,
                2)
    return g()
'''


def test_size_rule_counts_code_not_docstrings_or_comments():
    sizes = dict(_function_sizes(SIZE_RULE_EXAMPLE, ast.parse(SIZE_RULE_EXAMPLE)))
    # f: the decorator, def f, def g, the two lines of g's return, return g(); g: def g and its return
    assert sizes == {"f": 6, "f.g": 3}
