"""Whole federations on one machine: ``fedmq demo`` (a real broker and one process per device)
and the in-process simulator (the real coordinator and edge agents over the in-memory bus or a
broker). It orchestrates the three apps, so it is the one package allowed to import them all."""
