"""The training role: train and fine-tune ensemble members, snapshot, resume, score.

Modules: ``config`` (TrainConfig from a TrainSpec), ``data`` (samples and
augmentation), ``validate`` (input checks before training), ``trainer``
(``train_member``), ``setup`` (device, training set, network, optimiser),
``run`` (the run loop in steps: resume, iteration, selection, snapshot,
finish), ``outputs`` (a member's documents in the store), ``checkpoint``
(snapshots), ``evaluate`` (validation metrics), ``plots`` (validation.png),
``distributed`` (DDP across a pod's devices), ``tasks`` (the worker's
``train``/``finalize`` handlers), ``service`` and ``app`` (the gRPC role),
``demo_data`` (the demo's data and recipe).
"""
