"""sidrec online service: FastAPI app over the decoding engine."""
