"""Discovery sources: each turns its platform's view into Target values for the reconciler."""
