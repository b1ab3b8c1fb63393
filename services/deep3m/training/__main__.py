"""Train one member from the command line, printing progress as JSON lines.

``python -m deep3m.training train-member --config CONFIG.json --member 1fm
--store URL`` runs ``train_member`` in this process (resuming from the newest
snapshot). Used to run a member outside the services, and by the tests that
kill a training process to check that it resumes.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from deep3m.core.errors import Deep3mError
from deep3m.core.events import ProgressEvent
from deep3m.core.store import Store
from deep3m.training.config import TrainConfig
from deep3m.training.trainer import train_member


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m deep3m.training")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train-member", help="train one ensemble member")
    train.add_argument("--config", required=True, type=Path, help="TrainConfig as JSON")
    train.add_argument("--member", required=True)
    train.add_argument("--store", required=True, help="store URL where models/ are written")
    train.add_argument("--device", default="auto")
    train.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: default)")
    train.add_argument("--no-resume", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    def observer(event: ProgressEvent) -> None:
        print(json.dumps({"message": event.message, "metrics": dict(event.metrics)}), flush=True)

    try:
        config = TrainConfig.from_json(args.config.read_text())
        result = train_member(
            config,
            args.member,
            Store(args.store),
            observer=observer,
            resume=not args.no_resume,
            device=args.device,
        )
    except Deep3mError as exc:
        print(
            json.dumps({"error": exc.message, "field": exc.field, "code": exc.grpc_code_name}),
            flush=True,
        )
        return 1
    print(
        json.dumps(
            {"done": True, "iterations": result.iterations, "metrics": dict(result.metrics)}
        ),
        flush=True,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
