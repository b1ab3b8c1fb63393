"""Finished adaptation stages in the store, so that a re-leased task continues after them.

Under one folder (the member's ``adaptation/``), each finished unsupervised stage
is ``stage-<n>-<name>.safetensors`` (its networks' weights and the torch RNG) and
then ``stage-<n>-<name>.json`` (its log); each scored candidate of the supervised
stage is ``candidate-<iteration>.safetensors`` (weights, optimiser state, torch
RNG) and then ``candidate-<iteration>.json`` (its figures, the learning-rate
schedule, the patch sampler's RNG, the losses so far). The JSON is written last
and carries the run's fingerprint: a record whose JSON is missing or unreadable,
whose tensors do not load, or that belongs to another run is no record (that stage
is run again, and the records after it are dropped).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from deep3m.adaptation.morphology import Morphology
from deep3m.core.errors import Deep3mError
from deep3m.core.store import Store
from deep3m.models.card import read_safetensors
from deep3m.training.adaptation.candidates import Candidate
from deep3m.training.adaptation.loops import StageLog, StageState
from deep3m.training.checkpoint import flatten_optimizer, unflatten_optimizer, write_record

log = logging.getLogger("deep3m.training")

# What a malformed record raises on the way in: each means "not a record".
_UNREADABLE = (Deep3mError, KeyError, TypeError, ValueError, RuntimeError, OSError)


@dataclass(frozen=True)
class CandidateRecord:
    """A scored candidate and what the supervised stage needs to continue after it."""

    candidate: Candidate
    optimizer: dict[str, Any]
    scheduler: dict[str, Any] | None
    sampler: dict[str, Any]
    rng: torch.Tensor
    losses: tuple[float, ...]


def _morphology(doc: Mapping[str, Any]) -> Morphology:
    def number(v: Any) -> float:
        return math.nan if v is None else float(v)

    return Morphology(number(doc["solidity"]), number(doc["relative_area"]), int(doc["regions"]))


def _under(tensors: Mapping[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors saved under ``prefix.``, without it."""
    return {k[len(prefix) + 1 :]: v for k, v in tensors.items() if k.startswith(f"{prefix}.")}


