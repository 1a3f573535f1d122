"""Synthetic cohorts with known structure: per-slide feature files with a planted class signal,
survival cohorts with known hazards, and the demo's small slides painted from Kather 2016
tiles. Used by the demo, the tests and the benchmarks; never by a job on real data.
"""
