"""Whole federations on one machine: ``fedmq demo`` (a real broker and one process per device),
the in-process simulator (the real coordinator and edge agents over the in-memory bus or a
broker) and ``fedmq fleet`` (many virtual devices, each the real edge agent with its own broker
connection, in a few processes: fleet/fleet.py). It orchestrates the three apps, so it is the
one package allowed to import them all."""
