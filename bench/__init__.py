"""pytest-benchmark suites. A package, so that its conftest is `bench.conftest` and never shadows
the `conftest` module that tests/ import their helpers from when both folders run together."""
