"""bconv's version, in a module of its own so that checkpoints can record it without a circular import."""

__version__ = "0.3.0.dev0"
