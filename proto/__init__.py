"""Generated gRPC and protobuf code for sleepd.v1 (built from sleepd.proto at install time)."""
