"""sdserve inference server: gRPC DiffusionService over diffusers pipelines."""
