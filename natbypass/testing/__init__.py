"""In-memory test doubles (on the model of twisted.internet.testing), for tests only."""
