"""Training procedures for label-free domain adaptation.

Self-contained loops over the network constructors (``deep3m.models``) and the
shared adaptation floor (``deep3m.adaptation``): no target labels are used for
training or selection; target labels, when given, only score the candidates
(the oracle, for benchmarks). Entry point: :func:`methods.adapt`.
"""
