"""Streams of batches: keys and cursors, slots, producers, sessions and their credits, groups, the manager. No protobuf."""
