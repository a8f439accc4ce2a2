"""Generated stubs of the Open Inference Protocol (KServe V2) from proto/modelfleet/oip/ (`make proto`)."""
