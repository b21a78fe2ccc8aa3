"""Training objectives: each turns (modules, batch) into a loss and logs, outside the network."""
