"""The SPMD executor: one jitted program over a ('stage', 'data') mesh.

executor.py   `SpmdExecutor`: placement, batches, the programs' cache
program.py    the program (a scan over ticks, one branch per op group) from a `ProgramSpec`
ticks.py      the static tick table laid out from the schedule
packing.py    every stage's state packed on a 'stage' axis (`PackedState`), and back
flat.py       the packed layout: stacked common leaves, per-dtype flat buffers
"""
