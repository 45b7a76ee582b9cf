"""Read the exact versions that constraints.txt pins (the suite's lock)."""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Optional

LOCK = Path(__file__).resolve().parent.parent / "constraints.txt"


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


@lru_cache(maxsize=None)
def locked_versions(path: Path = LOCK) -> dict:
    """{normalised distribution name: version} for every ``name==version`` line."""
    pins = {}
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if "==" in line:
            name, version = line.split("==", 1)
            pins[_normalise(name)] = version.strip()
    return pins


def locked_version(name: str) -> Optional[str]:
    return locked_versions().get(_normalise(name)) if LOCK.exists() else None


def oracle_version_problem(name: str, installed: str) -> Optional[str]:
    """None when ``installed`` is the locked version (or nothing is locked), else why not."""
    locked = locked_version(name)
    if locked is None or installed.split("+")[0] == locked:
        return None
    return (f"{name} {installed} is installed, but the oracle tests are checked against "
            f"{name} {locked}, the version constraints.txt locks. Install it "
            f"(`make install`), or move the lock (`make lock`) and review what the new "
            f"{name} computes differently before updating the expected behaviour.")