def _copy(module: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _ignored(what: str, which: str, exc: BaseException) -> None:
    # Not an error: the stage is run again. Said once, so a lost record is visible.
    log.warning("ignoring %s", what, extra={"record": which, "error": str(exc)})


def _optional(v: Any) -> float | None:
    return None if v is None else float(v)


class StageJournal:
    """The finished stages of one adaptation run, kept under ``prefix`` in ``store``."""

    def __init__(self, store: Store, prefix: str, fingerprint: Mapping[str, Any]) -> None:
        self.store = store
        self.prefix = prefix.rstrip("/")
        # Compared as canonical JSON: what a record was written under, read back.
        self.fingerprint = json.loads(json.dumps(fingerprint, sort_keys=True))

    def _stage_stem(self, index: int, name: str) -> str:
        return f"{self.prefix}/stage-{index:02d}-{name}"

    def _candidate_stem(self, iteration: int) -> str:
        return f"{self.prefix}/candidate-{iteration:08d}"

    def _write(self, stem: str, tensors: Mapping[str, torch.Tensor], doc: dict[str, Any]) -> None:
        write_record(self.store, stem, tensors, {"fingerprint": self.fingerprint, **doc})

    def _read(self, stem: str) -> tuple[dict[str, Any], dict[str, torch.Tensor]] | None:
        if not self.store.exists(f"{stem}.json"):
            return None
        try:
            doc = self.store.read_json(f"{stem}.json")
            if not isinstance(doc, dict) or doc.get("fingerprint") != self.fingerprint:
                log.warning("ignoring a stage record of another run", extra={"record": stem})
                return None
            return doc, read_safetensors(self.store, f"{stem}.safetensors")
        except _UNREADABLE as exc:
            _ignored("an unreadable record", stem, exc)
            return None

    # -- unsupervised stages ---------------------------------------------------
    def save_stage(
        self, index: int, name: str, stage_log: StageLog, modules: Mapping[str, nn.Module]
    ) -> None:
        tensors = {
            f"{prefix}.{k}": v for prefix, m in modules.items() for k, v in m.state_dict().items()
        }
        tensors["rng.torch"] = torch.get_rng_state()
        self._write(self._stage_stem(index, name), tensors, {"log": asdict(stage_log)})

    def load_stage(
        self, index: int, name: str, modules: Mapping[str, nn.Module]
    ) -> StageLog | None:
        """The stage's log once its weights are in ``modules`` and the torch RNG is where
        the stage left it; None (nothing changed) when there is no usable record."""
        found = self._read(self._stage_stem(index, name))
        if found is None:
            return None
        doc, tensors = found
        try:
            states = {p: _under(tensors, p) for p in modules}
            backups = {p: _copy(m) for p, m in modules.items()}
            try:
                for prefix, m in modules.items():
                    m.load_state_dict(states[prefix], strict=True)
            except RuntimeError:
                for prefix, m in modules.items():
                    m.load_state_dict(backups[prefix])
                raise
            entry = doc["log"]
            stage_log = StageLog(
                name=str(entry["name"]),
                iterations=int(entry["iterations"]),
                seconds=float(entry["seconds"]),
                first_loss=float(entry["first_loss"]),
                last_loss=float(entry["last_loss"]),
                losses=tuple(float(v) for v in entry["losses"]),
            )
            rng = tensors["rng.torch"].to(torch.uint8)
        except _UNREADABLE as exc:
            _ignored("an unusable stage record", name, exc)
            return None
        torch.set_rng_state(rng)
        return stage_log

    # -- the supervised stage's candidates -----------------------------------
    def save_candidate(
        self, candidate: Candidate, state: StageState, sampler: Mapping[str, Any]
    ) -> None:
        opt_tensors, opt_doc = flatten_optimizer(state.optimizer.state_dict())
        tensors = {f"net.{k}": v for k, v in candidate.state.items()}
        tensors.update(opt_tensors)
        tensors["rng.torch"] = torch.get_rng_state()
        doc = {
            "name": candidate.name,
            "stage": candidate.stage,
            "iteration": candidate.iteration,
            "morphology": candidate.morphology.to_dict(),
            "source_validation_iou": candidate.source_validation_iou,
            "target_iou": candidate.target_iou,
            "optimizer": opt_doc,
            "scheduler": state.scheduler.state_dict() if state.scheduler is not None else None,
            "sampler": dict(sampler),
            "losses": list(state.losses),
        }
        self._write(self._candidate_stem(candidate.iteration), tensors, doc)

    def load_candidates(
        self, iterations: Sequence[int], expected: Mapping[str, torch.Tensor]
    ) -> list[CandidateRecord]:
        """The usable records of the candidates at ``iterations``, up to the first missing
        one; usable means weights of ``expected``'s names and shapes."""
        shapes = {k: tuple(v.shape) for k, v in expected.items()}
        found: list[CandidateRecord] = []
        for iteration in iterations:
            record = self._candidate(iteration, shapes)
            if record is None:
                break
            found.append(record)
        return found

    def _candidate(
        self, iteration: int, shapes: Mapping[str, tuple[int, ...]]
    ) -> CandidateRecord | None:
        read = self._read(self._candidate_stem(iteration))
        if read is None:
            return None
        doc, tensors = read
        try:
            if int(doc["iteration"]) != iteration:
                raise ValueError(f"record of iteration {doc['iteration']}, not {iteration}")
            candidate = Candidate(
                name=str(doc["name"]),
                stage=str(doc["stage"]),
                iteration=iteration,
                morphology=_morphology(doc["morphology"]),
                source_validation_iou=_optional(doc["source_validation_iou"]),
                target_iou=_optional(doc["target_iou"]),
                state=_under(tensors, "net"),
            )
            got = {k: tuple(v.shape) for k, v in candidate.state.items()}
            if got != shapes:
                raise ValueError("its weights are not this network's")
            np.random.default_rng().bit_generator.state = doc["sampler"]  # a valid state?
            return CandidateRecord(
                candidate=candidate,
                optimizer=unflatten_optimizer(tensors, doc["optimizer"]),
                scheduler=doc["scheduler"],
                sampler=dict(doc["sampler"]),
                rng=tensors["rng.torch"].to(torch.uint8),
                losses=tuple(float(v) for v in doc["losses"]),
            )
        except _UNREADABLE as exc:
            _ignored("an unusable candidate record", str(iteration), exc)
            return None

    # -- records after a re-run ------------------------------------------------
    def discard(self, *, stages_from: int | None = None, candidates_from: int = 0) -> None:
        """Drop the stage records from index ``stages_from`` on (when given) and the
        candidate records past iteration ``candidates_from``: they followed a stage
        that runs again. JSON first, so no tensors are left behind a marker."""
        names = self.store.list(self.prefix)
        doomed: list[str] = []
        for name in names:
            stem, _, ext = name.rpartition(".")
            if ext not in ("json", "safetensors"):
                continue
            kind, _, rest = stem.partition("-")
            number = rest.split("-", 1)[0]
            if not number.isdigit():
                continue
            if (kind == "stage" and stages_from is not None and int(number) >= stages_from) or (
                kind == "candidate" and int(number) > candidates_from
            ):
                doomed.append(name)
        for name in sorted(doomed, key=lambda n: not n.endswith(".json")):
            self.store.delete(f"{self.prefix}/{name}")
