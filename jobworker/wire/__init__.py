"""The gRPC-over-HTTP/2 layer that the server and the client share.

Sans-IO: nothing here reads or writes a socket. Both sides subclass
:class:`~jobworker.wire.connection.WireConnection` (purerpc's gRPC framing on h2's state
machine) and drive it with their own thin Trio I/O, so what goes on the wire is decided once.
"""
