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
    checkpoints/seed<S>-<I>.step<N>.dcp/
                                a sharded (FSDP2) run's model and engine after N steps,
                                written by every rank through torch.distributed.checkpoint;
                                the .pt file names the one in force, and is written
                                after it is complete (older ones are then removed)
    results.json                the whole document, written once every run is recorded

``mixprec compare --resume DIR`` keeps the records, restarts an unfinished run from its
checkpoint and writes results.json.  A file that cannot be read is an error naming the
file, never a traceback and never a silently shorter table.

Under torch.distributed (data-parallel ranks) only rank 0 reads and writes the folder;
what it reads reaches the other ranks by broadcast (:func:`on_rank0`), so every rank
takes the same decisions and an error on rank 0 stops them all.
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from mixprec.distributed import is_distributed

__all__ = ["atomic_write_bytes", "atomic_write_text", "atomic_torch_save", "read_json",
           "Checkpoint", "Rank0Checkpoint", "CompareFolder", "is_rank0", "on_rank0",
           "config_differences", "RUN_FILE", "RESULTS_FILE"]

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

    def sharded_path(self, steps_done: int) -> Path:
        """The folder of a sharded (torch.distributed.checkpoint) save after
        ``steps_done`` steps, beside the checkpoint file."""
        return self.path.parent / f"{self.path.stem}.step{steps_done}.dcp"

    def remove_sharded(self, keep: Optional[str] = None) -> None:
        """Delete this run's sharded-save folders, except the one named ``keep``."""
        for old in self.path.parent.glob(f"{self.path.stem}.step*.dcp"):
            if old.name != keep:
                shutil.rmtree(old, ignore_errors=True)

    def remove(self) -> None:
        self._loaded = None
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
        self.remove_sharded()


# --------------------------------------------------------------------------------------
# data parallel: every rank trains, rank 0 reads and writes the run folder
# --------------------------------------------------------------------------------------
def is_rank0() -> bool:
    return not is_distributed() or torch.distributed.get_rank() == 0


def on_rank0(fn: Callable):
    """``fn()`` on rank 0, its result (or its ValueError) broadcast to every rank: the
    ranks take the same decisions, and an error on rank 0 stops them all instead of
    leaving the others waiting in a collective."""
    if not is_distributed():
        return fn()
    box = [None]
    if torch.distributed.get_rank() == 0:
        try:
            box[0] = ("ok", fn())
        except ValueError as e:
            box[0] = ("error", str(e))
    torch.distributed.broadcast_object_list(box, src=0)
    kind, value = box[0]
    if kind == "error":
        raise ValueError(value)
    return value


class Rank0Checkpoint(Checkpoint):
    """A checkpoint that rank 0 reads and writes; the other ranks receive what it read
    (their state is the same: DistributedDataParallel keeps the replicas equal)."""

    def save(self, state: dict) -> None:
        if is_rank0():
            super().save(state)

    def load(self) -> Optional[dict]:
        if self._loaded is None:
            self._loaded = on_rank0(super().load)
        return self._loaded

    def remove_sharded(self, keep: Optional[str] = None) -> None:
        if is_rank0():
            super().remove_sharded(keep)

    def remove(self) -> None:
        self._loaded = None
        if is_rank0():
            super().remove()


# --------------------------------------------------------------------------------------
# the run folder: config, one record per finished run, checkpoints
# --------------------------------------------------------------------------------------
RUN_FILE = "run.json"
_NEVER = 1 << 62          # a checkpoint interval no run reaches
RUN_KIND = "mixprec.compare.run"
RESULTS_FILE = "results.json"


def _config_json(cfg) -> dict:
    return {f.name: (list(v) if isinstance(v := getattr(cfg, f.name), tuple) else v)
            for f in dataclasses.fields(cfg)}


def config_differences(saved, given) -> str:
    """'field given (saved: value)' for each field of two config dataclasses that differs."""
    return "; ".join(f"{f.name} {getattr(given, f.name)!r} (saved: {getattr(saved, f.name)!r})"
                     for f in dataclasses.fields(saved)
                     if getattr(saved, f.name) != getattr(given, f.name))


