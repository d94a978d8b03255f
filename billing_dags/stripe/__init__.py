"""Stripe: the meter-event outbox built from billed usage, and the sender that delivers it."""
