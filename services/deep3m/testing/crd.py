"""Check custom resources (KEDA, Prometheus Operator, Karpenter) against their CRD schemas.

``jsonschema`` checks types and required fields; ``unknown_fields`` adds what
the API server's strict field validation does and plain JSON Schema does not:
it lists fields the structural schema does not declare (the API server would
drop or refuse them).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml


def crd_schema(path: Path, version: str) -> dict[str, Any]:
    """The ``openAPIV3Schema`` of ``version`` in the CRD file at ``path``."""
    crd = yaml.safe_load(path.read_text())
    for entry in crd["spec"]["versions"]:
        if entry["name"] == version:
            schema: dict[str, Any] = entry["schema"]["openAPIV3Schema"]
            return schema
    names = [v["name"] for v in crd["spec"]["versions"]]
    raise LookupError(f"{path.name} has no version {version!r} (it has {names})")


def unknown_fields(obj: Any, schema: dict[str, Any], path: str = "") -> list[str]:
    """Dotted paths of fields in ``obj`` that ``schema`` does not declare."""
    if schema.get("x-kubernetes-preserve-unknown-fields"):
        return []
    found: list[str] = []
    if isinstance(obj, dict):
        properties = schema.get("properties")
        extra = schema.get("additionalProperties")
        for key, value in obj.items():
            where = f"{path}.{key}" if path else key
            if not path and key in ("apiVersion", "kind", "metadata"):
                continue  # the object envelope, checked by the API server itself
            if properties is not None and key in properties:
                found += unknown_fields(value, properties[key], where)
            elif isinstance(extra, dict):
                found += unknown_fields(value, extra, where)
            elif extra is True:
                continue
            else:
                found.append(where)
    elif isinstance(obj, list) and isinstance(schema.get("items"), dict):
        for index, item in enumerate(obj):
            found += unknown_fields(item, schema["items"], f"{path}[{index}]")
    return found
