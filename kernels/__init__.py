"""jpeft's fused ops, installed as ``jpeft.kernels`` (the README's Layout section says why it has this guard).

With the repository root on ``sys.path`` (``python -m pytest``, a notebook or REPL started there), a bare
``import kernels`` would find this folder before the PyPI package ``kernels`` that transformers imports. This
folder is never the top-level ``kernels``: imported under that name, it resolves the name on the rest of
``sys.path`` and puts that module in its place (or fails as if the folder were not there).
"""

if __name__ != "jpeft.kernels":
    import importlib.machinery  # stdlib only: this runs inside other packages' imports
    import importlib.util
    import os
    import sys

    _root = os.path.realpath(os.path.dirname(os.path.dirname(__file__)))
    _path = [p for p in sys.path if os.path.realpath(p or ".") != _root]
    _spec = importlib.machinery.PathFinder.find_spec(__name__, _path)
    if _spec is None:
        raise ModuleNotFoundError(f"No module named {__name__!r} (the repo's {__name__}/ is jpeft.{__name__})",
                                  name=__name__)
    sys.modules[__name__] = importlib.util.module_from_spec(_spec)  # the import statement returns this module
    _spec.loader.exec_module(sys.modules[__name__])
