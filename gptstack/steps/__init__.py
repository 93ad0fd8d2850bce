"""One jitted step function per training stage."""
