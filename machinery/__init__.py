"""The machinery around qml.py's story, one module for each thing it holds (README's "Layout"): simulators,
images, process_group, checkpoints, heldout, records, command_line, report, predict, pictures and the sweep driver.
None imports qml.py."""
