"""Generated protobuf and gRPC modules for sdserve.v1 (do not edit; run make gen)."""
