"""Benchmarks. Run them from the repository root as modules, `python -m bench.NAME [args]`, so
that they import the `testsupport` package (servers, waiting, exposition reading) as the tests
do."""
