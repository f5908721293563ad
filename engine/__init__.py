"""Inference side of the Dr. House bot: queue protocol, worker, model loading, history, metrics."""
