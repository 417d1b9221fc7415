"""Quantizer modules: the fake-quant op, :class:`FakeQuantizer` (online StatQAT scales),
the LSQ module, the non-finite policy, exact division under compile and
:class:`QuantizedParams` (what convert stores)."""
