"""Generated protobuf/gRPC stubs (do not edit; `make protos` regenerates them)."""
