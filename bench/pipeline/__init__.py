"""End-to-end benchmarks of the pipeline on the local stack (see BENCHMARKS.md).

One module per measurement, each runnable as ``python -m bench.pipeline.<name>`` after
``source scripts/env.sh``. Every run uses its own topics, database, manifest container and
consumer group, removed at the end, and prints one JSON document of figures and the machine.
"""
