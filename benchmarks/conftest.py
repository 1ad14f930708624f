"""Lets pytest collect the benchmark modules (``bench_*.py``), whose names do not match its default ``test_*.py``.

Run them with ``pytest benchmarks/ --benchmark-only`` (or name one file); the test suite (``pytest tests/``)
never looks here.
"""
import pytest


def pytest_collect_file(file_path, parent):
    # A file named on the command line is collected by pytest itself whatever its name; adding it here too
    # would run its benchmarks twice.
    if file_path.suffix == ".py" and file_path.name.startswith("bench_") and not parent.session.isinitpath(file_path):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
