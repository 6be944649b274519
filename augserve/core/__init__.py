"""Pure functions and dataclasses: errors, the op registry and specs, plans, image headers. No threads, no I/O beyond what a caller passes in, no protobuf."""
