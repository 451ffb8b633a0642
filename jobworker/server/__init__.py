"""The gRPC server: mTLS listener, identity and role checks, the servicer, shutdown.

Entry point: ``jobworker-server`` / ``python -m jobworker.server`` (main.py); the root of
the running server is ``app.serve``.
"""
