"""Building blocks shared by several methods (DESIGN.md "Layout"): one module per block
family (``conformer.py``, ``lora.py``, ``vq.py``, ``saln.py``, ``grl.py``, ...). Import the
module you need; nothing is re-exported here, so importing ``talkmesh.nn`` costs nothing."""
