"""What the project knows about a model without running it, and why a run went wrong.

- `costmodel`: the roofline of each pass (bytes and FLOPs), the break-even tokens per pass (`twotower info --roofline`);
- `memory`: weights, cache and fit per GPU for each expert format (`twotower info`);
- `diagnose`: where a non-finite value first appeared in a pass (the decode core's error message).
"""
