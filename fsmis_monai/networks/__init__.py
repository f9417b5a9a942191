"""Encoders, the shared prototype vocabulary, and one module per few-shot method."""
