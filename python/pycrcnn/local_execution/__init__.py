"""The original PyCrCNN's ``pycrcnn.local_execution``: see :mod:`.local_execution`."""
from .local_execution import local_execution

__all__ = ["local_execution"]
