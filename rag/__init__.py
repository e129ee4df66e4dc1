"""Prompts, generators, the model registry and the Answerer."""
