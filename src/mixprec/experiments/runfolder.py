"""The run folder of a comparison: records written as runs finish, checkpoints, resume.

A command that trains for minutes or hours must not lose what it computed when it is
killed.  Everything it writes goes through one rule, so a reader never sees half a file:

    write(path, data):  temp file in path's folder -> flush + fsync -> os.replace(temp, path)

``os.replace`` is atomic on POSIX and Windows when both names are on one file system
(hence the temp file in the same folder): ``path`` holds the old bytes or the new ones.

Layout of a ``mixprec compare`` folder::

    run.json                    the resolved configuration, written before the first run
    records/seed<S>-<I>.json    one finished run (seed S, recipe I of the config), each
                                written as its run completes
    checkpoints/seed<S>-<I>.pt  the unfinished run's last checkpoint (every N steps);
                                removed when the run's record is written
    results.json                the whole document, written once every run is recorded

``mixprec compare --resume DIR`` keeps the records, restarts an unfinished run from its
checkpoint and writes results.json.  A file that cannot be read is an error naming the
file, never a traceback and never a silently shorter table.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "read_json",
           "Checkpoint"]

PathLike = Union[str, Path]


def _atomic_write(path: PathLike, write: Callable[[Any], None], mode: str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, mode) as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())     # the bytes reach the disk before the name points at them
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_bytes(path: PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` so that ``path`` is never seen half-written."""
    return _atomic_write(path, lambda f: f.write(data), "wb")


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write UTF-8 ``text`` to ``path`` so that ``path`` is never seen half-written."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_torch_save(obj: Any, path: PathLike) -> Path:
    """``torch.save(obj)`` to ``path`` atomically (temp file + os.replace)."""
    return _atomic_write(path, lambda f: torch.save(obj, f), "wb")


def read_json(path: PathLike, *, what: str = "file") -> Any:
    """Parse the JSON file ``path``; ValueError naming the file when it is missing,
    truncated or not JSON."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as e:
        raise ValueError(f"no {what} at {str(path)!r}") from e
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"cannot read the {what} {str(path)!r}: {e}") from e
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        state = "is empty" if not text.strip() else f"is not valid JSON ({e})"
        raise ValueError(f"the {what} {str(path)!r} {state}; it is truncated or damaged") from e


class Checkpoint:
    """The checkpoint file of one training run: saved every ``every`` steps, atomically.

    The saved state is a dict of tensors, numbers, strings, lists and dicts (the engine's
    ``state_dict``, the model's, RNG states, the record so far), loaded back with
    ``torch.load(weights_only=True)``.  ``identity`` (the recipe and training settings)
    is stored with it; loading a checkpoint of another run raises ValueError.

    >>> ckpt = Checkpoint("run/checkpoints/seed0-1.pt", every=50, identity={...})
    >>> ckpt.due(50, total=300)      # after 50 finished steps
    True
    """

    def __init__(self, path: PathLike, *, every: int, identity: dict):
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise ValueError(f"checkpoint interval must be a positive number of steps, "
                             f"got {every!r}")
        self.path = Path(path)
        self.every = every
        self.identity = identity
        self._loaded: Optional[dict] = None

    def due(self, steps_done: int, total: int) -> bool:
        """Save after every ``every`` finished steps, except after the last (the run's
        record is written then)."""
        return steps_done % self.every == 0 and steps_done < total

    def save(self, state: dict) -> None:
        atomic_torch_save({"identity": self.identity, "state": state}, self.path)

    def load(self) -> Optional[dict]:
        """The saved state, or None when there is no checkpoint."""
        if self._loaded is not None:
            return self._loaded
        if not self.path.exists():
            return None
        try:
            blob = torch.load(self.path, weights_only=True)
        except Exception as e:   # noqa: BLE001 -- any unreadable file gets the same message
            raise ValueError(f"the checkpoint {str(self.path)!r} cannot be read "
                             f"({type(e).__name__}: {e}); delete it to rerun that run "
                             f"from its first step") from e
        if not isinstance(blob, dict) or blob.get("identity") != self.identity:
            saved = blob.get("identity") if isinstance(blob, dict) else None
            raise ValueError(f"the checkpoint {str(self.path)!r} belongs to another run "
                             f"({saved!r}, expected {self.identity!r})")
        self._loaded = blob["state"]
        return self._loaded

    def saved_step(self) -> Optional[int]:
        """The number of finished steps in the checkpoint (None: no checkpoint)."""
        state = self.load()
        return None if state is None else int(state["step"])

    def remove(self) -> None:
        self._loaded = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
