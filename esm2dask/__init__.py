"""esm2dask: BioNeMo ESM2nv pre-training data (UniRef50/90 CSV shards) on Dask."""

__version__ = "0.1.0"

from .errors import ConfigError, Esm2DaskError, InputError, OutputError  # noqa: E402

__all__ = ["__version__", "Esm2DaskError", "InputError", "ConfigError", "OutputError"]
