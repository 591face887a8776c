"""A pytest plugin for mutation runs (`-p tests.mutation_order` in the mutmut configs).

mutmut hands pytest a mutant's tests as node ids in set order, so tests of two files can
alternate; every switch tears down the files' module-scoped fixtures (on the engine path: the
vLLM engine, ~15 s to start) and starts them again. Grouping the items by file, in each file's
own order, builds each module fixture once per mutant. It changes which tests run in no way.
"""

from __future__ import annotations


def pytest_collection_modifyitems(session, config, items):
    items.sort(key=lambda item: (item.location[0], item.location[1] if item.location[1] is not None else -1))
