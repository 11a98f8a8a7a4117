"""Pipelined execution: schedule.py (ops, order, cost model, Gantt); dataflow.py (one program per
stage, coming)."""
