"""Client, Server and the runtimes that move Updates between them."""
