"""sidrec offline pipeline: data -> embeddings -> SIDs -> model -> evaluation -> bundle."""
