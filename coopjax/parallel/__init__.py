"""Running the worker axis on devices: the sharded step, collectives, multi-host start-up."""
