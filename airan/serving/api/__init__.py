"""gRPC shell: servicers, proto conversion, interceptors (generated stubs live in airan.v1)."""
