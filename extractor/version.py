"""The package's version, on its own: the recipe records it, and importing it imports nothing else."""

__version__ = "0.2.0"  # 0.2: the output layout of embeddings/ and failures/ (tools/migrate.py moves a 0.1 output)
