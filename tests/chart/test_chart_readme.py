"""The chart README is generated from values.yaml and kept up to date."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import yaml

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "helm" / "tools" / "values_readme.py"
CHART = REPO / "helm" / "deep3m"


def _tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("values_readme", TOOL)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_readme_is_up_to_date() -> None:
    result = subprocess.run(
        [sys.executable, str(TOOL), "--check"], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr


def test_every_value_has_a_described_row() -> None:
    tool = _tool()
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    rows = tool.rows(text, schema)
    keys = [row[0] for row in rows]
    assert len(keys) == len(set(keys))
    assert all(description for *_, description in rows), [k for k, *_, d in rows if not d]
    # Every top-level value appears, with its default as values.yaml gives it.
    values = yaml.safe_load(text)
    for top in values:
        assert any(k == top or k.startswith(f"{top}.") for k in keys), top
    table = {k: d for k, _, d, _ in rows}
    assert table["store.url"] == '`""`'
    assert table["inference.autoscaling.maxReplicas"] == "`4`"
    assert table["training.tolerations"].startswith('`[{"key": "nvidia.com/gpu"')


def test_a_changed_value_makes_the_readme_stale() -> None:
    tool = _tool()
    text = (CHART / "values.yaml").read_text()
    schema = json.loads((CHART / "values.schema.json").read_text())
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    current = tool.render(text, schema, chart)
    assert current == (CHART / "README.md").read_text()
    changed = text.replace("logLevel: INFO", "logLevel: DEBUG")
    assert changed != text
    assert tool.render(changed, schema, chart) != current
