"""Generated protobuf code for the dkv wire schema (``protos/dkv/v1``).

Do not edit the ``*_pb2`` modules by hand: regenerate them with ``make proto``.
``tests/test_proto.py`` fails when they are stale.
"""
