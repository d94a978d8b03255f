"""Reproducible performance workloads (`make bench`); figures are printed, not asserted."""
