"""The report of a job: one self-contained HTML page, with its figures as PNGs beside it.

From the job's documents in the store (``jobs/<job>/job.json``, ``result.json``)
it finds the inputs, the model and the outputs, and shows: the job and its input
volumes; the model card; with ground truth, the accuracy (voxels and objects) and
error overlays; the objects of the probability map (counts, a table of the
largest, sizes and density profiles); and a link to view the volumes. Every
image is embedded in the page (``data:`` URIs), so the page alone can be mailed
or archived; the PNGs and CSVs beside it are for other tools.

Modules: ``documents`` (the job's record and result, the volumes it names),
``page`` (HTML pieces and embedded figures), ``sections`` (the options and each
section of the page), ``build`` (the page written).
"""

from deep3m.client.report.build import REPORT_NAME, build_report
from deep3m.client.report.documents import JobVolumes, job_volumes, load_job
from deep3m.client.report.sections import ReportSpec

__all__ = ["REPORT_NAME", "JobVolumes", "ReportSpec", "build_report", "job_volumes", "load_job"]
