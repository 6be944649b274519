"""The gRPC edge: conversions between protobuf and core types, the servicer, status codes, security, metrics."""
