"""Generated protobuf and gRPC stubs of the speechrl.v1 API (see proto/speechrl/v1)."""
