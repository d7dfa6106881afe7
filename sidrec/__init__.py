"""sidrec: semantic-ID generative recommendation, offline training and an online wide-beam service.

Every module is imported under this one name: `sidrec.model`, `sidrec.kernels`, `sidrec.service`,
`sidrec.training`. The code lives in the repository's top-level folders of the same names (the
design's layout), which hold no `__init__.py` of their own, for two reasons:

- A folder without `__init__.py` can never hide an installed distribution. With the repository
  root on `sys.path` (pytest, `python -m`, torchrun), `import kernels` still finds the PyPI
  `kernels` package that transformers imports: Python takes a regular package anywhere on the path
  over a bare folder. A top-level `kernels/__init__.py` used to win, and broke transformers.
- Inside this package the folders are reached through `__path__`: in a source checkout the
  repository root is appended to it below, so `sidrec.model` is `model/`; an installed wheel
  carries the folders inside `sidrec/` (pyproject's `package-dir`), where the same names resolve
  with nothing appended.

This file imports nothing heavy: `sidrec.model` and `sidrec.kernels` load without the training or
service extras.
"""
from pathlib import Path as _Path

__version__ = "0.1.0"

_ROOT = _Path(__file__).resolve().parent.parent
if (_ROOT / "pyproject.toml").is_file() and (_ROOT / "model" / "decode.py").is_file():
    # A source checkout (or an editable install of one): the parts are siblings of this folder.
    __path__.append(str(_ROOT))  # noqa: F821 (a package's __path__ is set before this runs)
