"""HF / peft / bitsandbytes / GGUF file formats, installed as ``jpeft.torch_bridge``.

Never a top-level package: imported as a bare ``torch_bridge`` (repository root on ``sys.path``), it hands the
name to the rest of ``sys.path`` exactly as ``kernels/__init__.py`` does, reusing that file's guard.
"""

if __name__ != "jpeft.torch_bridge":
    import os  # stdlib only

    _guard = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels", "__init__.py")
    exec(compile(open(_guard).read(), _guard, "exec"))  # same guard, run with this module's globals
