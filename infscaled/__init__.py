"""infscaled: serve deep-learning models as pipelines of stage workers."""

__version__ = "0.1.0"
