"""Datasets: manifests (ImageFolder, CSV), epoch order and sharding, reading files, the demo dataset."""
