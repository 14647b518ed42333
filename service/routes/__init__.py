"""One router per resource: classify (predictions), health (KServe v2 probes), metrics (Prometheus)."""