class CompareFolder:
    """Paths and reads/writes of one ``mixprec compare`` run folder (layout above).
    Under torch.distributed only rank 0 touches the files (see :func:`on_rank0`)."""

    def __init__(self, root: Path, config_type: type):
        self.root = root
        self.run_file = root / RUN_FILE
        self.config_type = config_type     # CompareConfig (a frozen dataclass)

    def record_path(self, seed: int, index: int) -> Path:
        return self.root / "records" / f"seed{seed}-{index}.json"

    def checkpoint_path(self, seed: int, index: int) -> Path:
        return self.root / "checkpoints" / f"seed{seed}-{index}.pt"

    def checkpoint(self, seed: int, index: int, every: Optional[int],
                   identity: dict) -> Checkpoint:
        # every=None writes no new checkpoints, but one left by an earlier invocation
        # still counts
        return Rank0Checkpoint(self.checkpoint_path(seed, index), identity=identity,
                                every=_NEVER if every is None else every)

    def remove_checkpoint(self, seed: int, index: int) -> None:
        """Delete the checkpoint of one run (its file and any sharded-save folders)."""
        Checkpoint(self.checkpoint_path(seed, index), every=1, identity={}).remove()

    def recorded(self) -> list:
        return sorted((self.root / "records").glob("seed*.json"))

    def start(self, cfg, checkpoint_every: Optional[int]) -> None:
        """Begin a new comparison here; refuse to overwrite an unfinished one."""
        checkpoints = sorted((self.root / "checkpoints").glob("*.pt"))
        if (self.run_file.exists() and not (self.root / RESULTS_FILE).exists()
                and (self.recorded() or checkpoints)):
            raise ValueError(
                f"{str(self.root)!r} holds an unfinished comparison ({len(self.recorded())} "
                f"run(s) recorded); continue it with `mixprec compare --resume {self.root}` "
                f"or choose another --out")
        for old in self.recorded() + checkpoints:
            old.unlink()        # a finished comparison, or one that recorded nothing: afresh
        for old in (self.root / "checkpoints").glob("*.dcp"):
            shutil.rmtree(old, ignore_errors=True)
        atomic_write_text(self.run_file, json.dumps({
            "kind": RUN_KIND, "config": _config_json(cfg), "checkpoint_every": checkpoint_every,
            "command": " ".join(["mixprec"] + sys.argv[1:]) if sys.argv else None,
            "created": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }, indent=1) + "\n")

    def saved(self) -> dict:
        if not self.run_file.exists() and self.root.is_dir():
            raise ValueError(f"{str(self.root)!r} is not a compare run folder: it has no "
                             f"{RUN_FILE}")
        doc = read_json(self.run_file, what="compare run file")
        if not isinstance(doc, dict) or doc.get("kind") != RUN_KIND or "config" not in doc:
            raise ValueError(f"{str(self.run_file)!r} is not a compare run file "
                             f"(expected kind {RUN_KIND!r})")
        return doc

    def load_config(self):
        raw = self.saved()["config"]
        try:
            return self.config_type(**{k: tuple(v) if isinstance(v, list) else v
                                    for k, v in raw.items()})
        except (TypeError, ValueError) as e:
            raise ValueError(f"the configuration in {str(self.run_file)!r} is not valid: "
                             f"{e}") from e

    def load_record(self, seed: int, index: int, spec: str) -> Optional[dict]:
        path = self.record_path(seed, index)
        if not path.exists():
            return None
        run = read_json(path, what="run record")
        if (not isinstance(run, dict) or run.get("seed") != seed
                or run.get("recipe", {}).get("spec") != spec or "loss_history" not in run):
            raise ValueError(f"the run record {str(path)!r} is not the record of {spec!r} "
                             f"(seed {seed}); delete it to rerun that run")
        return run

    def save_record(self, run: dict, seed: int, index: int) -> None:
        atomic_write_text(self.record_path(seed, index),
                          json.dumps(run, indent=1, allow_nan=False) + "\n")
