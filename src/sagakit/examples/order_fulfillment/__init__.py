"""The order-fulfillment reference application (see README)."""
