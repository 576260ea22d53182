"""Protocol-faithful test doubles of the upstreams botgate talks to, for 127.0.0.1 only."""
