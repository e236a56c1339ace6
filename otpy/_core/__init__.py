"""The core: servers, the scheduler, supervision and releases, in plain synchronous
Python.

Rule of this folder: nothing here imports trio or does I/O (no sockets, files, threads
or clocks of its own). The edge plugs in the clock, the wake-up of its dispatcher and
the spawning of tasks; so a node (``otpy._node``) and a simulation
(``otpy.testing``) drive the same core, step by step. ``tests/test_package.py`` checks
the rule.
"""
