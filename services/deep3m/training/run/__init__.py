"""One member's training run, in steps, each in its own module.

``state.Run`` holds what the steps share (network, optimiser, data, clocks,
history, the best weights so far) and the distributed agreement helpers; the
steps are ``resume.restore`` (from the newest snapshot, or a clean start),
``iteration.step`` (one optimiser step), ``selection.report`` (loss, rate, ETA
and validation, keeping the best weights), ``snapshot.snapshot`` (by
iteration count and by wall time), ``finish.finish`` (weights and the
validation-chosen threshold), and ``loop.loop``, which strings them together.
``deep3m.training.trainer.train_member`` sets a run up and drives it.
"""
