"""Datasets: registry of benchmarks, datalists paired by id, episodic samplers."""
