"""Peers the serving benchmark (benchmarks/serve.py) measures the service against, each a small server."""
