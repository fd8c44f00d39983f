"""Benchmarks and fault injection: MovieLens quality, serving load, speed at scale, chaos.
May import every layer below (pipeline, serving, local)."""
