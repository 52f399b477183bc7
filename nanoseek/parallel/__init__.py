"""Pipeline-parallel tools: schedule simulation (DualPipe, ZB1P, 1F1B) for planning and docs."""
