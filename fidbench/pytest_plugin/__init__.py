"""The pytest plugin (the ``fidbench`` entry point): options, one parametrized case per model × method
variant, the score report.

The cases come from a suite file: one named as a test path (``pytest my-suite.yaml``, collected here
as the items of ``fidbench.cases``, so any project runs them with the installed package and its suite
file alone), else ``--fidbench-config`` or ``fidbench.yaml`` for a test module that re-exports
``fidbench.cases.test_fidelity`` (this project's tests/methods). ``--fidbench-shard I/N`` keeps a
deterministic share of them; ``device: cuda`` models go to each xdist worker's own GPU.

pytest-benchmark keeps its numbers only in its own JSON and switches itself off under xdist, so
fidbench carries each case's record to the controller in ``user_properties`` and writes its own
report there, rewritten after every case so an interrupted run keeps what it measured. Every
selected case gets an outcome in it (passed, failed, error, skipped), also one that errored in
setup, raised, or whose xdist worker crashed; SIGTERM (what ``timeout`` and CI runners send) stops a
session that writes a report as Ctrl-C does, so the case running then is an error ("interrupted") and
the unrun ones are "not run". Every session writes the report at its end, also one that collected
nothing or failed to collect: a previous run's report is never left behind to be read as this one's.

Each module below does one job and pytest registers each as a plugin of its own (``pytest_plugins``), so
this package imports none of them: they import one another, never back up through here.
"""

# In import order: a module comes before every listed module that imports it, so pytest imports each one itself,
# after marking it for assertion rewriting (one imported earlier by another would warn "cannot be rewritten").
pytest_plugins = [
    "fidbench.pytest_plugin.suite_file",  # which suite file the session runs; one named as a test path is collected
    "fidbench.pytest_plugin.collection",  # one parametrized case per model × variant; selection, shards
    "fidbench.pytest_plugin.scheduler",  # --dist loadgroup: each model's cases on one xdist worker
    "fidbench.pytest_plugin.sigterm",  # SIGTERM stops a session that writes a report as Ctrl-C does
    "fidbench.pytest_plugin.options",  # the command-line options and their types
    "fidbench.pytest_plugin.junit",  # a case's figures as JUnit properties, its record off the item
    "fidbench.pytest_plugin.fixtures",  # the fixtures the fidelity test takes
    "fidbench.pytest_plugin.configure",  # the session's set-up: checks, suite path, SIGTERM, progress, reporter
]
