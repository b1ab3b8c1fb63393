"""Reports and model selection: loss, iterations/s and ETA into the history and a
progress event; on validation iterations the validation figures, keeping the
weights of the best F1 so far (``best.safetensors`` with ``keep_best``)."""

from __future__ import annotations

from deep3m.training.evaluate import evaluate
from deep3m.training.outputs import best_key
from deep3m.training.run.documents import VALIDATION_KEYS, write_metrics
from deep3m.training.run.state import Run, cpu_state


def validate(run: Run, done: int) -> dict[str, float]:
    """Validation figures; keeps the weights when they are the best so far."""
    with run.autocast():  # bfloat16 where training uses it: half the CPU time
        scores = evaluate(run.net, run.data.validation, run.frames, run.device)
    if scores["f1"] > run.best_f1:
        run.best_f1, run.best_iteration = scores["f1"], done
        if run.config.keep_best:
            from safetensors.torch import save as save_safetensors

            run.best_state = cpu_state(run.net)
            run.store.write_bytes(
                best_key(run.config.model_id, run.member), save_safetensors(run.best_state)
            )
    return scores


# A plan this long (at the first measured rate) is announced, with how to bound it.
LONG_PLAN_S = 3600.0


def long_plan_note(eta_s: float, device_type: str) -> str:
    """The note a member's first report carries when its plan would take hours."""
    return (
        f"; at this rate the plan needs about {eta_s / 3600.0:.1f} h on {device_type}: "
        "bound it with --minutes or fewer --iterations"
    )


def report(
    run: Run, done: int, loss: float, lr: float, steps: int, seconds: float,
    samples_per_iteration: int, validate_now: bool,
) -> None:  # fmt: skip
    """History entry and progress event: loss, iterations/s, ETA, validation."""
    config, total = run.config, run.config.total_iterations
    per_step = seconds / steps
    eta = per_step * (total - done)
    if config.max_minutes:
        eta = min(eta, max(config.max_minutes * 60.0 - run.elapsed(), 0.0))
    entry: dict[str, float] = {
        "iteration": float(done),
        "loss": loss,
        "lr": lr,
        "samples_per_second": steps * samples_per_iteration / seconds,
        "iterations_per_second": steps / seconds,
        "elapsed_seconds": run.elapsed(),
    }
    message = f"{run.member}: iteration {done}/{total}, loss {loss:.4f}"
    if not run.history and eta > LONG_PLAN_S:
        message += long_plan_note(eta, run.device.type)
    if validate_now and run.rank == 0:
        scores = validate(run, done)
        entry.update(scores)
        message += f", val F1 {scores['f1']:.3f}"
    run.history.append(entry)
    # Every event carries the latest validation figures (``latest_f1`` …) so a
    # progress display need not remember them; validation events also the bare keys.
    latest: dict[str, float] = {}
    for h in run.history:
        if "f1" in h:
            latest = {f"latest_{k}": h[k] for k in VALIDATION_KEYS if k in h}
            latest["latest_validation_iteration"] = h["iteration"]
    run.publish(done, {**latest, **entry}, message, eta)
    if validate_now:
        write_metrics(run, done, complete=False)
