"""Local tooling: embedded PostgreSQL and Redis from pip packages, and the demo shop generator."""
