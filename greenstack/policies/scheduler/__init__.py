"""Scheduler policies: when (and where) a run should execute for lower grid carbon intensity."""
