"""One optimiser step: the iteration's samples, forward and backward (with gradient
accumulation, autocast and the gradient scaler where used), the update."""

from __future__ import annotations

import torch

from deep3m.training.data import iteration_rng, sample_batch
from deep3m.training.objectives import training_loss
from deep3m.training.run.state import Run, maybe_no_sync


def step(run: Run, it: int) -> tuple[float, float]:
    """One optimiser step (with gradient accumulation); returns (loss, lr)."""
    config = run.config
    lr = config.learning_rate_at(it, run.elapsed())
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    rng = iteration_rng(config.seed, run.rank, it)
    run.optimizer.zero_grad(set_to_none=True)
    step_loss = 0.0
    memory = torch.channels_last if run.channels_last else torch.contiguous_format
    for micro in range(config.accumulate_gradients):
        x, y = sample_batch(
            run.data.train,
            rng,
            batch=config.batch_size,
            frames=run.frames,
            patch=config.patch_shape,
            intensity=config.intensity_augmentations,
            foreground_fraction=config.foreground_fraction,
        )
        xt = torch.from_numpy(x).to(run.device, non_blocking=True)
        xt = xt.contiguous(memory_format=memory)
        yt = torch.from_numpy(y).to(run.device, non_blocking=True)
        last = micro == config.accumulate_gradients - 1
        with maybe_no_sync(run.model, run.world > 1 and not last):
            with run.autocast():
                logits = run.model(xt)
            loss = training_loss(config.loss, logits, yt, run.weights) / config.accumulate_gradients
            if run.scaler is not None:
                run.scaler.scale(loss).backward()
            else:
                loss.backward()
        step_loss += float(loss.detach().item())
    if run.scaler is not None:
        run.scaler.step(run.optimizer)
        run.scaler.update()
    else:
        run.optimizer.step()
    return step_loss, lr
