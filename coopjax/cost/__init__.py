"""What communication costs: the α–β network model and the compiled program's collectives."""
