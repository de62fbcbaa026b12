"""The NSD tolerance default, in a module of its own so that the ``resunet evaluate`` parser can show it
without importing numpy and scipy (resunet.evaluation.metrics re-exports it)."""

#: Default tolerance (mm) of the normalised surface distance (NSD), ``--tolerance-mm``.
DEFAULT_TOLERANCE_MM = 2.0
