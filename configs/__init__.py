"""Stage configs (ml-collections): `--config=configs/sft.py:tiny`, `--config=configs/rm.py:tiny`."""
