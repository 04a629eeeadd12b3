"""dpsgd: differentially private SGD experiments in TensorFlow, with honest privacy accounting."""

__version__ = "0.1.0"
