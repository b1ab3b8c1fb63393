"""The report page written: its sections in order, the summary of what it holds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from deep3m.client.report.documents import job_volumes, load_job
from deep3m.client.report.page import STYLE, escape
from deep3m.client.report.sections import (
    ReportSpec,
    accuracy_section,
    job_section,
    model_section,
    objects_section,
)
from deep3m.core.errors import NotFoundError
from deep3m.core.store import Store

REPORT_NAME = "index.html"


def build_report(store: Store, job_id: str, destination: Path, spec: ReportSpec) -> dict[str, Any]:
    """Write ``destination/index.html`` (and its PNGs and CSVs); returns what it holds."""
    record, result = load_job(store, job_id)
    volumes = job_volumes(record)
    ground_truth = spec.ground_truth or volumes.ground_truth
    for what, key in (("ground_truth", spec.ground_truth),):
        if key and not store.exists(f"{key}/zarr.json"):
            raise NotFoundError(f"{store.key_url(key)} is not a volume", field=what)
    destination.mkdir(parents=True, exist_ok=True)
    sections = [job_section(job_id, record, result)]
    summary: dict[str, Any] = {
        "job": job_id, "kind": record.get("kind"), "state": (result or {}).get("state"),
        "image": volumes.image or None, "probabilities": volumes.probabilities or None,
        "model": None, "accuracy": None, "objects": None,
    }  # fmt: skip
    model_html, summary["model"] = model_section(store, volumes.model)
    sections.append(model_html)
    prediction = volumes.probabilities
    ready = bool(prediction) and store.exists(f"{prediction}/zarr.json")
    if ready and store.volume_info(prediction).complete:
        if ground_truth:
            html_, summary["accuracy"] = accuracy_section(
                store, prediction, volumes.image, spec, ground_truth, destination
            )
            sections.append(html_)
        html_, summary["objects"] = objects_section(store, prediction, spec, destination)
        sections.append(html_)
    elif prediction:
        sections.append(
            f"<h2>Outputs</h2><p class='note'>{escape(prediction)} is not complete yet.</p>"
        )
    if spec.viewer_link or volumes.image:
        command = f"deep3m view {volumes.image}" + (
            f" --probabilities {prediction}" if prediction else ""
        )
        link = (
            f"<p><a href='{escape(spec.viewer_link)}'>open in Neuroglancer</a> "
            "(while <code>deep3m view</code> serves it)</p>"
            if spec.viewer_link
            else ""
        )
        sections.append(
            f"<h2>Viewer</h2>{link}<p>Serve the volumes with <code>{escape(command)}</code> "
            f"(store {escape(store.url)}).</p>"
        )
    title = f"deep3m report: job {job_id}"
    page = (
        "<!doctype html>\n<html lang='en'><head><meta charset='utf-8'>"
        f"<title>{escape(title)}</title><style>{STYLE}</style></head><body>"
        f"<h1>{escape(title)}</h1>\n" + "\n".join(s for s in sections if s) + "\n</body></html>\n"
    )
    out = destination / REPORT_NAME
    out.write_text(page, encoding="utf-8")
    summary["html"] = str(out)
    summary["files"] = sorted(str(p.relative_to(destination)) for p in destination.rglob("*.png"))
    return summary
