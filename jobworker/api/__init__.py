"""Generated code for protos/worker.proto (regenerate with `nox -s protos`; never edit by hand)."""
