"""How much a caller may use: sliding windows for requests, tokens and concurrency (the rule
apart from its storage, Redis or memory), token reservations settled to real use, and the fair
queue in front of the model's slots. Plain values and domain errors; no HTTP here."""
