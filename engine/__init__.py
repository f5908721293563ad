"""Inference side of the Dr. House bot: model loading, generation engines, the worker,
history and the benchmarks."""
