"""The original PyCrCNN's ``parameters_tester.utils`` package."""
