"""The repo's top-level folders never shadow installed packages (issue 19).

`kernels/` and `torch_bridge/` are installed as `jpeft.kernels` / `jpeft.torch_bridge`. From the repository root
(`python -m pytest`, a notebook there), the root is first on `sys.path`; a bare `import kernels` must still give the
PyPI package `kernels` that transformers >= 5.25 imports whenever `transformers.modeling_utils` loads.
"""

from __future__ import annotations

import importlib.metadata
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

PROBE = r'''
import importlib, json, sys
sys.path.insert(0, sys.argv[1])  # as `python -m ...` and `python -c` do from the repo root
out = {"path0": sys.path[0]}
import peft, transformers.modeling_utils  # imports the PyPI `kernels` (transformers.integrations.hub_kernels)
out["peft"] = peft.__version__
for name in ("kernels", "torch_bridge"):
    try:
        out[name] = importlib.import_module(name).__file__
    except ModuleNotFoundError as e:
        out[name] = "ModuleNotFoundError: " + str(e)
import jpeft.kernels.dispatch, jpeft.torch_bridge.hf_names
out["jpeft.kernels"] = jpeft.kernels.dispatch.__file__
out["jpeft.torch_bridge"] = jpeft.torch_bridge.hf_names.__file__
print(json.dumps(out))
'''


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
        return True
    except importlib.metadata.PackageNotFoundError:
        return False


def test_repo_root_first_on_sys_path_does_not_shadow_pypi_packages():
    res = subprocess.run([sys.executable, "-c", PROBE, str(ROOT)], cwd=ROOT, capture_output=True, text=True,
                         timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    out = json.loads(res.stdout.strip().splitlines()[-1])
    print(out)
    assert Path(out["path0"]).resolve() == ROOT
    for name in ("kernels", "torch_bridge"):
        if _installed(name):  # the real package wins, wherever it lives
            assert not out[name].startswith("ModuleNotFoundError"), out[name]
            assert not Path(out[name]).resolve().is_relative_to(ROOT / name), out[name]
        else:  # as if the folder were not there, with a hint at the jpeft name
            assert out[name] == f"ModuleNotFoundError: No module named '{name}' (the repo's {name}/ is jpeft.{name})"
    assert Path(out["jpeft.kernels"]).name == "dispatch.py"
    assert Path(out["jpeft.torch_bridge"]).name == "hf_names.py"



def test_every_package_folder_is_in_the_wheel():
    """A folder of modules missing from `[tool.setuptools] packages` works in the editable install and is absent
    from the wheel (`jpeft.compare` once was: `jpeft` failed to start from a wheel)."""
    import tomllib

    root = Path(__file__).resolve().parents[1]
    setup = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(setup["packages"])
    where = {name: root / folder for name, folder in setup["package-dir"].items()}
    found = set()
    for name, folder in where.items():
        for init in folder.rglob("__init__.py"):
            rel = init.parent.relative_to(folder).parts
            found.add(".".join((name, *rel)))
    assert found and found <= listed, sorted(found - listed)
