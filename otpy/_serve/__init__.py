"""The trio transports that reach a node from outside the process.

Rule of this folder: each transport delivers requests through the core's one call path
(``Runtime.start_call``) and never imports another transport; the module that
assembles a node (``otpy._open``) is the only one that knows them all.
"""
