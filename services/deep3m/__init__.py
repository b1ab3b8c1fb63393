"""deep3m: plug-and-play deep-learning segmentation of large microscopy volumes."""

__version__ = "0.1.0"
