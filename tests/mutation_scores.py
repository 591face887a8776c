"""Per-module mutation scores from the results `make mutate` (mutmut) left under mutants/.

Prints, for each mutated module, how many mutants mutmut made and how many it has checked so far:
killed (a test failed), timeout (the mutant ran past mutmut's limit; counted as detected, as mutmut
does), survived (every covering test passed), no tests (no test covers the function), and not yet
checked (a run stopped early). score = (killed + timeout) / checked, where checked excludes "no
tests" and "not checked". Run from the repository root after `make mutate`:

    .venv/bin/python tests/mutation_scores.py            # the table
    .venv/bin/python tests/mutation_scores.py --survivors  # plus each survivor's name
    .venv/bin/python tests/mutation_scores.py --sample 40  # names of 40 seeded random mutants per
                                                          # module (`make mutate SAMPLE=40` runs them)
    .venv/bin/python tests/mutation_scores.py --module labkit/models.py,labkit/moe/causal.py ...
                                                          # the same, for these modules only

A full run of the six modules takes many hours on 2 cores; a seeded sample per module gives an
unbiased estimate of each score in a fraction of the time (``make mutate SAMPLE=N``).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

# mutmut 3's exit-code classes (mutmut/stats.py status_by_exit_code), folded into the columns above.
_KILLED = {1, 3}
_TIMEOUT = {-24, 24, 152, 255, 36}
_SURVIVED = {0}
_NO_TESTS = {5, 33}


def _status(exit_code: int | None) -> str:
    if exit_code is None:
        return "not checked"
    if exit_code in _KILLED:
        return "killed"
    if exit_code in _TIMEOUT:
        return "timeout"
    if exit_code in _SURVIVED:
        return "survived"
    if exit_code in _NO_TESTS:
        return "no tests"
    return "other"


def sample(metas: list[Path], n: int, seed: int = 0) -> list[str]:
    """``n`` mutant names per module, drawn without replacement with a fixed seed (all if fewer)."""
    import random

    chosen: list[str] = []
    for meta in metas:
        names = sorted(json.loads(meta.read_text())["exit_code_by_key"])
        chosen += sorted(random.Random(f"{seed}:{meta.name}").sample(names, min(n, len(names))))
    return chosen


def engine_pyproject(pyproject: str, engine: str) -> str:
    """``pyproject`` with its ``[tool.mutmut]`` table replaced by ``engine``'s (tests/mutmut_engine.toml).

    mutmut reads its config only from ./pyproject.toml; the engine modules need another test
    selection and environment, so `make mutate-engine` runs in a scratch copy with this file.
    """
    import re

    table = re.compile(r"^\[tool\.mutmut\]\n.*?(?=^\[)", re.S | re.M)
    ours = engine[engine.index("\n[tool.mutmut]\n") + 1 :].rstrip() + "\n\n"
    if not table.search(pyproject):
        raise ValueError("pyproject.toml has no [tool.mutmut] table followed by another table")
    return table.sub(lambda _: ours, pyproject, count=1)


def credit_all_tests(stats_path: Path, prefix: str) -> int:
    """Map every function under ``prefix`` to every test in mutmut's stats; returns how many functions.

    mutmut runs, per mutant, the tests its stats run saw reaching the mutated function. A
    module-scoped fixture (the engine of tests/test_vllm.py) is built inside the module's *first*
    test, so the code that runs while it is built -- loading, the workers' install, and the hook
    closures the install creates, which then run in every later test -- is credited to that one
    test only, and its mutants would "survive" the other tests unseen. Every engine test uses the
    engine, so each is a test of that code.
    """
    stats = json.loads(stats_path.read_text())
    tests = sorted(stats["duration_by_test"])
    functions = [name for name in stats["tests_by_mangled_function_name"] if name.startswith(prefix)]
    for name in functions:
        stats["tests_by_mangled_function_name"][name] = tests
    stats_path.write_text(json.dumps(stats, indent=4))
    return len(functions)


def main(argv: list[str]) -> int:
    if "--credit-all-tests" in argv:  # e.g. --credit-all-tests labkit.engines (after the stats run)
        prefix = argv[argv.index("--credit-all-tests") + 1]
        count = credit_all_tests(Path("mutants/mutmut-stats.json"), prefix)
        print(f"{count} functions under {prefix} now credited to every test.", file=sys.stderr)
        return 0
    if "--engine-pyproject" in argv:  # print pyproject.toml with the engine's mutmut config
        root = Path(__file__).resolve().parents[1]
        print(engine_pyproject((root / "pyproject.toml").read_text(), (root / "tests/mutmut_engine.toml").read_text()), end="")
        return 0
    metas = sorted(Path("mutants").glob("labkit/**/*.py.meta"))
    if not metas:
        print("No mutmut results under mutants/; run `make mutate` first.", file=sys.stderr)
        return 1
    if "--module" in argv:  # only these modules (paths as in source_paths, e.g. labkit/models.py)
        wanted = {m for m in argv[argv.index("--module") + 1 :][:1][0].split(",") if m} if argv[-1] != "--module" else set()
        metas = [m for m in metas if str(m.relative_to("mutants"))[: -len(".meta")] in wanted]
        if not metas:
            print(f"--module: no mutmut results for {sorted(wanted) or 'nothing'}.", file=sys.stderr)
            return 2
    if "--sample" in argv:
        value = argv[argv.index("--sample") + 1 :][:1]
        if not value or not value[0].isdigit() or int(value[0]) < 1:
            print(f"--sample needs a positive number of mutants per module, got {value or 'nothing'}.", file=sys.stderr)
            return 2
        n = int(value[0])
        print(" ".join(sample(metas, n)))
        return 0
    columns = ["killed", "timeout", "survived", "no tests", "not checked", "other"]
    print(f"{'module':28} {'total':>6} " + " ".join(f"{c:>11}" for c in columns) + f" {'score':>7}")
    survivors: list[str] = []
    for meta in metas:
        exit_codes = json.loads(meta.read_text())["exit_code_by_key"]
        counts = Counter(_status(code) for code in exit_codes.values())
        survivors += sorted(name for name, code in exit_codes.items() if _status(code) == "survived")
        checked = counts["killed"] + counts["timeout"] + counts["survived"] + counts["other"]
        score = f"{100 * (counts['killed'] + counts['timeout']) / checked:6.1f}%" if checked else "      -"
        module = str(meta.relative_to("mutants"))[: -len(".meta")]
        print(f"{module:28} {len(exit_codes):>6} " + " ".join(f"{counts[c]:>11}" for c in columns) + f" {score}")
    if "--survivors" in argv:
        print("\nsurvivors (inspect one with: mutmut show NAME)")
        print("\n".join(f"  {name}" for name in survivors))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
