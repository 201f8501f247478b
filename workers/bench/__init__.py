"""Benchmark helpers that hold models: encoder and decoder throughput, SAM test models, checkpoint scoring."""
