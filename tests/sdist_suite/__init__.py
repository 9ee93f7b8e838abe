"""A public project's own test suite, from its sdist, run without and with session_monitor, and the
two runs compared: what the beds share.

- ``obtain.py``: the sdist fetched once with pip into ``.cache/<bed>/``, the members the bed needs
  extracted (never the project's own package: the tests must import the installed one), and the
  locks runs sharing that cache take.
- ``runs.py``: one run of the suite in a pytest subprocess with the plugins below, its outcomes and
  reports read back; the comparison of the two runs and the report lines both beds print.
- ``plugins/``: pytest plugins loaded by module name from that folder (the suite may have a
  ``tests`` package of its own): ``outcomes.py`` (one outcome per test; refuses a run that imported
  the sdist's copy of the package), ``inject.py`` (one ``SessionMonitor()`` watching every engine,
  in the run with the monitor), ``bed_plugin.py`` (what plugins share).

The beds: ``tests/upstream/`` (SQLAlchemy's suite, ``python -m tests.upstream.run``) and
``tests/fastapi_tutorials/`` (FastAPI's tutorial tests and apps, ``python -m
tests.fastapi_tutorials.run``). Each keeps only what is its own: which tests, its options, its
checks and its command.
"""
