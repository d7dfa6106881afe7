"""sidrec's import names never hide a distribution its dependencies import, and its one command
line works wherever sidrec is installed.

The shadowing check runs where it bit: a subprocess started from the repository root (so the root is
`sys.path[0]`, as under `python -m`, pytest and torchrun), with the real PyPI `kernels` distribution
(the version transformers asks for) copied or installed into a scratch folder on the path, whether
or not the lock installed it. transformers' hub-kernel integration must then load the real
`kernels`, and every sidrec module must import under `sidrec.`.
"""
from __future__ import annotations

import importlib.metadata as md
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
PARTS = ("model", "kernels", "service", "training")


def _kernels_requirement() -> Requirement:
    for raw in md.requires("transformers") or []:
        r = Requirement(raw)
        if r.name == "kernels" and r.marker is None:
            return r
    return Requirement("kernels")  # a transformers that does not ask for it: any release will do


def _real_kernels_on(scratch: Path, source: str) -> str:
    """Put the real `kernels` distribution into `scratch` and return its version. source
    "installed": a copy of the one in this environment (the lock installs it), falling back to the
    index when absent or outside transformers' range; "index": always a fresh pip install from the
    package index, as an environment built without the lock would get it."""
    want = _kernels_requirement()
    try:
        dist = md.distribution("kernels")
    except md.PackageNotFoundError:
        dist = None
    if source == "installed" and dist is not None and want.specifier.contains(dist.version, prereleases=True):
        site = Path(dist.locate_file(""))
        for rel in dist.files or []:
            src = site / rel
            if src.is_file() and not str(rel).startswith(".."):
                dst = scratch / rel
                dst.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(src, dst)
        return dist.version
    proc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--disable-pip-version-check",
                           "--target", str(scratch), str(want)], capture_output=True, text=True, timeout=300)
    if proc.returncode != 0:
        pytest.fail(f"could not install {want} into a scratch folder:\n{proc.stderr[-2000:]}")
    return md.Distribution.at(next(scratch.glob("kernels-*.dist-info"))).version


def _all_sidrec_modules() -> list[str]:
    mods = ["sidrec", "sidrec.cli", "sidrec.figures"]
    for part in PARTS:
        for f in sorted((ROOT / part).glob("*.py")):
            if f.stem != "__main__":
                mods.append(f"sidrec.{part}.{f.stem}")
    return mods


IMPORT_CHECK = r"""
import importlib, json, sys
scratch, modules = sys.argv[1], sys.argv[2:]
import kernels
assert kernels.__file__.startswith(scratch), f"`import kernels` found {kernels.__file__}, not the distribution"
from kernels import CUDAProperties  # what transformers 5.25 imports
import transformers.integrations.hub_kernels  # noqa: F401
import sentence_transformers  # noqa: F401
loaded = {}
for name in modules:
    loaded[name] = importlib.import_module(name).__file__
import sidrec.kernels.trie as trie
assert trie.__file__.endswith("kernels/trie.py")
print(json.dumps({"kernels": kernels.__file__, "sidrec": loaded}))
"""


@pytest.mark.parametrize("source", ["installed", "index"])
def test_sidrec_never_shadows_the_kernels_distribution(tmp_path, source):
    version = _real_kernels_on(tmp_path, source)
    assert version
    modules = _all_sidrec_modules()
    assert len(modules) > 40  # every module of the four parts
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-c", IMPORT_CHECK, str(tmp_path), *modules], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]


def test_top_level_folders_are_not_importable_packages():
    """A regular package (one with `__init__.py`) at the root would win over an installed one."""
    for part in PARTS:
        assert not (ROOT / part / "__init__.py").exists(), f"{part}/__init__.py would shadow PyPI's {part!r}"


BLOCK_TRAINING_EXTRAS = r"""
import sys
for name in ("sentence_transformers", "faiss", "pandas", "pyarrow", "matplotlib", "tqdm", "transformers"):
    sys.modules[name] = None  # as if the `train` extra were not installed
from sidrec.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_console_serves_without_the_training_extras():
    env = {**os.environ, "PYTHONPATH": ""}
    run = lambda *args: subprocess.run([sys.executable, "-c", BLOCK_TRAINING_EXTRAS, *args], cwd="/",
                                       env=env, capture_output=True, text=True, timeout=120)
    for cmd in (["serve", "--help"], ["index", "load", "--help"]):
        proc = run(*cmd)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert "usage: sidrec" in proc.stdout
    proc = run("demo-bundle", "/nonexistent/out")
    assert proc.returncode == 2
    assert "pip install 'sidrec[train]'" in proc.stderr and "Traceback" not in proc.stderr


def test_console_lists_commands_and_rejects_unknown_ones():
    from sidrec.cli import COMMANDS, main

    assert main(["--help"]) == 0
    assert main(["no-such-command"]) == 2
    assert set(COMMANDS) >= {"serve", "index", "train", "demo-bundle", "assign-sids"}
    exe = Path(sys.executable).parent / "sidrec"
    if exe.exists():  # the installed console script, not only the module
        proc = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0 and "train" in proc.stdout


def test_lock_agrees_with_pyproject():
    proc = subprocess.run([sys.executable, str(ROOT / "deploy" / "check_lock.py")], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr


def test_lock_check_names_a_disagreement(tmp_path):
    """A pyproject range the lock no longer satisfies fails the check, naming the package."""
    sys.path.insert(0, str(ROOT / "deploy"))
    try:
        import check_lock
    finally:
        sys.path.pop(0)
    project = {"name": "sidrec", "dependencies": ["numpy>=99"], "optional-dependencies": {"dev": ["pytest>=8"]}}
    lock = tmp_path / "dev.lock"
    lock.write_text("numpy==2.0.0 \\\n    --hash=sha256:00\npytest==8.1.0\n")
    errors = check_lock.check(project, "dev", lock)
    assert len(errors) == 1 and "numpy>=99" in errors[0] and "numpy==2.0.0" in errors[0]
    project["dependencies"] = ["numpy>=1", "redis>=5"]
    errors = check_lock.check(project, "dev", lock)
    assert len(errors) == 1 and "redis>=5" in errors[0] and "does not pin" in errors[0]
