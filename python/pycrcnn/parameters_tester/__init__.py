"""The parameter tester: runs a model encrypted under several parameter sets
and reports noise, plaintext growth and error per layer (see :mod:`.tester`).
``python -m pycrcnn.parameters_tester CONFIG.json`` runs it from the command
line; ``utils.utils`` is the original PyCrCNN's helper module."""
from .tester import load_config, main, plot_results, run_tests

__all__ = ["run_tests", "load_config", "plot_results", "main"]
