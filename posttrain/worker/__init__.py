"""Scheduling and launching: claims jobs from the store, runs each in a trainer child process,
and writes what the trainer reports back to the store. Imports store and domain, never trainer."""
