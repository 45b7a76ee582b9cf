"""The JSON Schema of ``results.json`` and its validator.

The schema ships in the package (``results.schema.json``).  Validation uses the
``jsonschema`` package when it is installed and otherwise a small built-in checker that
covers the keywords the schema uses: type, const, enum, required, properties,
additionalProperties, items, minItems, minimum, exclusiveMinimum and local ``$ref``.
"""
from __future__ import annotations

import functools
import json
import math
from importlib import resources
from pathlib import Path
from typing import Any, Iterator, Union

__all__ = ["SCHEMA_FILE", "load_schema", "schema_errors", "validate_results", "save_results",
           "load_results", "check_complete"]

SCHEMA_FILE = "results.schema.json"

_TYPES = {
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "string": lambda v: isinstance(v, str),
    "boolean": lambda v: isinstance(v, bool),
    "null": lambda v: v is None,
    # bool is an int in Python but not a number in JSON
    "integer": lambda v: (isinstance(v, int) and not isinstance(v, bool))
    or (isinstance(v, float) and v.is_integer()),
    "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)
    and math.isfinite(v),
}


@functools.lru_cache(maxsize=1)
def _schema_text() -> str:
    try:
        return resources.files("mixprec.experiments").joinpath(SCHEMA_FILE).read_text()
    except FileNotFoundError as e:   # a build that left the package data out
        raise RuntimeError(f"{SCHEMA_FILE} is missing from the installed mixprec.experiments "
                           f"package; the build must include it as package data") from e


def load_schema() -> dict:
    """The results schema as a dict (a fresh copy each call)."""
    return json.loads(_schema_text())


def _resolve(ref: str, root: dict) -> dict:
    if not ref.startswith("#/"):
        raise ValueError(f"only local $ref are supported, got {ref!r}")
    node = root
    for part in ref[2:].split("/"):
        node = node[part]
    return node


def _check(value: Any, schema: dict, root: dict, path: str) -> Iterator[str]:
    """Yield 'path: problem' for each violation (the built-in checker)."""
    if "$ref" in schema:
        yield from _check(value, _resolve(schema["$ref"], root), root, path)
    if "const" in schema and value != schema["const"]:
        yield f"{path}: {value!r} is not {schema['const']!r}"
    if "enum" in schema and value not in schema["enum"]:
        yield f"{path}: {value!r} is not one of {schema['enum']}"
    if "type" in schema:
        types = schema["type"] if isinstance(schema["type"], list) else [schema["type"]]
        if not any(_TYPES[t](value) for t in types):
            yield f"{path}: {value!r:.60} is not of type {' or '.join(types)}"
            return
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if "minimum" in schema and value < schema["minimum"]:
            yield f"{path}: {value} is less than the minimum {schema['minimum']}"
        if "exclusiveMinimum" in schema and value <= schema["exclusiveMinimum"]:
            yield f"{path}: {value} is not greater than {schema['exclusiveMinimum']}"
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                yield f"{path}: missing required property {key!r}"
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if key in props:
                yield from _check(item, props[key], root, f"{path}.{key}")
            elif extra is False:
                yield f"{path}: unexpected property {key!r}"
            elif isinstance(extra, dict):
                yield from _check(item, extra, root, f"{path}.{key}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0):
            yield f"{path}: fewer than {schema['minItems']} items"
        if "items" in schema:
            for i, item in enumerate(value):
                yield from _check(item, schema["items"], root, f"{path}[{i}]")


def schema_errors(doc: Any, schema: dict | None = None) -> list:
    """Every violation of ``schema`` (default: the results schema) as 'path: problem'."""
    schema = load_schema() if schema is None else schema
    try:
        import jsonschema
    except ImportError:
        return list(_check(doc, schema, schema, "$"))
    validator = jsonschema.Draft202012Validator(schema)
    return [f"$.{'.'.join(str(p) for p in e.absolute_path)}: {e.message}"
            for e in validator.iter_errors(doc)]


def validate_results(doc: Any) -> None:
    """Raise ValueError listing the first problems if ``doc`` violates the results schema."""
    errors = schema_errors(doc)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError(f"results do not match {SCHEMA_FILE}: " + "; ".join(errors[:5]) + more)


def save_results(results: dict, out_dir: Union[str, Path]) -> Path:
    """Validate and write ``results.json`` (and a copy of its schema) into ``out_dir``.

    Both are written atomically (temp file in the folder, then ``os.replace``): a reader,
    or a run killed while writing, sees the old file or the new one, never part of one.
    """
    from .runfolder import atomic_write_text
    validate_results(results)
    check_complete(results)
    out = Path(out_dir)
    path = atomic_write_text(out / "results.json",
                             json.dumps(results, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / SCHEMA_FILE, json.dumps(load_schema(), indent=1) + "\n")
    return path


def check_complete(doc: dict, where: str = "results") -> None:
    """Raise ValueError unless ``doc`` holds one run per (recipe, seed) of its config and
    one summary row per recipe: a file that lost records must not make a shorter table."""
    cfg = doc["config"]
    want = [(spec, seed) for seed in cfg["seeds"] for spec in cfg["recipes"]]
    have = [(r["recipe"].get("spec"), r["seed"]) for r in doc["runs"]]
    missing = [f"{spec} (seed {seed})" for spec, seed in want if (spec, seed) not in have]
    extra = sorted({f"{spec} (seed {seed})" for spec, seed in have
                    if (spec, seed) not in want or have.count((spec, seed)) > 1})
    rows = [row["spec"] for row in doc["summary"]]
    problems = []
    if missing:
        problems.append(f"missing the run(s) {', '.join(missing)}")
    if extra:
        problems.append(f"unexpected or repeated run(s) {', '.join(extra)}")
    if rows != list(cfg["recipes"]):
        problems.append(f"summary rows {rows} are not the configured recipes "
                        f"{list(cfg['recipes'])}")
    if problems:
        raise ValueError(f"{where} are incomplete: " + "; ".join(problems))


def load_results(path: Union[str, Path]) -> dict:
    """Read and validate a ``results.json`` (a file or the run folder holding it).

    Every problem is a ValueError that names the file: missing, truncated or not JSON,
    not matching the schema, or missing runs of its own configuration.
    """
    from .runfolder import read_json
    p = Path(path)
    if p.is_dir():
        p = p / "results.json"
        if not p.exists() and (p.parent / "run.json").exists():
            raise ValueError(f"no results file at {str(p)!r}: the comparison in "
                             f"{str(p.parent)!r} has not finished; continue it with "
                             f"`mixprec compare --resume {p.parent}`")
    doc = read_json(p, what="results file")
    try:
        validate_results(doc)
        check_complete(doc, where=f"the results in {str(p)!r}")
    except ValueError as e:
        msg = str(e)
        raise ValueError(msg if str(p) in msg else f"{str(p)!r}: {msg}") from e
    return doc
