"""`python tools/inspect.py DST`: see tools/inspect_dataset.py.

This file shares its name with the standard library's `inspect`. Every tool runs with
tools/ first on sys.path, so `import inspect` (which `dataclasses` does) finds this file;
when that happens it hands the import over to the real module.
"""

import importlib.machinery
import importlib.util
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
    import runpy

    runpy.run_path(os.path.join(_HERE, "inspect_dataset.py"), run_name="__main__")
else:
    _path = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]
    _spec = importlib.machinery.PathFinder.find_spec("inspect", _path)
    assert _spec is not None and _spec.loader is not None
    _module = importlib.util.module_from_spec(_spec)
    sys.modules[__name__] = _module
    _spec.loader.exec_module(_module)
