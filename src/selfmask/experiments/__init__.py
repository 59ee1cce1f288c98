"""End-to-end experiments built from the pipeline pieces: evaluation protocol, demo, sweeps."""
