"""Write constraints.txt from what a throw-away venv resolved (used by `make lock`).

Usage: python tools/write_lock.py VENV_PYTHON OUT_FILE

Every installed distribution except mixprec itself is pinned exactly; local version
labels (``+cpu``) are dropped so the same lock admits a CUDA build of the same torch.
The comment block at the top of OUT_FILE is kept.
"""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


def main(venv_python: str, out: str) -> None:
    listed = subprocess.run(
        [venv_python, "-m", "pip", "list", "--format=freeze", "--exclude-editable"],
        check=True, capture_output=True, text=True,
    ).stdout.splitlines()
    pins = sorted(
        {re.sub(r"\+[\w.]+$", "", line) for line in listed
         if "==" in line and not line.lower().startswith(("mixprec==", "pip=="))},
        key=str.lower,
    )
    path = Path(out)
    header = [line for line in path.read_text().splitlines() if line.startswith("#")] if path.exists() else []
    path.write_text("\n".join(header + pins) + "\n")
    print(f"{out}: {len(pins)} pins")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
