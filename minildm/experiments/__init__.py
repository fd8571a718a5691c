"""Experiments that sit apart from the concept modules: each is a command that writes its results to data/results/."""
