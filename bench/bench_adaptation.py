"""Label-free domain adaptation: target IoU per method and per checkpoint choice.

Source ``../shared/data/cdeep3m-mito`` (SBEM, mouse brain, 5.9 nm) → target
``../shared/data/isbi2012`` mitochondria (ssTEM, Drosophila VNC, 4 nm), and the
reverse. The target's labels only score (never train or choose), except for the
few-label and supervised reference rows, which are meant to use them.

Pixel sizes differ, so by default both domains are put on the SBEM grid (5.9 nm,
the coarser one) as a user would before adapting: isbi2012 slices are resampled
by 4/5.9 (512 → 347 px), whether they are the target or the source
(``--no-rescale`` keeps native pixels). Voxel sizes are the data's own (see
``../shared/data/README.md``).

Splits: cdeep3m-mito training (20 slices) / validation (10); isbi2012 slices
0–19 / 20–29. As source: the first split trains, the second is the source
validation set. As target: all 30 slices are the unlabelled target images (what
the adaptation and the morphology prior see), slices of the first split are the
few-label training set, the second split scores. cdeep3m-mito slices are cropped
to their central ``--crop`` px where they are predicted (validation, target) to
bound CPU time; training uses whole slices.

Every method gets the same supervised iterations (calibrated once from
``--minutes``: the baseline's iterations per minute), patch, batch, augmentation
(8 in-plane variations) and seed; unsupervised stages (pretext, Y-Net stages 1–2,
translator) get as many iterations again. Few-label fine-tuning starts from the
baseline's last checkpoint with a tenth of the iterations. For each method the
table gives the target IoU of the checkpoint chosen by solidity, by the source
validation IoU, the last, and the oracle (best target IoU), mean ± sd over seeds,
and the wall time.

Calibration measures the machine as it is: on a loaded machine ``--iterations N``
gives the same budget every time.

``python -m bench adaptation --minutes 1 --seeds 2`` (add ``--directions
sbem-to-sstem`` for one direction, ``--methods none histogram`` for a subset).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from deep3m.adaptation.resample import rescale_stack
from deep3m.models.translation import TranslationConfig
from deep3m.training.adaptation.candidates import CandidateRecorder, load_state, selections
from deep3m.training.adaptation.data import Domain, PatchSampler
from deep3m.training.adaptation.loops import Schedule, run_stage
from deep3m.training.adaptation.methods import METHODS, AdaptationResult, AdaptationSpec, adapt
from deep3m.training.adaptation.networks import build_segmenter, segmentation_loss
from deep3m.training.adaptation.runtime import StageRuntime, use
from deep3m.training.precision import precision_for
from deep3m.training.trainer import pick_device

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"
SBEM_NM = 5.9  # cdeep3m-mito in-plane pixel size
SSTEM_NM = 4.0  # isbi2012
DIRECTIONS = ("sbem-to-sstem", "sstem-to-sbem")
PREDICT_HM = "none+predict-hm"
CHOICES = ("solidity", "validation", "last", "oracle")


def _read(files: Sequence[Path], labels: bool = False) -> np.ndarray:
    from PIL import Image

    if not files:
        raise SystemExit(f"no images under {DATA.resolve()}: the benchmark needs the shared data")
    if labels:  # palette PNGs: raw index; 0/255 masks: > 0
        return np.stack([np.asarray(Image.open(f)) > 0 for f in files])
    return np.stack([np.asarray(Image.open(f).convert("L")) for f in files])


@dataclass(frozen=True)
class Dataset:
    name: str
    voxel_nm: float
    first: tuple[np.ndarray, np.ndarray]
    second: tuple[np.ndarray, np.ndarray]


def load_sbem() -> Dataset:
    root = DATA / "cdeep3m-mito"
    tr = sorted((root / "training" / "images").glob("*.png"))
    tl = sorted((root / "training" / "labels").glob("*.png"))
    vr = sorted((root / "validation" / "images").glob("*.png"))
    vl = sorted((root / "validation" / "labels").glob("*.png"))
    return Dataset(
        "cdeep3m-mito", SBEM_NM, (_read(tr), _read(tl, True)), (_read(vr), _read(vl, True))
    )


def load_sstem() -> Dataset:
    root = DATA / "isbi2012" / "train"
    img = _read(sorted((root / "images").glob("*.png"), key=lambda p: int(p.stem)))
    lbl = _read(sorted((root / "mitochondria").glob("*.png"), key=lambda p: int(p.stem)), True)
    return Dataset("isbi2012", SSTEM_NM, (img[:20], lbl[:20]), (img[20:], lbl[20:]))


def _to_grid(ds: Dataset, nm: float) -> Dataset:
    def r(pair: tuple[np.ndarray, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return (
            rescale_stack(pair[0], ds.voxel_nm, nm),
            rescale_stack(pair[1].astype(np.uint8), ds.voxel_nm, nm, labels=True) > 0,
        )

    return Dataset(ds.name, nm, r(ds.first), r(ds.second))


def _crop(a: np.ndarray, size: int) -> np.ndarray:
    if size <= 0:
        return a
    y0, x0 = max(0, (a.shape[1] - size) // 2), max(0, (a.shape[2] - size) // 2)
    return a[:, y0 : y0 + size, x0 : x0 + size]


@dataclass(frozen=True)
class Setup:
    source: Domain
    source_validation: Domain
    target: Domain
    target_labelled: Domain
    target_scoring: Domain
    note: str


def setup(direction: str, *, rescale: bool, crop: int) -> Setup:
    sbem, sstem = load_sbem(), load_sstem()
    if rescale:
        sstem = _to_grid(sstem, SBEM_NM)
    src, tgt = (sbem, sstem) if direction == "sbem-to-sstem" else (sstem, sbem)

    def c(ds: Dataset, a: np.ndarray) -> np.ndarray:
        return _crop(a, crop) if ds is sbem else a

    source = Domain.of(src.name, *src.first)
    source_val = Domain.of(f"{src.name}-val", c(src, src.second[0]), c(src, src.second[1]))
    target = Domain(
        tgt.name, (c(tgt, tgt.first[0]), c(tgt, tgt.second[0]))
    )  # unlabelled: all its slices
    target_lab = Domain.of(f"{tgt.name}-few", *tgt.first)
    target_score = Domain.of(f"{tgt.name}-test", c(tgt, tgt.second[0]), c(tgt, tgt.second[1]))
    note = (
        f"{src.name} ({src.voxel_nm} nm, {source.images[0].shape}) → {tgt.name} "
        f"({tgt.voxel_nm} nm, slices {[s.shape for s in target.images]}); "
        + ("isbi2012 resampled 4 → 5.9 nm" if rescale else "native pixel sizes")
        + (f"; cdeep3m-mito predicted on central {crop}² crops" if crop else "")
    )
    return Setup(source, source_val, target, target_lab, target_score, note)


def calibrate(spec: AdaptationSpec, source: Domain, minutes: float) -> tuple[int, float]:
    """Supervised iterations that fit ``minutes`` for the baseline network, and s/iteration."""
    net = build_segmenter(spec.architecture, frames=spec.frames, width=spec.width)
    sampler = PatchSampler(source, patch=spec.patch, frames=spec.frames, seed=0)

    def step() -> torch.Tensor:
        return segmentation_loss(net, *sampler.labelled_sample(spec.batch))

    run_stage("warm-up", step, train=[net], schedule=Schedule(3, 1e-3))
    log = run_stage("calibrate", step, train=[net], schedule=Schedule(10, 1e-3))
    per_it = log.seconds / 10
    return max(10, int(minutes * 60 / per_it)), per_it


def _predict_hm_row(result: AdaptationResult, s: Setup) -> dict[str, Any]:
    """The baseline's candidates again, predicting target images matched to the training
    histogram (the prediction-time direction of histogram matching)."""
    from deep3m.adaptation.histogram import HistogramReference

    hist = HistogramReference.from_dict(result.card["adaptation"]["training_histogram"])
    net = result.net
    rec = CandidateRecorder(
        net,
        s.target,
        source_validation=s.source_validation,
        target_scoring=s.target_scoring,
        predict_histogram=hist,
    )
    for cand in result.candidates:
        load_state(net, cand.state)
        rec(cand.iteration)
    return selections(rec.candidates, result.reference)


def run(args: argparse.Namespace) -> dict[str, Any]:
    torch.set_num_threads(args.threads)
    base = AdaptationSpec(
        architecture=args.architecture,
        width=args.width,
        patch=args.patch,
        batch=args.batch,
        checkpoints=args.checkpoints,
        translation=replace(TranslationConfig.cpu(), patch=min(args.patch, 64)),
        ynet_width=args.ynet_width,
    )
    report: dict[str, Any] = {"args": vars(args), "directions": {}}
    for direction in args.directions:
        s = setup(direction, rescale=not args.no_rescale, crop=args.crop)
        iters, per_it = calibrate(base, s.source, args.minutes)
        if args.iterations:  # a fixed budget, comparable across machines and loads
            iters = args.iterations
        print(f"\n## {direction}: {s.note}", flush=True)
        print(
            f"supervised budget {iters} iterations ({per_it * 1000:.0f} ms each for "
            f"{base.architecture} width {base.width}, batch {base.batch}, patch {base.patch}², "
            f"{torch.get_num_threads()} threads); unsupervised stages +{iters} iterations; "
            f"{base.checkpoints} checkpoint candidates",
            flush=True,
        )
        rows: dict[str, list[dict[str, Any]]] = {}
        for seed in range(args.seeds):
            baseline: AdaptationResult | None = None
            # The baseline first: few-label fine-tuning starts from it.
            for method in sorted(args.methods, key=lambda m: m != "none"):
                if method == PREDICT_HM:
                    continue
                spec = replace(
                    base, method=method, seed=seed, iterations=iters, unsupervised_iterations=iters
                )
                t0 = time.perf_counter()
                result = adapt(
                    spec,
                    s.source,
                    s.target,
                    source_validation=s.source_validation,
                    target_scoring=s.target_scoring,
                    target_labelled=s.target_labelled,
                    base_state=baseline.candidates[-1].state if baseline else None,
                )
                wall = time.perf_counter() - t0
                if method == "none":
                    baseline = result
                row = {"seed": seed, "wall_s": wall, **result.metrics["selected"]}
                row["candidates"] = result.metrics["candidates"]
                row["fallback"] = result.metrics["choice"].get("fallback")
                rows.setdefault(method, []).append(row)
                print(_line(method, seed, row), flush=True)
                if method == "none" and PREDICT_HM in args.methods:
                    # The baseline's training plus re-scoring its candidates.
                    t0 = time.perf_counter()
                    hm = {"seed": seed, **_predict_hm_row(result, s)}
                    hm["wall_s"] = wall + time.perf_counter() - t0
                    rows.setdefault(PREDICT_HM, []).append(hm)
                    print(_line(PREDICT_HM, seed, hm), flush=True)
        report["directions"][direction] = {"note": s.note, "iterations": iters, "rows": rows}
        _table(direction, rows)
    return report


def _iou(row: dict[str, Any], choice: str) -> float | None:
    entry = row.get(choice) or {}
    v = entry.get("target_iou")
    return None if v is None else float(v)


def _line(method: str, seed: int, row: dict[str, Any]) -> str:
    figs = "  ".join(
        f"{c} {v:.3f}" if (v := _iou(row, c)) is not None else f"{c} -" for c in CHOICES
    )
    return f"  seed {seed} {method:<18} target IoU: {figs}   ({row['wall_s']:.0f} s)"


def _stat(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.mean(values):.3f}±{statistics.stdev(values):.3f}"


def _table(direction: str, rows: dict[str, list[dict[str, Any]]]) -> None:
    print(f"\n{direction}: target foreground IoU (mean ± sd over seeds)")
    head = (
        f"{'method':<18}"
        + "".join(f"{c:>14}" for c in CHOICES)
        + f"{'Δ solidity':>12}{'wall s':>9}"
    )
    print(head)
    base = [v for r in rows.get("none", []) if (v := _iou(r, "solidity")) is not None]
    for method, rs in rows.items():
        cells = []
        for c in CHOICES:
            cells.append(_stat([v for r in rs if (v := _iou(r, c)) is not None]))
        sol = [v for r in rs if (v := _iou(r, "solidity")) is not None]
        delta = f"{statistics.mean(sol) - statistics.mean(base):+.3f}" if sol and base else "-"
        wall = statistics.mean(r["wall_s"] for r in rs)
        print(f"{method:<18}" + "".join(f"{c:>14}" for c in cells) + f"{delta:>12}{wall:>9.0f}")
    gaps = [
        o - so
        for rs in rows.values()
        for r in rs
        if (o := _iou(r, "oracle")) is not None and (so := _iou(r, "solidity")) is not None
    ]
    if gaps:
        print(
            f"solidity choice vs oracle: mean gap {statistics.mean(gaps):.3f}, "
            f"worst {max(gaps):.3f} IoU over {len(gaps)} runs"
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="bench_adaptation")
    parser.add_argument(
        "--minutes",
        type=float,
        default=float(os.environ.get("DEEP3M_BENCH_ADAPT_MINUTES", "1")),
        help="supervised CPU budget per method (calibrated into iterations)",
    )
    parser.add_argument(
        "--iterations", type=int, default=0, help="supervised iterations (overrides --minutes)"
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--directions", nargs="+", choices=DIRECTIONS, default=list(DIRECTIONS))
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=(*METHODS, PREDICT_HM),
        default=["none", PREDICT_HM, *METHODS[1:]],
    )
    parser.add_argument("--architecture", default="resunet2d")
    parser.add_argument("--width", type=float, default=0.25)
    parser.add_argument("--ynet-width", type=float, default=0.5)
    parser.add_argument("--patch", type=int, default=128)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=5)
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--no-rescale", action="store_true")
    parser.add_argument(
        "--threads", type=int, default=int(os.environ.get("DEEP3M_BENCH_THREADS", "1"))
    )
    parser.add_argument("--json", type=Path, default=None, help="write every figure here")
    parser.add_argument(
        "--device", default="cpu", help="cpu, cuda or auto (the training worker's choice)"
    )
    args = parser.parse_args(list(argv) if argv is not None else [])
    if "fewlabel" in args.methods and "none" not in args.methods:
        parser.error("fewlabel fine-tunes the baseline: include 'none' in --methods")
    device = pick_device(args.device)
    precision = precision_for(device, mixed_precision=True, cpu_bfloat16=False)
    # Every stage, the calibration's included, on the chosen device.
    with use(StageRuntime(device=device, precision=precision)):
        report = run(args)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    import sys

    main(sys.argv[1:])
