"""Applications on the library: the ``faig`` CLI, training, reproduction, demo, benchmarks,
studies, long resumable/distributed runs and the report writer."""
