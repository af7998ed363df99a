"""Auth and quota at the HTTP edge: who is calling, rate limits and budgets, model slots."""
