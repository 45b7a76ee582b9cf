"""The JSON Schema of ``mixprec reproduce``'s ``results.json`` and its validator.

Version 2 (``"schema": "mixprec.reproduce/2"``) adds to every record ``checks`` (name ->
held) and ``needs`` (what a claim that could not be measured here lacks), and the verdict
"out of reach", which version 1 reported as "not reproduced". Validation uses
:func:`mixprec.experiments.schema.schema_errors` (``jsonschema`` when installed, else its
built-in checker), plus the rules between fields that JSON Schema cannot say simply:

    reproduced | partly | not reproduced  ->  measured is non-empty, needs is null
    reproduced                            ->  every check is true
    out of reach                          ->  needs is a non-empty string, measured is empty
"""
from __future__ import annotations

from typing import Any

from .base import MEASURED_VERDICTS, RECORD_FIELDS, Verdict

__all__ = ["SCHEMA_ID", "RESULTS_SCHEMA", "results_errors", "validate_results"]

SCHEMA_ID = "mixprec.reproduce/2"

_SCALAR = {"type": ["number", "boolean"]}

RESULTS_SCHEMA: dict = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "title": "mixprec reproduce results",
    "type": "object",
    "required": ["schema", "created", "args", "environment", "seconds", "records"],
    "properties": {
        "schema": {"const": SCHEMA_ID},
        "created": {"type": "string"},
        "args": {"type": "object", "required": ["quick", "seed", "threads", "only"],
                 "properties": {"quick": {"type": "boolean"}, "seed": {"type": "integer"},
                                "threads": {"type": "integer", "minimum": 1},
                                "only": {"type": ["array", "null"],
                                         "items": {"type": "string"}}}},
        "environment": {"type": "object", "required": ["mixprec", "torch", "python",
                                                       "platform", "threads"]},
        "seconds": {"type": "number", "minimum": 0},
        "records": {"type": "array", "items": {"$ref": "#/$defs/record"}},
    },
    "$defs": {
        "record": {
            "type": "object",
            "required": list(RECORD_FIELDS),
            "additionalProperties": False,
            "properties": {
                "id": {"type": "string"}, "claim": {"type": "string"},
                "source": {"type": "string"}, "paper_value": {"type": "string"},
                "measured": {"type": "object", "additionalProperties": _SCALAR},
                "checks": {"type": "object", "additionalProperties": {"type": "boolean"}},
                "summary": {"type": "string"},
                "verdict": {"enum": [v.value for v in Verdict]},
                "needs": {"type": ["string", "null"]},
                "reason": {"type": "string"},
                "config": {"type": "object"},
                "seconds": {"type": "number", "minimum": 0},
                "plot": {"type": ["object", "null"]},
            },
        },
    },
}


def _record_rules(i: int, r: dict) -> list:
    where, verdict = f"$.records[{i}] ({r.get('id')})", r.get("verdict")
    measured, checks, needs = r.get("measured") or {}, r.get("checks") or {}, r.get("needs")
    errors = []
    if verdict in {v.value for v in MEASURED_VERDICTS}:
        if not measured:
            errors.append(f"{where}: verdict {verdict!r} without measured values")
        if needs is not None:
            errors.append(f"{where}: verdict {verdict!r} with needs {needs!r}")
    if verdict == Verdict.REPRODUCED.value and not all(checks.values()):
        errors.append(f"{where}: 'reproduced' with failed checks "
                      f"{[k for k, v in checks.items() if not v]}")
    if verdict == Verdict.OUT_OF_REACH.value and (not needs or measured):
        errors.append(f"{where}: 'out of reach' needs a non-empty `needs` and no measured "
                      f"values")
    return errors


def results_errors(doc: Any) -> list:
    """Every violation of the schema and of the rules between fields, as 'path: problem'."""
    from ..experiments.schema import schema_errors
    errors = schema_errors(doc, RESULTS_SCHEMA)
    if not errors:
        for i, r in enumerate(doc["records"]):
            errors += _record_rules(i, r)
    return errors


def validate_results(doc: Any) -> None:
    """Raise ValueError naming the first problems if ``doc`` is not a valid results document."""
    errors = results_errors(doc)
    if errors:
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        raise ValueError(f"reproduce results do not match {SCHEMA_ID}: "
                         + "; ".join(errors[:5]) + more)
