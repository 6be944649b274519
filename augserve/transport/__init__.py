"""How batches leave the server: slot rings (process memory or shared memory) and in-band tensors."""
