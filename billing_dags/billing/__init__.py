"""Billing: invoices (lifecycle, numbering, settlement, credits, build, manifest, rendering, store) and the month-to-date projection."""
