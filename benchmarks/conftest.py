"""Lets pytest collect the benchmark modules (``bench_*.py``), whose names do not match its default ``test_*.py``.

Run them with ``pytest benchmarks/ --benchmark-only``; the test suite (``pytest tests/``) never looks here.
"""
import pytest


def pytest_collect_file(file_path, parent):
    if file_path.suffix == ".py" and file_path.name.startswith("bench_"):
        return pytest.Module.from_parent(parent, path=file_path)
    return None
