"""``python -m pycrcnn.parameters_tester``."""
import sys

from .tester import main

sys.exit(main())
