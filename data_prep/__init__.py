"""Jobs that build datasets: synthetic screen, JUMP layout -> shards, compound featurisation."""
