"""Model analysis: complexity (parameters, MACs, latency) and feature similarity."""
