"""Serving that follows the registry: the Open Inference Protocol over a verified model."""
