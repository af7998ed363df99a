"""The model servers: backends and their health, llama-server supervision, the relay, streams
and whole answers, keep-alives, the usage meter."""
