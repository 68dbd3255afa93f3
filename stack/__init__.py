"""Services the pipeline runs beside (see local.py)."""
