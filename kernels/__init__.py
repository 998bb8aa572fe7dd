"""Felix's Triton kernels, one module per family; installed as `felix.ops.kernels`.

Modules are imported lazily by the op layer (felix/ops/), so importing felix never compiles or
even imports Triton. Each module keeps its launch configurations as data, per architecture.
"""
