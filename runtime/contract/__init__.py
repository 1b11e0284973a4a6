"""The bundle contract: what the build side writes and the runtime reads.

Torch-free by design (pydantic and numpy only): errors and exit codes (``errors``), digests and atomic
writes (``digest``), typed manifests with a schema version (``manifest``), layout names (``layout``),
I/O spec types and the shape grammar (``specs``), the model-family table (``families``), the one
``compare()`` for tensors and images (``metrics``) and every parity floor with the measurement that
justifies it (``floors``).

Nothing in this package imports the build side or the rest of the runtime: the build side
writes through it and the runtime reads through it.
"""
