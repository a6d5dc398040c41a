"""Scripts: run from the repository root as modules, e.g. ``python -m scripts.build_example_workflows``
(``setup_host.py`` is the exception: it runs with the system Python before anything is set up)."""
