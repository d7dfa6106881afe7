"""Check that the lock files still satisfy pyproject.toml; exit 1 with the disagreements named.

    python3 deploy/check_lock.py

For each lock (requirements/dev.lock for extra `dev`, requirements/serve.lock for extra `serve`):
every requirement that pyproject.toml names for that extra (core dependencies included, and the
extras it pulls in through `sidrec[...]`) must be pinned there, at a version its range admits,
under the lock's platform (Linux x86-64, CPython 3.11). serve.lock leaves torch to the image's
own index, and every version it pins must equal dev.lock's, so the image runs the tested set.
Standard library plus `packaging` (pip's vendored copy where the package is absent), so it runs
before any venv exists.
"""
from __future__ import annotations

import re
import sys
import tomllib
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name
    from packaging.version import Version
except ImportError:  # a bare interpreter: pip carries a copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name
    from pip._vendor.packaging.version import Version

ROOT = Path(__file__).resolve().parents[1]
LOCK_ENV = {"sys_platform": "linux", "platform_system": "Linux", "os_name": "posix",
            "platform_machine": "x86_64", "python_version": "3.11", "python_full_version": "3.11.7",
            "implementation_name": "cpython", "platform_python_implementation": "CPython"}
PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)")
REFRESH = "refresh the lock with: bash deploy/lock.sh (then run bash tests/run.sh)"


def read_lock(path: Path) -> dict[str, Version]:
    pins = {}
    for line in path.read_text().splitlines():
        m = PIN.match(line)
        if m:
            pins[canonicalize_name(m.group(1))] = Version(m.group(2))
    return pins


def requirements(project: dict, extra: str) -> list[Requirement]:
    """The requirements of `extra` (and the core), following `sidrec[...]` self-references."""
    name = canonicalize_name(project["name"])
    extras = project.get("optional-dependencies", {})
    out, seen, todo = [Requirement(r) for r in project.get("dependencies", [])], set(), [extra]
    while todo:
        e = todo.pop()
        if e in seen:
            continue
        if e not in extras:
            raise SystemExit(f"check_lock: pyproject.toml has no extra {e!r}")
        seen.add(e)
        for raw in extras[e]:
            r = Requirement(raw)
            if canonicalize_name(r.name) == name:
                todo.extend(r.extras)
            else:
                out.append(r)
    return [r for r in out if r.marker is None or r.marker.evaluate({**LOCK_ENV, "extra": ""})]


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def check(project: dict, extra: str, lock: Path, skip: set[str] = frozenset()) -> list[str]:
    if not lock.is_file():
        return [f"{_rel(lock)} is missing"]
    pins, errors = read_lock(lock), []
    for r in requirements(project, extra):
        key = canonicalize_name(r.name)
        if key in skip:
            continue
        if key not in pins:
            errors.append(f"{_rel(lock)}: pyproject.toml requires {r} (extra {extra!r}), "
                          "which the lock does not pin")
        elif not r.specifier.contains(pins[key], prereleases=True):
            errors.append(f"{_rel(lock)}: pyproject.toml requires {r} (extra {extra!r}), "
                          f"but the lock pins {r.name}=={pins[key]}")
    return errors


def main() -> int:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    dev_lock, serve_lock = ROOT / "requirements" / "dev.lock", ROOT / "requirements" / "serve.lock"
    errors = check(project, "dev", dev_lock) + check(project, "serve", serve_lock, skip={"torch"})
    if dev_lock.is_file() and serve_lock.is_file():
        dev = read_lock(dev_lock)
        for name, version in read_lock(serve_lock).items():
            if dev.get(name) != version:
                errors.append(f"requirements/serve.lock pins {name}=={version}, "
                              f"requirements/dev.lock {dev.get(name, 'nothing')}: the image would not run the tested set")
    if errors:
        print("The lock files disagree with pyproject.toml:", *(f"  - {e}" for e in errors), REFRESH,
              sep="\n", file=sys.stderr)
        return 1
    print(f"lock: ok ({len(read_lock(dev_lock))} packages in dev.lock, {len(read_lock(serve_lock))} in serve.lock)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
