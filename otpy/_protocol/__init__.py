"""Sans-io codecs: bytes in, typed messages out, and back.

Rule of this folder: no trio, no sockets, no files. Each codec counts what it decodes
(bytes and objects) and says in its module docstring what must stay true; the
transports in ``otpy._serve`` and ``otpy._cluster`` feed them.
"""
