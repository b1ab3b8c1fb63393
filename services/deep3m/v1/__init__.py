"""Generated gRPC code; run `make protos`."""
