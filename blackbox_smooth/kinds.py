"""The front ends' kind names: what `--frontend` accepts and what a run folder's config says.

A light module of its own, so that the options (read by `--help`, before torch loads) and the
front ends (which the core applies) both name the kinds without the one importing the other.
"""

KINDS = ("prompt", "denoiser", "coordinator")  # front ends (frontends/)
