"""What a request did (its outcome) and the logs."""
