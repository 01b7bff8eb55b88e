"""Research scripts over convlib: each parses flags, calls convlib, and writes results into an output folder."""
