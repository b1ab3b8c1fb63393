"""Label-free domain adaptation, the parts training and inference share.

Histogram matching (``histogram``), the morphology prior for checkpoint
selection (``morphology``), the self-supervised pretext degradation
(``pretext``) and resampling to another pixel size (``resample``). Plain numpy /
torch, no I/O, so both roles can import them.
"""
