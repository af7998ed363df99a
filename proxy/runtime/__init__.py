"""Processes on this host: the child-process type and the ngrok tunnel."""
