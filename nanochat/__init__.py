"""nanochat: forward, backward and bidirectional language models, trained and compared fairly."""
