"""esm2dask: BioNeMo ESM2nv pre-training data (UniRef50/90 CSV shards) on Dask."""

__version__ = "0.1.0"

import os as _os


def _numba_cache_dir() -> None:
    """Where numba may cache the compiled kernel. Its own choice is ``__pycache__`` beside
    the source, then the user's cache folder; a user who may write neither (a shared
    install, a service account without a home) got "cannot cache function" on every run.
    Then the cache goes under ``$XDG_CACHE_HOME`` (``~/.cache``), else the temporary folder.
    Set before numba is imported; an explicit ``$NUMBA_CACHE_DIR`` wins."""
    if "NUMBA_CACHE_DIR" in _os.environ:
        return
    here = _os.path.dirname(_os.path.abspath(__file__))
    pycache = _os.path.join(here, "__pycache__")
    if _os.access(pycache if _os.path.isdir(pycache) else here, _os.W_OK):
        return
    import tempfile

    base = _os.environ.get("XDG_CACHE_HOME") or _os.path.expanduser("~/.cache")
    for folder in (_os.path.join(base, "esm2dask", "numba"),
                   _os.path.join(tempfile.gettempdir(), f"esm2dask-{_os.getuid()}", "numba")):
        try:
            _os.makedirs(folder, mode=0o700, exist_ok=True)
        except OSError:
            continue
        if _private(folder) and _private(_os.path.dirname(folder)):
            _os.environ["NUMBA_CACHE_DIR"] = folder  # worker processes inherit it
            return


def _private(folder: str) -> bool:
    """Ours and writable by no one else: numba loads what it finds in its cache."""
    try:
        st = _os.stat(folder)
    except OSError:
        return False
    return st.st_uid == _os.getuid() and not st.st_mode & 0o022 and _os.access(folder, _os.W_OK | _os.X_OK)


_numba_cache_dir()

from .errors import ConfigError, Esm2DaskError, InputError, OutputError  # noqa: E402

__all__ = ["__version__", "Esm2DaskError", "InputError", "ConfigError", "OutputError"]
