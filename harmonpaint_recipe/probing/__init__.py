"""Probed runs: run a recipe with probes on (``run``), their numbers (``record``), their pictures (``render``)."""
