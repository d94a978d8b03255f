"""Billing: invoices, prepaid credits and the month-to-date projection.

Invoices, one module per job: ``periods`` (status, grace, finalization), ``numbering`` (the gap-free
registry), ``document`` (schema, line types, charges), ``settlement`` (adjustments, credits,
carry-forward), ``build`` (fct_invoice_lines rows -> invoices), ``manifest`` (what produced them),
``render`` (JSON, CSV, HTML, PDF, text), ``tax`` (the tax line) and ``store`` (the files); ``errors`` holds ``InvoiceError``.
"""
