"""Seeds: the versioned catalog of customers, meters, plans, prices, subscriptions and credits, validated on load."""
