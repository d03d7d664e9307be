"""The click front end: the `esm2dask` command."""
