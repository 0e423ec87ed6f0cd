"""`t5lite plan`: compile the real train (or decode) step for a target device set and report
per-device memory, fit, FLOPs and collective traffic without owning the hardware.

Modules: `topologies` (slice names -> compile-only TPU devices, or simulated CPU devices),
`hlo` (collective bytes of a compiled HLO module), `train` (the train step of `t5lite train`
lowered on abstract values), `decode` (the inference step), `search` (bisection over compiles),
`report` (text and JSON output).
"""
